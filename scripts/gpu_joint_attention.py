"""Speed of a sparse joint text+video attention site alone, at CogVideoX-5B's shape. Run on CUDA:

    python scripts/gpu_joint_attention.py [--out result.json] [--compare module:function]

One attention call over 226 text tokens followed by the video tokens of a 480x720, 49-frame
video (latent grid 13 x 30 x 45, which a P*P = 4 fold would pad to 32 x 48), 48 heads of 64,
bfloat16, batch 1, each timed with the heads merged afterwards (``transpose(1, 2).reshape``, what
a model does next: a copy or a view, by the output's layout). ``--layout`` sets how q, k and v lie
in memory: ``head`` ([B, heads, N, D] contiguous) or ``token`` (the projection's [B, N, heads, D]
transposed, as diffusers' models hand them over when no per-head norm copies them).
Rows: dense attention over the joined sequence (what the model runs), the
same attention under the Skiparse joint mask (the oracle's way, never used to compute: it costs as
much as dense), and `osp::skiparse_joint_attention` per pattern, forward and forward + backward.
``--compare`` adds another function with the op's signature (e.g. an earlier version of it).
Medians of CUDA-event timings; a kernel timed alone runs before the power cap bites
(BENCHMARKS.md): compare rows, not whole steps. Prints a table last; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_hif8 import median_ms, rel  # noqa: E402

GRID, P, TEXT, HEADS, HEAD_DIM = (13, 30, 45), 2, 226, 48, 64


def _inputs(n: int, layout: str, generator=None) -> list:
    shape = (1, HEADS, n, HEAD_DIM) if layout == "head" else (1, n, HEADS, HEAD_DIM)
    xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3)]
    return xs if layout == "head" else [x.transpose(1, 2) for x in xs]


def _merged(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _timed(fn, q, k, v) -> dict:
    def backward():
        for t in (q, k, v):
            t.grad = None
        _merged(fn()).backward(grad)

    with torch.no_grad():
        forward_ms = median_ms(lambda: _merged(fn()), warmup=3, iters=10)
    grad = torch.randn_like(_merged(fn()))
    return {"forward_ms": round(forward_ms, 3), "forward_backward_ms": round(median_ms(backward, warmup=2, iters=10), 3)}


def rows(compare: str | None, layout: str) -> list[dict]:
    from osp_compile.joint_attention import skiparse_joint_attention
    from osp_compile.oracle import joint_skiparse_mask

    n = TEXT + GRID[0] * GRID[1] * GRID[2]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (x.detach().requires_grad_() for x in _inputs(n, layout, g))
    cases = [("dense attention (no sparsity)", None, lambda: F.scaled_dot_product_attention(q, k, v))]
    extra = None
    if compare:
        module, _, attr = compare.partition(":")
        extra = getattr(importlib.import_module(module), attr)
    for pattern in ("token", "group"):
        mask = joint_skiparse_mask(GRID, P, pattern, TEXT, TEXT).cuda()
        with torch.no_grad():  # the masked dense attention of this pattern in float32, 4 heads: the error's reference
            ref = F.scaled_dot_product_attention(*(t[:, :4].float() for t in (q, k, v)), attn_mask=mask)
        cases.append((f"{pattern}-wise: dense under the joint mask", ref,
                      lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        cases.append((f"{pattern}-wise: osp::skiparse_joint_attention", ref,
                      lambda pattern=pattern: skiparse_joint_attention(q, k, v, None, *GRID, P, pattern, TEXT)))
        if extra is not None:
            cases.append((f"{pattern}-wise: {compare}", ref,
                          lambda pattern=pattern: extra(q, k, v, None, *GRID, P, pattern, TEXT)))
    out = []
    for name, ref, fn in cases:
        row = {"attention": name, **_timed(fn, q, k, v)}
        if ref is not None:
            with torch.no_grad():
                row["rel_err_vs_mask_fp32"] = float(f"{rel(fn()[:, :4].float(), ref):.2e}")
        out.append(row)
        print(f"  {name:56s} {row['forward_ms']:8.3f} ms  {row['forward_backward_ms']:8.3f} ms", flush=True)
    return out


def profile_op(layout: str) -> None:
    """Where one forward of the op spends its time: the profiler's kernel table, and the wall time
    against the summed kernel time (their difference is launch overhead and gaps)."""
    from torch.profiler import ProfilerActivity, profile

    from osp_compile.joint_attention import skiparse_joint_attention

    n = TEXT + GRID[0] * GRID[1] * GRID[2]
    q, k, v = _inputs(n, layout)
    for pattern in ("token", "group"):
        def op():
            return _merged(skiparse_joint_attention(q, k, v, None, *GRID, P, pattern, TEXT))

        with torch.no_grad():
            median_ms(op, warmup=3, iters=3)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                op()
                torch.cuda.synchronize()
        print(f"\n{pattern}-wise, one forward:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--compare", help="module:function with the op's signature, timed beside it")
    parser.add_argument("--profile", action="store_true",
                        help="also print the GPU kernels of one forward of the op per pattern (torch profiler)")
    parser.add_argument("--layout", choices=("head", "token"), default="head",
                        help="q, k, v in memory: [B, heads, N, D] contiguous, or [B, N, heads, D] transposed")
    args = parser.parse_args()
    if args.profile:
        profile_op(args.layout)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layout": args.layout,
              "rows": rows(args.compare, args.layout)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{result['device']}, torch {result['torch']}, grid {GRID}, text {TEXT}, {HEADS} heads of {HEAD_DIM}, "
          f"bf16, {args.layout}-major q, k, v")
    print("| attention | forward ms | forward + backward ms | rel. err vs masked fp32 |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['attention']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | "
              f"{r.get('rel_err_vs_mask_fp32', '-')} |")


if __name__ == "__main__":
    main()
