"""Same-run A/B of the HiF8 output projection per length class (``passes/attention_projection.py``).

``osp-hif8-fast`` compiled twice: as the pipeline now builds it (each packed sparse site's HiF8 output
projection applied per length class, with one max over the classes) and with HiF8 projections left on
the concatenated attention output, as before the ninth session (the pass patched to take plain
linears only while that variant compiles). Both beside dense + Inductor, timed in interleaved rounds
(`osp_compile.bench`), so each round gives a paired ratio.

    python scripts/gpu_projection_ab.py --layers 10 --rounds 6            # on a GPU: 14B shape, 720P
    python scripts/gpu_projection_ab.py --preset tiny --frames 5 --device cpu --rounds 2   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
from unittest import mock

import torch

import passes.attention_projection as attention_projection
from osp_compile import bench
from osp_compile.backend import osp_backend, report_for
from osp_compile.report import format_table
from reference_model import PRESETS, latent_shape, make_inputs

VARIANTS = {  # name -> (HiF8 osp options?, patch active while it compiles)
    "dense-inductor": (False, contextlib.nullcontext),
    "hif8 projection per class": (True, contextlib.nullcontext),
    "hif8 projection on the concatenation": (
        True, lambda: mock.patch.object(attention_projection, "_PROJECTIONS", ("linear",))),
}


def _projected_sites(options: dict) -> int:
    rows = [r for g in report_for(options).graphs for p in g.passes if p.name == "attention_projection" for r in p.rows]
    return sum(r["decision"].startswith("projected") for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan-14b")
    ap.add_argument("--resolution", default="720p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    cfg = PRESETS[a.preset]
    full = bench.full_blocks_for(a.layers, a.preset, None)
    model = bench.build(a.preset, a.layers, a.device, dtype)
    args, kwargs = make_inputs(cfg, latent_shape=latent_shape(a.resolution, a.frames), device=a.device, dtype=dtype)
    torch._dynamo.reset()
    live, projected = {}, {}
    for name, (hif8, patch) in VARIANTS.items():
        options = {"sparse_ratio": 2, "layout": "dual_end", "num_full_blocks": full, "quant": "hif8-infer",
                   "fp8_fast_accum": a.device == "cuda", "target": a.device}
        if name.endswith("concatenation"):  # the same meaning ("auto" is the inputs' device), other options:
            options["target"] = "auto"  # Dynamo would otherwise reuse the graph compiled with equal ones
        with patch(), torch.no_grad():
            fn = (torch.compile(model, backend=osp_backend, options=options, dynamic=False) if hif8
                  else torch.compile(model, dynamic=False))
            step = functools.partial(fn, *args, **kwargs)
            step(), step()  # compile, then one warm-up step
        if hif8:
            projected[name] = _projected_sites(options)
        live[name] = (bench.Row(name), step)
    bench._interleaved_rounds(live, bench.step_timer(a.device), a.iters, a.rounds, a.device, profile=False, progress=True)
    base = live["dense-inductor"][0].round_medians_ms
    result = {"preset": a.preset, "resolution": a.resolution, "frames": a.frames, "layers": a.layers,
              "full_blocks": full, "rounds": a.rounds, "iters": a.iters, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "rows": []}
    for name, (row, _) in live.items():
        ratios = [b / t for b, t in zip(base, row.round_medians_ms)]
        result["rows"].append({"variant": name, "sites_projected": projected.get(name), "round_medians_ms": row.round_medians_ms,
                               "round_speedups": [round(r, 4) for r in ratios], "note": row.note})
    print(f"{a.preset} {a.resolution} {a.frames} frames, {a.layers} blocks ({full} full), {result['device']}, "
          f"{a.rounds} interleaved rounds x {a.iters}")
    print(format_table([{"variant": r["variant"], "sites projected": "-" if r["sites_projected"] is None else r["sites_projected"],
                         "median ms": round(statistics.median(r["round_medians_ms"]), 1), **bench._rounds_cell(result, r)}
                        for r in result["rows"]]))
    if a.json:
        bench.dump(result, a.json)


if __name__ == "__main__":
    main()
