"""`osp-compile bench`: one denoising step, dense vs OSP, side by side (see osp_compile.bench)."""
from __future__ import annotations

import argparse

from ..bench import DEFAULT_VARIANTS, VARIANT_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="wan-1.3b",
                   help="reference preset: tiny, wan-1.3b, wan-14b; or cogvideox-5b / hunyuanvideo (diffusers' "
                        "CogVideoX at CogVideoX-5B's shape / HunyuanVideo at its own, random weights; needs diffusers)")
    p.add_argument("--resolution", default="480p", help="480p, 720p or 768p (cogvideox-5b: 480p, i.e. 480x720; hunyuanvideo: 720p "
                                                          "or 544p, i.e. 720x1280 or 544x960)")
    p.add_argument("--frames", type=int, default=None,
                   help="video frames, 4n + 1; unset: 81 (the goals' setting), 49 for cogvideox-5b, 129 "
                        "for hunyuanvideo")
    p.add_argument("--layers", type=int, default=None, help="layer-reduced model (the table says so)")
    p.add_argument("--num-full-blocks", type=int, default=None, help="default: the paper's 14B ratio, 8 of 40")
    p.add_argument("--sparse-ratio", type=int, default=2, help="P: P*P subsequences per frame grid")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated subset of: " + "; ".join(f"{v} ({h})" for v, h in VARIANT_HELP.items()))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) call")
    p.add_argument("--iters", type=int, default=5, help="timed steps (per round); the table gives their median")
    p.add_argument("--rounds", type=int, default=1,
                   help="1: time each variant right after compiling it. N > 1: compile all, keep them, then time "
                        "them in N interleaved rounds (A B, B A, ...) and show each round's ratio to the baseline")
    p.add_argument("--reference", default=None,
                   help="variant whose first-step output the others are compared with (column 'rel err'); "
                        "default dense-inductor, else dense-eager. E.g. osp-hif8-fast, beside osp-hif8-fast-graphs")
    p.add_argument("--device", default="cuda", help="cuda (timings to report) or cpu (smoke test only)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    p.add_argument("--json", default=None, help="write the result here (rewritten after each variant)")


def run(args: argparse.Namespace) -> int:
    from ..bench import dump, run as run_bench, table

    result = run_bench(args.preset, args.resolution, args.layers, args.num_full_blocks, args.sparse_ratio,
                       [v for v in args.variants.split(",") if v], args.warmup, args.iters, args.device,
                       profile=not args.no_profile, partial_json=args.json, rounds=args.rounds,
                       frames=args.frames, reference=args.reference)
    if args.json:
        dump(result, args.json)
    print(table(result))
    return 0 if all(r["median_ms"] for r in result["rows"]) else 1
