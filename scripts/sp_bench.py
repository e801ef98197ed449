"""Sequence-parallel check and benchmark: SSP vs Ulysses (vs one GPU), launched with torchrun.

    torchrun --nproc-per-node 4 scripts/sp_bench.py --preset wan-1.3b --resolution 480p --modes ssp,ulysses
    torchrun --nproc-per-node 8 scripts/sp_bench.py --preset wan-14b --resolution 720p --sp-size 4   # 4-way SP x 2-way DP

--check first runs the tiny model in float32 and compares every rank's SP output and parameter
gradients with the single-process converted module, plain and with HiF8 QAT (the NCCL equality
check). Then, per mode, one denoising step
(forward, bf16, random weights) is timed: median over iterations after warm-up, CUDA events, with
the bytes each rank sends per step read from the report. With --sp-size S < world size, ranks form
world/S data-parallel replicas, each running its own sample over its own S-rank SP group.
Rank 0 prints a table last and writes JSON (to $OUT/sp_bench.json when OUT is set).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan-1.3b")
    p.add_argument("--resolution", default="480p", help="480p, 720p, 768p, or 'default' (the preset's small video)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--num-full-blocks", type=int, default=None)
    p.add_argument("--layout", default="dual_end", help="dual_end, uniform, all_sparse, dense")
    p.add_argument("--sparse-ratio", type=int, default=2)
    p.add_argument("--modes", default="ssp,ulysses")
    p.add_argument("--sp-size", type=int, default=None, help="ranks per SP group (default: all)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    p.add_argument("--check", action="store_true", help="tiny-model equality check against one process first")
    p.add_argument("--device", default="cuda")
    return p.parse_args()


def sp_group(world: int, rank: int, size: int):
    """This rank's SP group: consecutive ranks [k*size, (k+1)*size)."""
    mine = None
    for start in range(0, world, size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = g
    return mine


def check(device: str, group) -> dict:
    """Max rel. error of the SP module against the single-process one (tiny model, float32): outputs
    for SSP and Ulysses; for HiF8 QAT + SSP also every parameter gradient (global scales)."""
    from osp_compile import OSPConfig, convert
    from osp_compile.oracle import rel_err
    from reference_model import PRESETS, build_model, make_inputs

    model = build_model("tiny", num_layers=4, seed=1, device=device)
    args, kwargs = make_inputs(PRESETS["tiny"], seed=2, device=device)
    errs = {}
    for quant in (None, "hif8"):
        base = OSPConfig(num_full_blocks=2, quant=quant)
        torch._dynamo.reset()
        model.zero_grad()
        ref_mod = convert(model, args, kwargs, base)
        ref = ref_mod(*args, **kwargs)
        ref.square().mean().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for mode in ("ssp", "ulysses"):
            torch._dynamo.reset()
            model.zero_grad()
            out = convert(model, args, kwargs, base.replace(sequence_parallel=mode, sp_group=group))(*args, **kwargs)
            out.square().mean().backward()
            key = f"{quant or 'float32'} {mode}"
            errs[key + " output"] = rel_err(out, ref)
            errs[key + " grads"] = max(rel_err(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads)
    return errs


def main() -> None:
    a = parse()
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = a.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    size = a.sp_size or world
    group = sp_group(world, rank, size)
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"world": world, "sp_size": size, "dp": world // size, "preset": a.preset, "resolution": a.resolution,
              "torch": torch.__version__, "rows": []}
    if a.check:
        torch.backends.cudnn.allow_tf32 = False
        errs = [None] * world
        dist.all_gather_object(errs, check(device, group))
        result["check"] = {k: max(e[k] for e in errs) for k in errs[0]}
        result["check_max_rel_err"] = max(result["check"].values())

    from osp_compile.backend import osp_backend
    from osp_compile.bench import build, full_blocks_for, step_timer
    from reference_model import PRESETS, make_inputs

    cfg = PRESETS[a.preset]
    layers = a.layers or cfg.num_layers
    full = full_blocks_for(layers, a.preset, a.num_full_blocks)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = step_timer(device)
    model = build(a.preset, a.layers, device, dtype)
    # each data-parallel replica gets its own sample
    resolution = None if a.resolution == "default" else a.resolution
    args, kwargs = make_inputs(cfg, resolution=resolution, device=device, dtype=dtype, seed=rank // size)
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        options = {"sparse_ratio": a.sparse_ratio, "layout": a.layout, "num_full_blocks": full, "inner": a.inner}
        if mode != "single":
            options.update(sequence_parallel=mode, sp_group=group)
        compiled = torch.compile(model, backend=osp_backend, options=options, dynamic=False)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            for _ in range(a.warmup):
                compiled(*args, **kwargs)
            times = []
            for _ in range(a.iters):
                dist.barrier()  # every rank starts the step together
                times.append(timer(lambda: compiled(*args, **kwargs)))
        from osp_compile.backend import report_for

        comm = report_for(options).communication or {}
        med = statistics.median(times)
        meds = [None] * world
        dist.all_gather_object(meds, med)
        result["rows"].append({"mode": mode, "median_ms": round(max(meds), 2), "compile_s": round(compile_s, 1),
                               "collectives": comm.get("collectives", {}),
                               "MB_sent_per_rank": round(comm.get("bytes_per_rank_mean", 0) / 1e6, 1)})
    if rank == 0:
        base = next((r["median_ms"] for r in result["rows"] if r["mode"] == "ulysses"), None)
        for r in result["rows"]:
            r["x_vs_ulysses"] = round(base / r["median_ms"], 3) if base else None
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, f"sp_bench_{world}gpu_{a.preset}_{a.resolution}_{a.inner}.json"), "w") as f:
                json.dump(result, f, indent=2)
        print(f"{a.preset} {a.resolution}, {layers} blocks ({a.layout}, {full} full), P={a.sparse_ratio}, world {world} = "
              f"{world // size} DP x {size} SP, torch {torch.__version__}"
              + (f", {dist.get_backend()} equality check max rel err {result['check_max_rel_err']:.2e}" if a.check else ""))
        for k, v in result.get("check", {}).items():
            print(f"  check {k}: max rel err over ranks {v:.2e}")
        print(f"{'mode':8} {'median ms':>10} {'x vs Ulysses':>13} {'MB sent/rank':>13}  collectives")
        for r in result["rows"]:
            print(f"{r['mode']:8} {r['median_ms']:>10} {str(r['x_vs_ulysses']):>13} {r['MB_sent_per_rank']:>13}  {r['collectives']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
