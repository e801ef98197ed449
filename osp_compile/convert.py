"""`convert()`: capture a model's graph with Dynamo, run the OSP passes, return a drop-in module."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .backend import OSPBackend
from .pipeline import SiteCountNeeded
from .config import OSPConfig
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
        torch.compile(model, backend=counter, dynamic=False)(*args, **kwargs)
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
        if not _caused_by(exc, SiteCountNeeded):
            raise
        # graph breaks split the sites: count them all first, then capture again
        num_sites = _count_sites(model, args, kwargs, config)
        backend, compiled = _capture(model, args, kwargs, config, num_sites=num_sites)
    return OSPModule(model, compiled, backend.report, config, backend.state)


def _capture(model, args, kwargs, config, num_sites):
    backend = OSPBackend(config, inner="eager", num_sites=num_sites)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return backend, compiled


def _caused_by(exc: BaseException | None, kind: type) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    return False
