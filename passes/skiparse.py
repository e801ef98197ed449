"""Skiparse-2D pass: at each video self-attention site laid out `token` or `group`, replace the dense
attention by `osp::skiparse_attention` (pad H and W to multiples of P*P, fold the P*P subsequences
into the batch, run the same dense attention with padded keys masked, undo).

Joint text+video sites (CogVideoX, HunyuanVideo: one attention over text and video joined) get
`osp::skiparse_joint_attention` instead: video queries attend the text keys and their own
subsequence (packed: real tokens only, no padding), text queries stay full; the model's key mask
(text padding) is kept.

RoPE needs nothing here: the call sits after RoPE, so every token keeps its original position.
"""
from __future__ import annotations

import torch.fx as fx

from osp_compile.errors import OSPUnsupportedError
from osp_compile.joint_attention import joint_attention_flops, skiparse_attention_flops, skiparse_joint_attention
from osp_compile.ops import skiparse_attention
from osp_compile.report import PassReport
from osp_compile.skiparse_layout import check_fits, subsequence_length, subsequence_tokens
from .fx_utils import sdpa_args


def _unsupported_reason(site, a: dict) -> str | None:
    if a["is_causal"]:
        return "the attention call is causal"
    if site.kind == "joint":
        return site.unsupported
    if a["attn_mask"] is not None:
        return "the attention call has an attn_mask"
    return None


def _rewrite(g: fx.Graph, site, a: dict, p: int, grid: tuple[int, int, int]) -> fx.Node:
    """Insert the sparse op for `site` before its attention call and return it (the graph's sizes
    are static: `static_shapes` ran first)."""
    options = {"dropout_p": a["dropout_p"], "scale": a["scale"], "enable_gqa": a["enable_gqa"]}
    t, h, w = grid
    with g.inserting_before(site.node):
        if site.kind == "joint":
            return g.call_function(skiparse_joint_attention, (
                a["query"], a["key"], a["value"], a["attn_mask"], t, h, w, p, site.layout, site.video_offset), options)
        return g.call_function(skiparse_attention, (a["query"], a["key"], a["value"], t, h, w, p, site.layout), options)


def skiparse_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    cfg, an = ctx.config, ctx.analysis
    p = cfg.sparse_ratio
    g = gm.graph
    rows, rewritten = [], 0
    for site in an.layout_sites:
        row = ctx.report.sites[site.key]
        if site.layout == "full":
            row.decision = "full attention (layout)"
            continue
        a = sdpa_args(site.node)
        reason = _unsupported_reason(site, a)
        if reason is not None:
            msg = f"site {site.index} (node '{site.node.name}', {row.where}): {reason}; Skiparse cannot keep its meaning."
            if cfg.on_unsupported == "error":
                raise OSPUnsupportedError(msg + " Use layout 'full' there or OSPConfig(on_unsupported='skip').")
            row.decision, row.layout = f"kept dense: {reason}", "full"
            continue
        grid = site.grid
        check_fits(grid, p, site.layout, where=f" at site {site.index} (node '{site.node.name}')")
        new = _rewrite(g, site, a, p, grid)
        new.meta.update(site.node.meta)
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
        site.node = new
        if site.kind == "joint":
            sub = max(len(t) for t in subsequence_tokens(grid, p, site.layout))
            row.flops_after = joint_attention_flops(site.batch, site.heads, site.head_dim, grid, p, site.layout,
                                                    site.text_len)
            row.decision = (f"{site.layout}-wise Skiparse, P={p}, {p * p} packed subsequences of up to {sub} tokens, "
                            f"each with the {site.text_len} text keys; text queries full")
        else:
            sub = subsequence_length(grid, p)
            row.flops_after = skiparse_attention_flops(site.batch, site.heads, site.head_dim, grid, p)
            row.decision = f"{site.layout}-wise Skiparse, P={p}, {p * p} subsequences of {sub} tokens"
        row.subsequence_len = sub
        rows.append({"site": site.index, "layout": site.layout, "subsequence_len": sub})
        rewritten += 1
    gm.recompile()
    return gm, PassReport("skiparse", f"{rewritten} site(s) rewritten to Skiparse-2D (P={p})", rows)
