"""Would a second CUDA stream shorten the Wan-14B 720P HiF8 block? A probe, run on CUDA:

    python scripts/gpu_overlap_probe.py [--out result.json]

Issue 7's remaining distance (0.2%) is below what any single memory-bound kernel of the step can
still give by being faster (BENCHMARKS.md). Overlap is the other way: a memory-bound kernel
running beside a compute-bound one on another stream, if the compute-bound one leaves SMs free
(cuBLAS and cuDNN launch waves of CTAs; a persistent kernel would leave none). Three sequences
of the sparse block, each timed plain and with the memory-bound work on a side stream:

* ``qkv``: the FP8 q, k, v GEMMs (``torch._scaled_mm``, fast accumulation) with the q and k
  RMSNorm + RoPE (our Triton kernel) after q and k; side stream: q's norm beside k's GEMM, k's
  beside v's.
* ``classes``: a sparse site's two length classes (cuDNN through SDPA, [2, 40, 19320 | 18480, 128]);
  side stream: the second class beside the first.
* ``class max``: the same two classes, each followed by ``max|o|`` (the o-projection's scale);
  side stream: the first class's max beside the second class's attention.

Rounds alternate plain and overlapped so that the power-capped clock drifts alike for both; each
timing is one batch of repeats (about 2 s, long enough for the cap to bite). Prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOKENS, DIM, HEADS, HEAD_DIM = 75600, 5120, 40, 128
CLASSES = (19320, 18480)


def _batch_ms(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _paired(plain, overlapped, repeats: int, rounds: int) -> dict:
    for fn in (plain, overlapped):  # warm-up (and Triton autotuning)
        fn()
        fn()
    pairs = []
    for r in range(rounds):
        order = (plain, overlapped) if r % 2 == 0 else (overlapped, plain)
        times = {fn: _batch_ms(fn, repeats) for fn in order}
        pairs.append((times[plain], times[overlapped]))
    ratios = sorted(o / p for p, o in pairs)
    middle = rounds // 2
    return {"plain_ms": sorted(p for p, _ in pairs)[middle], "overlapped_ms": sorted(o for _, o in pairs)[middle],
            "overlapped_over_plain": ratios[middle], "range": [ratios[0], ratios[-1]]}


def _on_side(side: torch.cuda.Stream, fn, *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)`` on ``side`` once the current stream's work so far is done."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn(*inputs)
    for t in inputs:
        t.record_stream(side)
    return out


def qkv_probe(side, repeats, rounds) -> dict:
    from osp_compile.lowering.cuda_norm_rope import rms_norm_rope_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    x8 = torch.randn(TOKENS, DIM, device="cuda", generator=g).clamp(-15, 15).to(torch.float8_e4m3fn)
    ws = [(torch.randn(DIM, DIM, device="cuda", generator=g) * 3).to(torch.float8_e4m3fn) for _ in range(3)]
    one = torch.ones((), device="cuda")
    norm_w = torch.rand(DIM, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    angles = torch.rand(TOKENS, 1, HEAD_DIM, device="cuda", generator=g) * 6
    cos, sin = angles.cos(), angles.sin()

    def gemm(w):
        return torch._scaled_mm(x8, w.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)

    def norm(t):
        return rms_norm_rope_triton(t, norm_w, 1e-6, cos, sin, HEADS)

    def plain():
        q = norm(gemm(ws[0]))
        k = norm(gemm(ws[1]))
        return q, k, gemm(ws[2])

    def overlapped():
        q = _on_side(side, norm, gemm(ws[0]))
        k = _on_side(side, norm, gemm(ws[1]))
        v = gemm(ws[2])
        torch.cuda.current_stream().wait_stream(side)
        return q, k, v

    ref, got = plain(), overlapped()
    assert all(torch.equal(a, b) for a, b in zip(ref, got)), "overlapped qkv differs from plain"
    return _paired(plain, overlapped, repeats, rounds)


def _class_inputs(g):
    return [[torch.randn(2, HEADS, n, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]
            for n in CLASSES]


def classes_probe(side, repeats, rounds, with_max: bool) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = _class_inputs(g)

    def attend(i):
        return F.scaled_dot_product_attention(*inputs[i])

    def amax(o):
        return torch.linalg.vector_norm(o, float("inf"))

    def plain():
        a = attend(0)
        ma = amax(a) if with_max else None
        b = attend(1)
        return a, b, torch.maximum(ma, amax(b)) if with_max else None

    def overlapped():
        if with_max:
            a = attend(0)
            ma = _on_side(side, amax, a)
            b = attend(1)
            mb = amax(b)
            torch.cuda.current_stream().wait_stream(side)
            return a, b, torch.maximum(ma, mb)
        a = attend(0)
        b = _on_side(side, lambda: attend(1))
        torch.cuda.current_stream().wait_stream(side)
        return a, b, None

    ref, got = plain(), overlapped()
    assert all((r is None and o is None) or torch.equal(r, o) for r, o in zip(ref, got)), "overlap changed the result"
    return _paired(plain, overlapped, repeats, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    side = torch.cuda.Stream()
    rows = {}
    with torch.no_grad():
        rows["qkv (3 FP8 GEMMs + 2 norm-RoPE)"] = qkv_probe(side, repeats=200, rounds=args.rounds)
        rows["classes (2 cuDNN attentions)"] = classes_probe(side, repeats=40, rounds=args.rounds, with_max=False)
        rows["class max (2 attentions + 2 maxima)"] = classes_probe(side, repeats=40, rounds=args.rounds, with_max=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{'sequence':40s} {'plain ms':>10s} {'overlap ms':>11s} {'overlap/plain (min-max)':>26s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['plain_ms']:10.3f} {r['overlapped_ms']:11.3f} "
              f"{r['overlapped_over_plain']:10.4f} ({r['range'][0]:.4f}-{r['range'][1]:.4f})")


if __name__ == "__main__":
    main()
