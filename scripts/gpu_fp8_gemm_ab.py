"""Same graph, two FP8 GEMMs: ``torch._scaled_mm`` against cuBLASLt with a timed algorithm choice
(``hif8/cublaslt.py``), in the Wan-14B 720P HiF8 step, on CUDA:

    python scripts/gpu_fp8_gemm_ab.py --layers 10 --rounds 6 [--dense] [--out result.json]

``osp-hif8-fast`` is compiled once; ``fp8.GEMM`` is read by ``osp_cuda::fp8_mm`` at run time, so
rounds alternate it (A B, B A, ...) on the same compiled step and each round gives a paired ratio.
``--dense`` adds dense + Inductor to the rounds (the bench's baseline), so each round also gives
both speedups.  The first cuBLASLt step times each GEMM shape's candidates (printed with the
choice).  The two steps' outputs are compared.  Prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="wan-14b")
    parser.add_argument("--resolution", default="720p")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="time dense + Inductor in the rounds too")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from osp_compile import bench
    from osp_compile.backend import osp_backend
    from osp_compile.hif8 import cublaslt, fp8

    work = bench.workload(args.preset, args.resolution, args.layers, None, "cuda", torch.bfloat16)
    full = bench.full_blocks_for(work.layers, args.preset, None)
    opts = {"sparse_ratio": 2, "layout": "dual_end", "num_full_blocks": full, **bench.BACKEND_OPTIONS["osp-hif8-fast"]}
    model = torch.compile(work.model, backend=osp_backend, options=opts, dynamic=False)

    def step():
        return model(*work.args, **work.kwargs)

    timer = bench.step_timer("cuda")
    outs, times = {}, {"scaled_mm": [], "cublaslt": []}
    steps = {"scaled_mm": step, "cublaslt": step}
    with torch.no_grad():
        for gemm in times:  # compile, then the cuBLASLt tuning, then a warm-up each
            fp8.GEMM = gemm
            outs[gemm] = step().float()
            step()
        if args.dense:
            dense = torch.compile(work.model, dynamic=False)
            steps["dense"], times["dense"] = (lambda: dense(*work.args, **work.kwargs)), []
            steps["dense"]()
            steps["dense"]()
        order = list(times)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                fp8.GEMM = "cublaslt" if name == "dense" else name
                times[name].append(statistics.median(timer(steps[name]) for _ in range(args.iters)))
    ratios = sorted(b / a for a, b in zip(times["scaled_mm"], times["cublaslt"]))
    speedups = {g: sorted(d / t for d, t in zip(times["dense"], times[g])) for g in ("scaled_mm", "cublaslt")} \
        if args.dense else {}
    diff = (outs["cublaslt"] - outs["scaled_mm"]).abs().max().item()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": work.layers,
              "full_blocks": full, "times_ms": times, "cublaslt_over_scaled_mm": ratios,
              "speedups_vs_dense_inductor": speedups, "max_abs_diff": diff, "tuning": cublaslt.tuning_report()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    for t in result["tuning"]:
        print(t)
    print(f"outputs: max |diff| {diff:.3g}")

    def cell(values: list) -> str:
        v = sorted(values)
        return f"{statistics.median(v):.4f} ({v[0]:.4f}-{v[-1]:.4f})"

    print(f"| {args.preset} {args.resolution}, {work.layers} blocks ({full} full), HiF8 fast-accum, {args.rounds} "
          "rounds | step ms (median) | x vs dense + Inductor: median (min-max) | vs _scaled_mm |")
    print("|---|---|---|---|")
    if args.dense:
        print(f"| dense + Inductor | {statistics.median(times['dense']):.1f} | 1 | |")
    for name in ("scaled_mm", "cublaslt"):
        print(f"| OSP + HiF8, FP8 GEMMs by {name} | {statistics.median(times[name]):.1f} | "
              f"{cell(speedups[name]) if speedups else '-'} | {cell(ratios) if name == 'cublaslt' else 1} |")


if __name__ == "__main__":
    main()
