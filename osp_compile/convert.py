"""`convert()`: capture a model's graph with Dynamo, run the OSP passes, return a drop-in module."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .backend import OSPBackend
from .distributed import collective_errors
from .pipeline import SiteCountNeeded
from .config import OSPConfig
from .errors import OSPError, caused_by
from .report import OSPReport


class OSPModule(nn.Module):
    """The converted model: called like the original, sharing its parameters and state_dict keys.

    It shares the original's parameter, buffer and submodule tables (not copies), so an optimizer,
    `.to()`, `state_dict()` and `load_state_dict()` act on the original's tensors under the original
    names. Attributes it does not define (e.g. diffusers' `config`) are read from the original.
    """

    def __init__(self, original: nn.Module, compiled: Any, report: OSPReport, config: OSPConfig, state: dict | None = None):
        super().__init__()
        # stored unregistered, so they add no prefix to state_dict keys
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "osp_report", report)
        object.__setattr__(self, "osp_config", config)
        object.__setattr__(self, "osp_state", state)
        self._modules = original._modules
        self._parameters = original._parameters
        self._buffers = original._buffers
        self.training = original.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with collective_errors(self.osp_config):
            return self._compiled(*args, **kwargs)

    def train(self, mode: bool = True) -> "OSPModule":
        super().train(mode)
        self._original.training = mode
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def extra_repr(self) -> str:
        return f"osp: {self.osp_report.summary()}"


def _count_sites(model: nn.Module, args: tuple, kwargs: dict, config: OSPConfig) -> int:
    """Number of video self-attention sites over all graphs, in one analysis-only run."""
    from passes.analysis import analysis_pass
    from passes.canonicalize_attention import canonicalize_attention_pass

    counter = OSPBackend(config, inner="eager", passes=[canonicalize_attention_pass, analysis_pass], counting=True)
    with torch.no_grad():
        _compile(model, counter)(*args, **kwargs)
    return len(counter.registry.keys)


def convert(model: nn.Module, args: tuple = (), kwargs: dict | None = None, config: OSPConfig | None = None) -> OSPModule:
    """Turn a dense video DiT into its OSP form.

    `args`/`kwargs` are example inputs, as the model is called. The model's graph is captured with
    Dynamo (graph breaks are fine) and the passes rewrite each graph. Hybrid layouts such as
    ``dual_end`` need the total number of sites: when graph breaks split the sites over several
    graphs, the sites are first counted in an analysis-only run and the model is captured again.
    The returned module's `osp_report` says what every pass did.
    """
    config = config or OSPConfig()
    kwargs = kwargs or {}
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    try:
        backend, compiled = _capture(model, args, kwargs, config, num_sites=None)
    except Exception as exc:  # Dynamo wraps backend errors; look for ours inside
        if not caused_by(exc, SiteCountNeeded):
            raise
        # graph breaks split the sites: count them all first, then capture again
        num_sites = _count_sites(model, args, kwargs, config)
        backend, compiled = _capture(model, args, kwargs, config, num_sites=num_sites)
    return OSPModule(model, compiled, backend.report, config, backend.state)


def _compile(model: nn.Module, backend) -> Any:
    """torch.compile with this conversion's own recompile budget where torch offers it: Dynamo's
    per-function limit is shared by every compile of the same forward in a process, and past it
    Dynamo silently runs eagerly - i.e. without the passes."""
    import inspect

    extra = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
    return torch.compile(model, backend=backend, dynamic=False, **extra)


def _capture(model, args, kwargs, config, num_sites):
    backend = OSPBackend(config, inner="eager", num_sites=num_sites)
    compiled = _compile(model, backend)
    with torch.no_grad(), collective_errors(config):
        compiled(*args, **kwargs)
    if not backend.report.graphs:
        raise OSPError(
            f"no graph of {type(model).__name__} was captured: Dynamo ran it eagerly (its recompile limit for this "
            f"forward is used up by earlier compiles in this process, or the forward is skipped). Call "
            f"torch._dynamo.reset() or raise torch._dynamo.config.cache_size_limit, then convert again."
        )
    return backend, compiled





class _CompiledOnly(Exception):
    """Raised by the planning backend once the passes ran: nothing is executed."""


def plan(model: nn.Module, args: tuple = (), kwargs: dict | None = None, config: OSPConfig | None = None) -> OSPReport:
    """Run the passes on the model's first graph and return the report, without executing anything.

    For inspecting a conversion that cannot run here: a 14B model on the meta device, or a
    sequence-parallel plan for S ranks (`OSPConfig(sp_group=PlanningGroup(S))`) on one process.
    """
    config = config or OSPConfig()
    backend = OSPBackend(config, inner="eager")

    def compile_only(gm, example_inputs):
        backend(gm, example_inputs)
        raise _CompiledOnly

    try:
        _compile(model, compile_only)(*args, **(kwargs or {}))
    except Exception as exc:  # Dynamo wraps what a backend raises
        if not caused_by(exc, _CompiledOnly):
            raise
    return backend.report
