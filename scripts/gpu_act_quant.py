"""Speed of the HiF8 activation passes alone, at the Wan-14B 720P shapes. Run on a CUDA machine:

    python scripts/gpu_act_quant.py [--out result.json]

The passes a HiF8 FP8 linear runs before its GEMM (``osp_compile/hif8/triton_fp8.py``): the max of
an activation, standalone (torch's, the in-graph one compiled by Inductor, Triton's) and of a GELU
output, and the quantize pass with and without the GELU prologue.  Inputs: a block's 75,600 x
5,120 activation and 75,600 x 13,824 FFN1 output, random bfloat16.  Medians of CUDA-event
timings; GB/s counts the bytes each pass must move.  Kernels timed alone run before the power cap
bites (BENCHMARKS.md): compare rows, not the step.  Prints a table last; ``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gpu_hif8 import median_ms  # noqa: E402

TOKENS, DIM, FFN = 75600, 5120, 13824


def rows() -> list[dict]:
    from osp_compile.hif8.triton_fp8 import absmax_triton, quantize_act_e4m3_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    h = torch.randn(TOKENS, FFN, device="cuda", dtype=torch.bfloat16, generator=g) * 1.5
    amax_x, amax_h = absmax_triton(x), absmax_triton(h, "tanh")
    inductor_amax = torch.compile(lambda t: torch.amax(torch.amax(torch.abs(t), -1)))
    cases = [  # (pass, input, bytes moved per element, fn)
        ("roofline: torch x.to(float8_e4m3fn)", x, 3, lambda: x.to(torch.float8_e4m3fn)),
        ("roofline: torch x.clone()", x, 4, lambda: x.clone()),
        ("max|x|, torch vector_norm(inf)", x, 2, lambda: torch.linalg.vector_norm(x, float("inf"))),
        ("max|x|, Inductor (the in-graph max, standalone)", x, 2, lambda: inductor_amax(x)),
        ("max|x|, Triton", x, 2, lambda: absmax_triton(x)),
        ("quantize x (max given)", x, 3, lambda: quantize_act_e4m3_triton(x, 15.0, amax_x)),
        ("max|GELU(h)|, Triton", h, 2, lambda: absmax_triton(h, "tanh")),
        ("quantize GELU(h) (max given)", h, 3, lambda: quantize_act_e4m3_triton(h, 15.0, amax_h, "tanh")),
        ("quantize GELU(h), erf (max given)", h, 3, lambda: quantize_act_e4m3_triton(h, 15.0, amax_h, "none")),
    ]
    out = []
    for name, t, per_element, fn in cases:
        ms = median_ms(fn, warmup=3, iters=20)
        out.append({"pass": name, "shape": list(t.shape), "ms": round(ms, 4),
                    "GB_per_s": round(t.numel() * per_element / ms / 1e6, 1)})
        print(f"  {name:48s} {ms:8.4f} ms", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{result['device']}, torch {result['torch']}\n| pass | shape | ms | GB/s |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['pass']} | {'x'.join(map(str, r['shape']))} | {r['ms']:.3f} | {r['GB_per_s']:.0f} |")


if __name__ == "__main__":
    main()
