"""The pass manager: runs the passes on each captured graph and keeps what they report.

A *session* spans one conversion (or one `torch.compile(backend="osp")` wrapper): it numbers the
video self-attention sites across graphs in call order, so that a model split by graph breaks gets
the same layout as one graph. Sites are keyed by where they are in the model (module path and source
line), so a recompilation (new shapes, grad mode) finds its sites again instead of numbering anew.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from .config import OSPConfig
from .errors import OSPConfigError
from .report import OSPReport, PassReport


class SiteCountNeeded(OSPConfigError):
    """A graph break split the sites after the layout was fixed from an earlier graph's count."""


@dataclass
class SiteRegistry:
    """Global numbering of video self-attention sites, and the layout each one gets."""

    config: OSPConfig
    num_sites: int | None = None  # known total (pre-counted by convert, or given as an option)
    keys: dict[tuple, int] = field(default_factory=dict)
    grid: tuple | None = None  # the grid an earlier graph found, for graphs that lack the embedding
    joint: set = field(default_factory=set)  # (joined length, video offset) of the joint attention found so far
    counting: bool = False  # only number the sites (every site reads as full); nothing is fixed
    _layouts: list[str] | None = None

    def index_of(self, key: tuple) -> int:
        if key not in self.keys:
            if self._layouts is not None and self.num_sites is not None and len(self.keys) >= self.num_sites:
                raise SiteCountNeeded(
                    f"a new video self-attention site appeared after the layout was fixed for {self.num_sites} "
                    f"site(s): the model has graph breaks between attention sites. Pass the total as "
                    f"options={{'num_sites': N}} (or an explicit layout list), or use osp_compile.convert(), "
                    f"which counts the sites first."
                )
            self.keys[key] = len(self.keys)
        return self.keys[key]

    def layouts(self, graph_site_count: int) -> list[str]:
        """The layout table; fixed on first use (from `num_sites`, else this graph's sites)."""
        if self.counting:
            return ["full"] * len(self.keys)
        if self._layouts is None:
            if self.num_sites is None:
                self.num_sites = len(self.keys) if self.keys else graph_site_count
            self._layouts = self.config.resolve_layout(self.num_sites)
        return self._layouts


def site_key(node: fx.Node) -> tuple:
    """Where an attention call sits in the model: innermost module path and the user call stack."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        last = list(stack.values())[-1]
        path = str(last[0] if isinstance(last, tuple) else last)
        path = re.sub(r"L\['self'\]\.?|L__self__\.?", "", path)
        path = re.sub(r"(?:__dict__\[')?_modules'?\]?\['([^']+)'\]", r".\1", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".").replace("..", ".")
    trace = node.meta.get("stack_trace") or ""
    # the whole user stack: two graphs that reach the same line through different callers differ
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    where = " < ".join(f"{f.rsplit('/', 1)[-1]}:{n}" for f, n in reversed(frames))
    return (path, where)


@dataclass
class PassContext:
    """What a pass may read and record: the config, the session and the analysis of this graph."""

    config: OSPConfig
    registry: SiteRegistry
    report: OSPReport
    analysis: object | None = None
    state: dict = field(default_factory=dict)  # per-session objects a pass creates once (e.g. adapters)


GraphPass = Callable[[fx.GraphModule, PassContext], tuple[fx.GraphModule, PassReport]]


def default_passes(config: OSPConfig) -> list[GraphPass]:
    """The pipeline for a config: static sizes, identity dropouts out, attention canonicalization, analysis,
    Skiparse, then the optional passes in the order they compose (quantized linears first, LoRA
    adapters beside them; the fusions into linears last, on the linears the others left plain)."""
    from passes.analysis import analysis_pass
    from passes.canonicalize_attention import canonicalize_attention_pass
    from passes.identity_dropout import identity_dropout_pass
    from passes.skiparse import skiparse_pass
    from passes.static_shapes import static_shapes_pass
    from passes.token_layout import token_layout_pass

    pipeline = [static_shapes_pass, identity_dropout_pass, canonicalize_attention_pass, analysis_pass, skiparse_pass,
                token_layout_pass]
    if config.quant is not None:
        from passes.hif8_linear import hif8_linear_pass

        pipeline.append(hif8_linear_pass)
    if config.lora_rank:
        from passes.lora import lora_pass

        pipeline.append(lora_pass)
    if config.sequence_parallel is not None:
        from passes.comm_accounting import comm_accounting_pass
        from passes.sp_grad_sync import sp_grad_sync_pass

        pipeline += [sp_grad_sync_pass, comm_accounting_pass]
    if config.fuse_norm_rope:
        from passes.norm_rope import norm_rope_pass

        pipeline.append(norm_rope_pass)
    if config.fuse_linears:
        from passes.attention_projection import attention_projection_pass
        from passes.gelu_hif8_linear import gelu_hif8_linear_pass
        from passes.hif8_absmax import hif8_absmax_pass
        from passes.linear_gelu import linear_gelu_pass

        pipeline += [attention_projection_pass, linear_gelu_pass, gelu_hif8_linear_pass, hif8_absmax_pass]
    from passes.lowering import lowering_pass; pipeline.append(lowering_pass)  # noqa: E702  (last: kernels per target)
    return pipeline


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[GraphPass] | None = None) -> fx.GraphModule:
    """Run each pass in order; each returns the (rewritten) graph and its report."""
    from .visualize.dataflow import block_graph

    before = block_graph(gm)  # the captured graph's blocks, drawn by `osp-compile inspect --html`
    graph_reports = []
    for p in passes if passes is not None else default_passes(ctx.config):
        gm, rep = p(gm, ctx)
        graph_reports.append(rep)
    gm.graph.lint()
    gm.recompile()
    ctx.report.add_graph(gm, graph_reports, dataflow=(before, block_graph(gm)))
    return gm
