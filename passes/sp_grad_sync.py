"""SP gradient sync pass: every trainable parameter, and every graph input that requires grad,
passes once through `osp::sp_grad_sync`.

Under sequence parallelism each rank back-propagates only its own tokens, so parameter gradients
are partial sums; the op is an identity forward whose backward all-reduces (SUM) the gradient over
the SP group, inside the autograd graph - so `loss.backward()` alone leaves every rank with the
single-process gradient, with no hooks to forget. An input (the latent, a conditioning an upstream
module produced) is replicated like a parameter and its gradient is partial the same way. It runs
after the passes that add parameters (LoRA adapters), so those are synced too.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from osp_compile.report import PassReport
from .fx_utils import meta_value, param_fqn
from .token_layout import sp_info


def _trainable_params(gm: fx.GraphModule) -> list[fx.Node]:
    """Graph inputs that are parameters (Dynamo placeholders) and parameters read with get_attr
    (e.g. LoRA adapters a pass registered on the graph module), when they require grad."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            v = _fetch_attr(gm, n.target)
            keep = isinstance(v, torch.nn.Parameter) and v.requires_grad
        else:
            v = meta_value(n)
            keep = param_fqn(n) is not None and isinstance(v, torch.Tensor) and v.requires_grad
        if keep:
            out.append(n)
    return out


def _inputs_needing_grad(gm: fx.GraphModule) -> list[fx.Node]:
    """The forward's own tensor inputs (not parameters) that require grad in this capture."""
    return [n for n in gm.graph.find_nodes(op="placeholder")
            if param_fqn(n) is None and isinstance(v := meta_value(n), torch.Tensor) and v.requires_grad]


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _has_sharded_region(gm: fx.GraphModule) -> bool:
    from osp_compile.distributed import sp_relayout, ulysses_attention

    return any(n.op == "call_function" and n.target in (sp_relayout, ulysses_attention) for n in gm.graph.nodes)


def _param_names(params: list[fx.Node]) -> frozenset[str]:
    return frozenset(str(p.target) if p.op == "get_attr" else param_fqn(p) for p in params)


def _refuse_split_training(ctx, names: frozenset[str]) -> None:
    """Gradients are exact within ONE graph: when a Dynamo graph break splits the forward, the graphs
    hold different trainable parameters, and the gradient bookkeeping (partial sums, the gather's
    slice backward, the 1/S scale after it) does not compose across graphs yet (a test run gave 2x
    the gradient of the output head on 2 ranks). A recompilation of the same forward (another
    resolution, another batch size) holds the same parameters and is a whole forward again: allowed.
    Inference is unaffected: outputs stay exact."""
    if not (names and torch.is_grad_enabled()):
        return
    first = ctx.state.setdefault("sp_training_params", names)
    if names != first:
        from osp_compile.errors import OSPUnsupportedError

        raise OSPUnsupportedError(
            f"sequence_parallel={ctx.config.sequence_parallel!r} training: the forward was split into several graphs "
            f"(a Dynamo graph break: this graph trains {len(names)} parameter(s), an earlier one {len(first)} "
            f"others), and SP gradients are exact only within one graph. Remove the graph break "
            f"(torch._dynamo.explain(model)(*args) names it), or run this module under torch.no_grad() (inference "
            f"stays exact), or train without sequence_parallel.")


def sp_grad_sync_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    sp = sp_info(ctx.config)
    if sp.world <= 1:
        return gm, PassReport("sp_grad_sync", "one rank: nothing to sync")
    from osp_compile.distributed import sp_grad_sync

    params = _trainable_params(gm)
    _refuse_split_training(ctx, _param_names(params))
    if not _has_sharded_region(gm):  # all replicated (one graph): every rank already holds the full gradient
        return gm, PassReport("sp_grad_sync", "no sharded region in this graph: gradients are already whole on every rank")
    inputs = _inputs_needing_grad(gm)
    for p in params + inputs:
        users = list(p.users)
        if not users:
            continue
        first = next(n for n in gm.graph.nodes if n in users)
        with gm.graph.inserting_before(first):
            synced = gm.graph.call_function(sp_grad_sync, (p, sp.group))
        for u in users:
            u.replace_input_with(p, synced)
    gm.recompile()
    return gm, PassReport("sp_grad_sync", f"{len(params)} parameter(s) and {len(inputs)} input(s) all-reduce their "
                                          f"gradient over {sp.world} ranks in backward",
                          [{"param": param_fqn(p)} for p in params] + [{"input": n.name} for n in inputs])
