"""Permutation fusion (one process) and SSP / Ulysses (2 and 4 gloo processes): outputs and
parameter gradients equal the single-process converted module; collective counts and bytes."""
import time

import pytest
import torch

from osp_compile import OSPConfig, OSPConfigError, convert
from osp_compile.convert import plan
from osp_compile.distributed import PlanningGroup
from osp_compile.oracle import rel_err
from reference_model import PRESETS, build_model, make_inputs
from sp_harness import die_now, run_ranks


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_errors(got, ref):
    total = sum(g.norm() ** 2 for g in ref.values()) ** 0.5
    # relative to each gradient, floored at 1e-3 of the total (k biases have ~0 gradient in attention)
    return {n: ((got[n] - g).norm() / max(g.norm(), 1e-3 * total)).item() for n, g in ref.items()}


@pytest.mark.parametrize("layout", ["dual_end", "all_sparse"])
def test_fused_layout_equals_per_site_rearrangement(layout):
    model = build_model("tiny", num_layers=6, seed=3)
    args, kwargs = make_inputs(PRESETS["tiny"], seed=4)
    x = args[0].clone().requires_grad_(True)
    results = []
    for fuse in (False, True):
        torch._dynamo.reset()
        conv = convert(model, args, kwargs, OSPConfig(num_full_blocks=2, layout=layout, fuse_permutations=fuse))
        model.zero_grad()
        x.grad = None
        out = conv(x, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), _grads(model), x.grad.clone(), conv.osp_report))
    (o0, g0, x0, _), (o1, g1, x1, rep) = results
    assert rel_err(o1, o0) <= 1e-6 and rel_err(x1, x0) <= 1e-6
    assert max(_grad_errors(g1, g0).values()) <= 1e-5
    sparse = sum(1 for s in rep.video_sites if s.layout != "full")
    changes = rep.layout_changes
    assert changes["before"] == 4 * sparse
    # one relayout entering each sparse block, plus one leaving the run (dual_end) or before the head
    assert changes["after"] == sparse + 1


def _plan(mode, world, latent=(2, 16, 16), layers=6, full=2, model=None):
    model = model or build_model("tiny", num_layers=layers, device="meta")
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=latent, device="meta")
    return plan(model, args, kwargs, OSPConfig(num_full_blocks=full, sequence_parallel=mode, sp_group=PlanningGroup(world)))


def test_ssp_sends_a_quarter_of_ulysses_per_sparse_block():
    ssp, uly = _plan("ssp", 4).communication, _plan("ulysses", 4).communication
    # tiny: 6 sites, 2 full (dual_end) -> SSP: 2 x 4 Ulysses all-to-alls + 4 switches + 1 leaving the run
    assert ssp["collectives"] == {"all_to_all": 2 * 4 + 4 + 1, "all_gather": 1}
    assert uly["collectives"] == {"all_to_all": 6 * 4, "all_gather": 1}
    for site in ("2", "3", "4"):  # sparse blocks entered by a token<->group switch (grid needs no padding)
        assert ssp["bytes_by_site"][site] * 4 == pytest.approx(uly["bytes_by_site"][site])


@pytest.mark.parametrize("world,match", [(3, "divide P\\*P = 4"), (8, "divide P\\*P = 4")])
def test_bad_world_sizes(world, match):
    with pytest.raises(Exception, match=match):
        _plan("ssp", world)


def test_only_the_shards_a_layout_uses_are_checked():
    """SSP with every site full holds no subsequences (P*P need not divide by S); with every site
    sparse, no natural-order shard (T*H*W need not divide by S, odd_grid_ssp_equals_single_process)."""
    model = build_model("tiny", num_layers=2, device="meta")
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(2, 16, 16), device="meta")
    plan(model, args, kwargs, OSPConfig(sparse_ratio=3, layout="dense", sequence_parallel="ssp", sp_group=PlanningGroup(2)))
    with pytest.raises(OSPConfigError, match=r"divide P\*P = 9"):
        plan(model, args, kwargs, OSPConfig(sparse_ratio=3, layout="all_sparse", sequence_parallel="ssp",
                                            sp_group=PlanningGroup(2)))


def _odd_grid_worker(rank, world):
    model = build_model("tiny", num_layers=2, seed=5)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(1, 10, 14), seed=6)  # grid (1, 5, 7): 35 tokens
    x = args[0].clone().requires_grad_(True)
    outs = []
    for sp in (None, "ssp"):
        torch._dynamo.reset()
        conv = convert(model, args, kwargs, OSPConfig(layout="all_sparse", sequence_parallel=sp))
        x.grad = None
        out = conv(x, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append((out.detach(), x.grad.clone()))
    (o0, g0), (o1, g1) = outs
    return {"out": rel_err(o1, o0), "grad": rel_err(g1, g0)}


def test_odd_grid_ssp_equals_single_process(tmp_path):
    for res in run_ranks(_odd_grid_worker, 2, tmp_path, timeout_s=120):
        assert "error" not in res, res.get("trace")
        assert res["out"] <= 1e-5 and res["grad"] <= 1e-5, res


class _Variant(torch.nn.Module):
    """The tiny reference model with a token-mixing op between blocks ("token_mean"), or returning its
    time embedding beside the output ("aux_out"): shapes the SP gradient bookkeeping does not cover."""

    def __init__(self, kind):
        super().__init__()
        self.dit, self.kind = build_model("tiny", num_layers=3, seed=7), kind

    def forward(self, x, t, context):
        from reference_model.model import rope_cos_sin, sinusoidal_embedding

        m, cfg = self.dit, self.dit.config
        x = m.patch_embedding(x)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        cos, sin = rope_cos_sin(grid, cfg.head_dim, cfg.rope_theta, device=x.device)
        e = m.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(x.dtype))
        e0, ctx = m.time_projection(e).unflatten(1, (6, cfg.dim)), m.text_embedding(context)
        for i, block in enumerate(m.blocks):
            x = block(x, e0, ctx, cos, sin)
            if i == 0 and self.kind == "token_mean":
                x = x + 0.5 * x.mean(dim=1, keepdim=True)
        out = m.unpatchify(m.head(x, e), grid)
        return (out, e) if self.kind == "aux_out" else out


def _inexact_training_worker(rank, world):
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(2, 16, 16), seed=8)
    result = {}
    for kind in ("token_mean", "aux_out"):
        model = _Variant(kind)
        torch._dynamo.reset()
        single = convert(model, args, kwargs, OSPConfig(layout="all_sparse"))
        torch._dynamo.reset()
        sp = convert(model, args, kwargs, OSPConfig(layout="all_sparse", sequence_parallel="ssp"))
        with torch.no_grad():  # inference stays exact
            result[f"{kind} out"] = rel_err(_first(sp(*args, **kwargs)), _first(single(*args, **kwargs)))
        try:
            _first(sp(*args, **kwargs)).sum().backward()
            result[f"{kind} training"] = "ran"
        except Exception as exc:
            result[f"{kind} training"] = f"{type(exc).__name__}: {exc}"
    return result


def test_sp_training_that_would_give_wrong_gradients_is_refused(tmp_path):
    """A gather in the middle (then sharded again) scaled later gradients by 1/S; an output computed
    before the sharded region had its gradient summed S times. Both are refused in training."""
    for res in run_ranks(_inexact_training_worker, 2, tmp_path, timeout_s=180):
        assert "error" not in res, res.get("trace")
        assert res["token_mean out"] <= 1e-6 and res["aux_out out"] <= 1e-6, res
        assert res["token_mean training"].startswith("OSPUnsupportedError") and "gathered in the middle of the graph" in \
            res["token_mean training"], res
        assert "computed before the sharded region" in res["aux_out training"], res


def test_heads_must_divide_for_ulysses():
    model = build_model("tiny", num_layers=4, device="meta")  # 4 heads
    with pytest.raises(Exception, match="4 heads do not divide by world size 8"):
        plan(model, *make_inputs(PRESETS["tiny"], latent_shape=(2, 16, 16), device="meta"),
             OSPConfig(num_full_blocks=2, sequence_parallel="ulysses", sp_group=PlanningGroup(8)))


def test_sequence_parallel_needs_a_process_group():
    model = build_model("tiny", num_layers=2)
    with pytest.raises(Exception, match="needs torch.distributed initialised"):
        convert(model, *make_inputs(PRESETS["tiny"]), OSPConfig(num_full_blocks=0, sequence_parallel="ssp"))


# ---------------------------------------------------------------------------------------------------
# multi-process: every rank gets the single-process output and gradients
# ---------------------------------------------------------------------------------------------------
def _build(name):
    if name.startswith("reference"):
        model = build_model("tiny", num_layers=4, seed=1)
        # grid (3, 6, 10): group-wise subsequences of 72/48/36/24 tokens, so ranks hold unequal shards
        args, kwargs = make_inputs(PRESETS["tiny"], seed=2, batch=2 if name.endswith("batch2") else 1)
        return model, args, kwargs, "x"
    import diffusers

    torch.manual_seed(3)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, rope_max_seq_len=64)
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(1, 4, 3, 12, 20, generator=g),)
    kwargs = {"timestep": torch.tensor([421.0]), "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
              "return_dict": False}
    return model, args, kwargs, "x"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _sp_worker(rank, world, name, modes):
    model, args, kwargs, _ = _build(name)
    ref = convert(model, args, kwargs, OSPConfig(num_full_blocks=2))
    out_ref = _first(ref(*args, **kwargs))
    weight = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(9))
    model.zero_grad()
    (out_ref * weight).sum().backward()
    g_ref = _grads(model)
    result = {}
    for mode in modes:
        torch._dynamo.reset()
        sp = convert(model, args, kwargs, OSPConfig(num_full_blocks=2, sequence_parallel=mode))
        model.zero_grad()
        out = _first(sp(*args, **kwargs))
        (out * weight).sum().backward()
        errs = _grad_errors(_grads(model), g_ref)
        result[mode] = {"out": rel_err(out.detach(), out_ref.detach()), "grad": max(errs.values()),
                        "collectives": sp.osp_report.communication["collectives"]}
    return result


@pytest.mark.parametrize("name,world", [("reference", 2), ("reference", 4), ("reference-batch2", 2), ("diffusers", 2)])
def test_sequence_parallel_equals_single_process(tmp_path, name, world):
    if name == "diffusers":
        pytest.importorskip("diffusers")
    results = run_ranks(_sp_worker, world, tmp_path, name, ["ssp", "ulysses"], timeout_s=240)
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("trace")
        for mode in ("ssp", "ulysses"):
            assert res[mode]["out"] <= 1e-5, (rank, mode, res[mode])
            assert res[mode]["grad"] <= 1e-5, (rank, mode, res[mode])
        assert res["ssp"]["collectives"] == {"all_to_all": 2 * 4 + 2 + 1, "all_gather": 1}
        assert res["ulysses"]["collectives"] == {"all_to_all": 4 * 4, "all_gather": 1}


def _dead_rank_worker(rank, world):
    if rank == 1:
        die_now({"left": True})  # never arrives at the first collective
    model, args, kwargs, _ = _build("reference")
    start = time.time()
    try:
        convert(model, args, kwargs, OSPConfig(num_full_blocks=2, sequence_parallel="ssp"))
    except Exception as exc:
        die_now({"error_seen": f"{type(exc).__name__}: {exc}"[:2000], "seconds": time.time() - start})
    die_now({"no_error": True})


def test_a_missing_rank_ends_the_others_with_a_clear_error(tmp_path):
    results = run_ranks(_dead_rank_worker, 2, tmp_path, timeout_s=20)
    assert results[1] == {"left": True}
    msg = results[0].get("error_seen", "")
    assert "sequence-parallel collective failed in forward on rank 0 of 2" in msg, results[0]
    assert results[0]["seconds"] < 120


def _skipped_backward_worker(rank, world):
    model, args, kwargs, _ = _build("reference")
    sp = convert(model, args, kwargs, OSPConfig(num_full_blocks=2, sequence_parallel="ssp"))
    loss = _first(sp(*args, **kwargs)).square().mean()  # the forward's collectives pair up on both ranks
    if rank == 1:
        die_now({"left": True})  # never runs its backward
    start = time.time()
    try:
        with sp.collective_errors():
            loss.backward()
    except Exception as exc:
        die_now({"error_seen": f"{type(exc).__name__}: {exc}"[:2000], "seconds": time.time() - start})
    die_now({"no_error": True})


def test_a_rank_that_skips_backward_ends_the_others_with_a_clear_error(tmp_path):
    results = run_ranks(_skipped_backward_worker, 2, tmp_path, timeout_s=20)
    assert results[1] == {"left": True}, results[1]
    msg = results[0].get("error_seen", "")
    assert msg.startswith("OSPError: sequence-parallel collective failed in backward on rank 0 of 2"), results[0]
    assert "Every rank must run the same backward" in msg
    assert results[0]["seconds"] < 120


def test_communication_counts_from_the_sid_formula():
    """On a ragged grid the ranks of a packed layout hold different token counts: the final
    all-gather sends the largest shard from every rank; a switch sends exactly the tokens whose
    owner changes. Expected numbers come from skiparse.md's sid formula, not the routing tables."""
    import numpy as np

    from osp_compile.communication import relayout_collective

    grid, p, world, rest, item = (3, 6, 10), 2, 2, 8, 4  # H = 6, W = 10: subsequences 72/48/36/24 tokens
    t, y, x = np.meshgrid(*(np.arange(g) for g in grid), indexing="ij")
    sid = {"token": (y % p) * p + x % p, "group": ((y // p) % p) * p + (x // p) % p}
    owner = {k: (v // (p * p // world)).reshape(-1) for k, v in sid.items()}
    held = [int((owner["group"] == r).sum()) for r in range(world)]
    assert held[0] != held[1]
    gather = relayout_collective("group", "full", (1, 180, rest), item, grid, p, world, None)
    assert gather.bytes_per_rank == [max(held) * rest * item * (world - 1)] * world
    switch = relayout_collective("token", "group", (1, 180, rest), item, grid, p, world, None)
    moving = [int(((owner["token"] == r) & (owner["group"] != r)).sum()) for r in range(world)]
    assert switch.bytes_per_rank == [m * rest * item for m in moving]


class _Breaking(torch.nn.Module):
    """A block behind a Dynamo graph break: the forward becomes several graphs."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, *args):
        torch._dynamo.graph_break()
        return self.block(x, *args)


def _graph_break_worker(rank, world):
    model = build_model("tiny", num_layers=4, seed=1)
    model.blocks[2] = _Breaking(model.blocks[2])
    args, kwargs = make_inputs(PRESETS["tiny"], seed=2)
    config = OSPConfig(layout="all_sparse", grid=(3, 6, 10))
    with torch.no_grad():
        ref = convert(model, args, kwargs, config)(*args, **kwargs)
        torch._dynamo.reset()
        out = convert(model, args, kwargs, config.replace(sequence_parallel="ssp"))(*args, **kwargs)
    torch._dynamo.reset()
    try:
        convert(model, args, kwargs, config.replace(sequence_parallel="ssp"))(*args, **kwargs).sum().backward()
        refused = ""
    except Exception as exc:
        refused = str(exc)
    return {"out": rel_err(out, ref), "refused": refused[:1000]}


def test_graph_breaks_keep_inference_exact_and_refuse_inexact_training(tmp_path):
    """Across graph breaks SP outputs stay exact; training is refused clearly (its gradients would
    not be: 2x the head's gradient on 2 ranks before the guard)."""
    for res in run_ranks(_graph_break_worker, 2, tmp_path, timeout_s=240):
        assert "error" not in res, res.get("trace")
        assert res["out"] <= 1e-5
        assert "SP gradients are exact only within one graph" in res["refused"]


def test_joint_attention_models_refuse_sp_or_run_replicated_as_asked():
    pytest.importorskip("diffusers")
    from osp_compile.errors import OSPUnsupportedError
    from osp_compile.models import load

    model, args, kwargs = load("diffusers:CogVideoX")
    config = OSPConfig(layout="all_sparse", sequence_parallel="ssp", sp_group=PlanningGroup(2))
    with pytest.raises(Exception, match="joint text\\+video attention, which SSP/Ulysses do not shard yet") as info:
        plan(model, args, kwargs, config)
    assert isinstance(info.value, OSPUnsupportedError) or "OSPUnsupportedError" in str(info.value)
    report = plan(model, args, kwargs, config.replace(on_unsupported="skip"))
    summaries = {p.name: p.summary for g in report.graphs for p in g.passes}
    assert "running replicated on every rank" in summaries["token_layout"]
    assert "gradients are already whole" in summaries["sp_grad_sync"]  # no all-reduce: no S-fold gradients


def _second_resolution_worker(rank, world):
    model = build_model("tiny", num_layers=4, seed=1)
    inputs = [make_inputs(PRESETS["tiny"], seed=2), make_inputs(PRESETS["tiny"], latent_shape=(3, 8, 12), seed=3)]
    config = OSPConfig(num_full_blocks=2)
    refs = []
    for args, kwargs in inputs:  # single process, one conversion per resolution
        torch._dynamo.reset()
        model.zero_grad()
        out = convert(model, args, kwargs, config)(*args, **kwargs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        (out * weight).sum().backward()
        refs.append((out.detach(), weight, _grads(model)))
    torch._dynamo.reset()
    sp = convert(model, *inputs[0], config.replace(sequence_parallel="ssp"))
    result = []
    for (args, kwargs), (out_ref, weight, g_ref) in zip(inputs, refs):  # the second call recompiles
        model.zero_grad()
        out = sp(*args, **kwargs)
        (out * weight).sum().backward()
        result.append({"out": rel_err(out.detach(), out_ref), "grad": max(_grad_errors(_grads(model), g_ref).values())})
    return result


def test_ssp_training_at_a_second_resolution_equals_single_process(tmp_path):
    """A recompilation for another resolution is a whole forward again: trained under SSP it gives
    the single-process outputs and gradients (the guard against split forwards lets it through)."""
    for res in run_ranks(_second_resolution_worker, 2, tmp_path, timeout_s=240):
        assert "error" not in res, res.get("trace")
        assert all(r["out"] <= 1e-5 and r["grad"] <= 1e-5 for r in res), res


def test_sp_training_guard_allows_recompiles_and_refuses_split_forwards():
    """Keyed by the trained parameters: a recompilation of the same forward (a second resolution)
    trains the same ones and passes; a graph that trains others is a split forward and is refused."""
    from types import SimpleNamespace

    from osp_compile.errors import OSPUnsupportedError
    from passes.sp_grad_sync import _refuse_split_training

    ctx = SimpleNamespace(state={}, config=OSPConfig(sequence_parallel="ssp"))
    whole = frozenset({"blocks.0.self_attn.q.weight", "head.weight"})
    with torch.enable_grad():
        _refuse_split_training(ctx, whole)
        _refuse_split_training(ctx, whole)  # the same forward, recompiled
        with torch.no_grad():
            _refuse_split_training(ctx, frozenset({"head.weight"}))  # inference: never refused
        with pytest.raises(OSPUnsupportedError, match="exact only within one graph"):
            _refuse_split_training(ctx, frozenset({"head.weight"}))
