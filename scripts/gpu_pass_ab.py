"""Same-run A/B of one pass: ``osp-hif8-fast`` compiled as the pipeline builds it and with the pass
patched back to what it did before, both beside dense + Inductor, timed in interleaved rounds
(`osp_compile.bench`), so that each round gives a paired ratio. The profiled step of each variant
says how long the GPU sat idle (the CPU not keeping up shows there, not in kernel times), and
``--cpu-ops`` prints the host's time per op.

Experiments (``--ab``):
* ``projection``: a packed sparse site's HiF8 output projection per length class
  (``passes/attention_projection.py``, ninth session) against the projection of the concatenated
  attention output (the pass patched to take plain linears only).
* ``dropout``: ``passes/identity_dropout.py`` (dropouts that drop nothing removed, so that
  diffusers' GELU + HiF8 linear pairs fuse) against the pipeline without it.

    python scripts/gpu_pass_ab.py --ab projection --layers 10 --rounds 6                 # 14B shape, 720P
    python scripts/gpu_pass_ab.py --ab dropout --preset cogvideox-5b --resolution 480p --layers 42 --rounds 3
    python scripts/gpu_pass_ab.py --preset wan-1.3b --resolution 480p --layers 30 --cpu-ops
    python scripts/gpu_pass_ab.py --preset tiny --frames 5 --device cpu --rounds 2        # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
from unittest import mock

import torch

import passes.attention_projection as attention_projection
import passes.identity_dropout as identity_dropout
from osp_compile import bench
from osp_compile.backend import osp_backend, report_for
from osp_compile.report import PassReport, format_table

EXPERIMENTS = {  # --ab -> (name of the pipeline's variant, name and patch of the variant before)
    "projection": ("hif8 projection per class", "hif8 projection on the concatenation",
                   lambda: mock.patch.object(attention_projection, "_PROJECTIONS", ("linear",))),
    "dropout": ("dropouts removed", "dropouts kept",
                lambda: mock.patch.object(identity_dropout, "identity_dropout_pass",
                                          lambda gm, ctx: (gm, PassReport("identity_dropout", "off")))),
}


def _rows_of(options: dict, pass_name: str) -> int:
    return sum(len(p.rows) for g in report_for(options).graphs for p in g.passes if p.name == pass_name)


def _cpu_ops(step) -> str:
    """The profiler's table of one step's ops by self CPU time: where the host spends a step when
    the GPU waits for it."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ab", choices=tuple(EXPERIMENTS), default="projection")
    ap.add_argument("--preset", default="wan-14b", help="a reference preset, or cogvideox-5b")
    ap.add_argument("--resolution", default="720p")
    ap.add_argument("--frames", type=int, default=None, help="default: the preset's (81; cogvideox-5b: 49)")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-ops", action="store_true", help="also print each variant's host-side time per op")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    work = bench.workload(a.preset, a.resolution, a.layers, a.frames, a.device, dtype)
    frames = work.frames
    full = bench.full_blocks_for(work.layers, a.preset, None)
    now, before, patch = EXPERIMENTS[a.ab]
    variants = {"dense-inductor": None, now: contextlib.nullcontext, before: patch}
    torch._dynamo.reset()
    live, counted = {}, {}
    for name, variant_patch in variants.items():
        options = {"sparse_ratio": 2, "layout": "dual_end", "num_full_blocks": full, "quant": "hif8-infer",
                   "fp8_fast_accum": a.device == "cuda", "target": a.device}
        if name == before:  # the same meaning ("auto" is the inputs' device), other options:
            options["target"] = "auto"  # Dynamo would otherwise reuse the graph compiled with equal ones
        with (variant_patch or contextlib.nullcontext)(), torch.no_grad():
            fn = (torch.compile(work.model, dynamic=False) if variant_patch is None
                  else torch.compile(work.model, backend=osp_backend, options=options, dynamic=False))
            step = functools.partial(fn, *work.args, **work.kwargs)
            step(), step()  # compile, then one warm-up step
        if variant_patch is not None:
            counted[name] = {p: _rows_of(options, p) for p in ("gelu_hif8_linear", "attention_projection")}
        live[name] = (bench.Row(name), step)
    bench._interleaved_rounds(live, bench.step_timer(a.device), a.iters, a.rounds, a.device, profile=a.device == "cuda",
                              progress=True)
    base = live["dense-inductor"][0].round_medians_ms
    result = {"ab": a.ab, "preset": a.preset, "resolution": a.resolution, "frames": frames, "layers": work.layers,
              "full_blocks": full, "rounds": a.rounds, "iters": a.iters, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "rows": []}
    for name, (row, _) in live.items():
        ratios = [b / t for b, t in zip(base, row.round_medians_ms)]
        timeline = row.breakdown.get("timeline") or {}
        result["rows"].append({"variant": name, "pass_rows": counted.get(name), "round_medians_ms": row.round_medians_ms,
                               "round_speedups": [round(r, 4) for r in ratios], "gpu_idle_ms": timeline.get("idle_ms"),
                               "largest_gaps": timeline.get("largest_gaps"), "note": row.note})
    if a.cpu_ops:
        for name, (_, step) in live.items():
            print(f"\n{name}: host-side time of one step's ops (self CPU, top 15)")
            print(_cpu_ops(step))
    print(f"{a.preset} {a.resolution} {frames} frames, {work.layers} blocks ({full} full), {result['device']}, "
          f"{a.rounds} interleaved rounds x {a.iters}")
    print(format_table([{"variant": r["variant"], "median ms": round(statistics.median(r["round_medians_ms"]), 1),
                         **bench._rounds_cell(result, r), "GPU idle ms (profiled step)": r["gpu_idle_ms"],
                         "pass rows": r["pass_rows"] or "-"} for r in result["rows"]]))
    if a.json:
        bench.dump(result, a.json)


if __name__ == "__main__":
    main()
