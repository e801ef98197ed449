"""`convert()`: capture a model's graph with Dynamo, run the OSP passes, return a drop-in module."""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn as nn

from .backend import OSPBackend
from .distributed import collective_errors
from .pipeline import SiteCountNeeded
from .config import OSPConfig
from .errors import OSPConfigError, OSPError, caused_by, unwrapped_osp_errors
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
        with collective_errors(self.osp_config), unwrapped_osp_errors(), recompile_limit_as_error():
            return self._compiled(*args, **kwargs)

    def collective_errors(self) -> contextlib.AbstractContextManager:
        """Around ``loss.backward()`` under sequence parallelism: a collective of the backward that
        fails (a peer rank died, skipped its backward, or ran another one) raises an `OSPError` that
        names this rank and the contract, as a failed forward collective does, instead of the
        backend's raw error. A no-op without sequence parallelism.

            with model.collective_errors():
                loss.backward()
        """
        return collective_errors(self.osp_config, phase="backward")

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


@functools.cache
def _fail_on_limit_switch() -> str | None:
    """Dynamo's switch (named by torch version) that makes its recompile limit an error instead of
    eager. Looked up on first use: importing torch._dynamo imports Triton."""
    return next((k for k in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")
                 if hasattr(torch._dynamo.config, k)), None)


@contextlib.contextmanager
def recompile_limit_as_error():
    """Each new input signature (shapes, batch, dtype, grad mode) recompiles the converted graphs, and
    past Dynamo's recompile limit Dynamo would run the original forward eagerly: the dense model,
    without the passes and without a word. Here that is an `OSPError` instead."""
    switch = _fail_on_limit_switch()
    if switch is None:
        yield
        return
    try:
        with torch._dynamo.config.patch(**{switch: True}):
            yield
    except Exception as exc:
        if type(exc).__name__ not in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
            raise
        limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
        raise OSPError(
            f"this converted module has been compiled for {limit} input signatures (shapes, batch size, dtype and "
            f"grad mode each make one), Dynamo's recompile limit: a new one would run the original dense model "
            f"without the passes. Convert again for these inputs, or raise torch._dynamo.config.recompile_limit "
            f"before converting."
        ) from exc


def _count_sites(model: nn.Module, args: tuple, kwargs: dict, config: OSPConfig) -> int:
    """Number of video self-attention sites over all graphs, in one analysis-only run."""
    from passes.analysis import analysis_pass
    from passes.canonicalize_attention import canonicalize_attention_pass

    counter = OSPBackend(config, inner="eager", passes=[canonicalize_attention_pass, analysis_pass], counting=True)
    with torch.no_grad(), unwrapped_osp_errors():
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
    if config.target == "npu" and _runs_here(args, kwargs) and not _torch_npu_present():
        raise OSPConfigError(
            "target='npu' runs torch_npu's kernels, and torch_npu is not installed here (it needs Ascend's CANN). "
            "To write the NPU model on this machine, export it: `osp-compile export --target npu` "
            "(osp_compile.export), which emits the calls without importing torch_npu.")
    try:
        backend, compiled = _capture(model, args, kwargs, config, num_sites=None)
    except Exception as exc:  # Dynamo wraps backend errors; look for ours inside
        if not caused_by(exc, SiteCountNeeded):
            raise
        # graph breaks split the sites: count them all first, then capture again
        num_sites = _count_sites(model, args, kwargs, config)
        backend, compiled = _capture(model, args, kwargs, config, num_sites=num_sites)
    adapters = backend.state.get("lora")
    if config.lora_rank and (adapters is None or not len(adapters.lora_A)):
        patterns = config.lora_targets if config.lora_targets is not None else "the default attention q/k/v/o patterns"
        raise OSPConfigError(
            f"lora_rank={config.lora_rank}, but lora_targets {patterns} matched none of {type(model).__name__}'s "
            f"linear weights (fnmatch on parameter names such as "
            f"{[n for n, p in model.named_parameters() if p.dim() == 2][:3]}): give patterns that match, or lora_rank=0.")
    return OSPModule(model, compiled, backend.report, config, backend.state)


def _runs_here(args: tuple, kwargs: dict) -> bool:
    """Whether the capture runs kernels: any input tensor not on the meta device (an export captures
    on meta, where each kernel's fake implementation runs instead)."""
    import torch.utils._pytree as pytree

    return any(t.device.type != "meta" for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))


def _torch_npu_present() -> bool:
    """Whether torch_npu is importable, without importing it (where CANN is missing, importing breaks torch)."""
    import importlib.util
    import sys

    if "torch_npu" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


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
    with torch.no_grad(), collective_errors(config), unwrapped_osp_errors():
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
        with unwrapped_osp_errors():
            _compile(model, compile_only)(*args, **(kwargs or {}))
    except Exception as exc:  # Dynamo wraps what a backend raises
        if not caused_by(exc, _CompiledOnly):
            raise
    return backend.report
