"""The torch.compile backend ``"osp"``: run the OSP passes on each Dynamo graph, then Inductor or eager.

    torch.compile(model, backend="osp", options={"sparse_ratio": 2, "layout": "dual_end", "inner": "inductor"})

Options are the `OSPConfig` fields, plus ``inner`` (``"inductor"``, the default, or ``"eager"``),
``num_sites`` (the total number of video self-attention sites, needed by ``dual_end``/``uniform``
only when graph breaks split the sites over several graphs; `convert()` counts them itself) and
``cudagraphs`` (True: Inductor records each graph as CUDA graphs, as ``mode="reduce-overhead"``
does for the inductor backend; for short steps, where the host's time per launch shows).
The pip entry point (group ``torch_dynamo_backends``) makes ``backend="osp"`` work without an import.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.fx as fx

from .config import OSPConfig
from .errors import OSPConfigError
from .pipeline import GraphPass, PassContext, SiteRegistry, run_passes
from .report import OSPReport

INNER_COMPILERS = ("inductor", "eager")
_EXTRA_OPTIONS = ("inner", "num_sites", "cudagraphs")


class OSPBackend:
    """A Dynamo backend bound to one session: one config, one site numbering, one report."""

    def __init__(self, config: OSPConfig, inner: str = "inductor", num_sites: int | None = None,
                 passes: list[GraphPass] | None = None, counting: bool = False, cudagraphs: bool = False):
        if inner not in INNER_COMPILERS:
            raise OSPConfigError(f"unknown inner compiler {inner!r}: use one of {', '.join(INNER_COMPILERS)}.")
        if cudagraphs and inner != "inductor":
            raise OSPConfigError(f"cudagraphs=True needs inner='inductor' (Inductor records the CUDA graphs), got {inner!r}.")
        self.config = config
        self.inner = inner
        self.cudagraphs = bool(cudagraphs)
        self.registry = SiteRegistry(config, num_sites=num_sites, counting=counting)
        self.report = OSPReport()
        self.passes = passes
        self.state: dict = {}  # session objects passes create once and reuse on recompilation

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        ctx = PassContext(self.config, self.registry, self.report, state=self.state)
        gm = run_passes(gm, ctx, self.passes)
        if self.inner == "eager":
            return gm.forward
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        if not self.cudagraphs:  # Inductor's own setting stands
            return compile_fx(gm, example_inputs)
        with inductor_config.patch({"triton.cudagraphs": True}):
            return compile_fx(gm, example_inputs)


def split_options(options: dict | None) -> tuple[OSPConfig, dict]:
    """Validate backend options: OSPConfig fields plus the backend's own keys."""
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(OSPConfig)}
    unknown = set(options) - fields - set(_EXTRA_OPTIONS)
    if unknown:
        raise OSPConfigError(
            f"unknown osp backend option(s) {sorted(unknown)}: valid keys are {sorted(fields | set(_EXTRA_OPTIONS))}."
        )
    extra = {k: options.pop(k) for k in _EXTRA_OPTIONS if k in options}
    return OSPConfig(**options), extra


# One session per options dict object: torch.compile hands the same dict to every graph it compiles.
_SESSIONS: dict[int, tuple[dict | None, OSPBackend]] = {}


def osp_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **_: Any) -> Callable:
    """Entry point registered as ``torch_dynamo_backends: osp``."""
    key = id(options)
    if key not in _SESSIONS or _SESSIONS[key][0] is not options:
        config, extra = split_options(options)
        _SESSIONS[key] = (options, OSPBackend(config, **extra))
    return _SESSIONS[key][1](gm, example_inputs)


def _session(options: dict | None) -> OSPBackend:
    """The session compiled with `options`: that dict itself, else the latest one compiled with equal
    options. Dynamo tells backends apart by their options' contents, so a second ``torch.compile``
    of a model with equal options reuses the first one's graphs, and no session of its own is made."""
    entry = _SESSIONS.get(id(options))
    if entry is not None and entry[0] is options:
        return entry[1]
    equal = [backend for compiled_with, backend in _SESSIONS.values() if compiled_with == options]
    if not equal:
        raise KeyError("no osp backend session was compiled with these options (has the model run yet?)")
    return equal[-1]


def report_for(options: dict | None = None) -> OSPReport:
    """The report of the ``torch.compile(..., backend="osp", options=options)`` session."""
    return _session(options).report


def state_for(options: dict | None = None) -> dict:
    """Session objects (e.g. LoRA adapters) of the ``backend="osp"`` session compiled with `options`."""
    return _session(options).state


def reset() -> None:
    """Forget every session (after `torch._dynamo.reset()`)."""
    _SESSIONS.clear()


osp_backend.reset = reset  # torch._dynamo.reset() calls the backend's reset()
