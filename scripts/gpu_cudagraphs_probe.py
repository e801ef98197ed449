"""Probe: Inductor's CUDA graphs (``triton.cudagraphs``) on the osp HiF8 graph of a short-step model.

A CUDA graph replays the whole step's kernels with one launch, so the host's time per op (a HiF8
linear costs it about 10x a bf16 one: `gpu_host_cost.py`) leaves the step. The op is not
graph-safe as it stands: Inductor refuses to record a graph while tensors made inside the graph's
pool outlive it, and the op makes two kinds of them. It transcodes the E4M3 weights on first use,
and it keeps the last quantized activation so that q, k and v quantize it once. This probe works
around both to learn what graphs would give. Activation reuse is off in both OSP variants. One
backend session serves both, and the variant without graphs runs first, so the E4M3 weights
already exist when the graphed variant records. Each OSP variant is timed against dense +
Inductor in interleaved rounds (`osp_compile.bench`), with the GPU idle time of its profiled step.

    python scripts/gpu_cudagraphs_probe.py --layers 21 --json $OUT/cudagraphs.json
"""
from __future__ import annotations

import argparse
import functools
import statistics

import torch

from osp_compile import OSPConfig, bench
from osp_compile.backend import OSPBackend
from osp_compile.hif8 import fp8
from osp_compile.report import format_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cogvideox-5b", help="a bench preset (short steps show the host's time)")
    ap.add_argument("--resolution", default="480p")
    ap.add_argument("--layers", type=int, default=21)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    fp8.fp8_linear = functools.partial(fp8.fp8_linear, reuse_activation=False)  # no run-time cache
    work = bench.workload(a.preset, a.resolution, a.layers, None, "cuda", torch.bfloat16)
    full = bench.full_blocks_for(work.layers, a.preset, None)
    session = OSPBackend(OSPConfig(sparse_ratio=2, layout="dual_end", num_full_blocks=full, quant="hif8-infer",
                                   fp8_fast_accum=True))

    def plain(gm, example_inputs):
        return session(gm, example_inputs)

    def graphed(gm, example_inputs):
        with torch._inductor.config.patch({"triton.cudagraphs": True}):
            return session(gm, example_inputs)

    live = {}
    for name, backend in [("dense-inductor", "inductor"), ("osp-hif8-fast, no reuse", plain),
                          ("osp-hif8-fast, no reuse, CUDA graphs", graphed)]:
        with torch.no_grad():
            step = functools.partial(torch.compile(work.model, backend=backend, dynamic=False), *work.args, **work.kwargs)
            for _ in range(3):  # compile, warm up, record
                step()
        live[name] = (bench.Row(name), step)
    with torch.no_grad():  # the same graph with and without CUDA graphs (Inductor may tune each alike or not)
        want = live["osp-hif8-fast, no reuse"][1]()[0].float()
        got = live["osp-hif8-fast, no reuse, CUDA graphs"][1]()[0].float()
    rel = ((got - want).norm() / want.norm()).item()
    bench._interleaved_rounds(live, bench.step_timer("cuda"), a.iters, a.rounds, "cuda", profile=True, progress=True)
    base = live["dense-inductor"][0].round_medians_ms
    rows = []
    for name, (row, _) in live.items():
        ratios = [round(b / t, 4) for b, t in zip(base, row.round_medians_ms)]
        rows.append({"variant": name, "median ms": round(statistics.median(row.round_medians_ms), 1),
                     "x per round": ratios, "GPU idle ms (profiled step)": (row.breakdown.get("timeline") or {}).get("idle_ms"),
                     "note": row.note[:120]})
    print(f"{a.preset} {a.resolution}, {work.layers} blocks ({full} full), {torch.cuda.get_device_name()}, "
          f"{a.rounds} interleaved rounds x {a.iters}; output with / without CUDA graphs: rel. difference {rel:.2e}, "
          f"bitwise equal: {torch.equal(got, want)}")
    print(format_table(rows))
    if a.json:
        bench.dump({"preset": a.preset, "layers": work.layers, "full_blocks": full, "torch": torch.__version__,
                    "rel_difference": rel, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
