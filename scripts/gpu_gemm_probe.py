"""Two questions about the Wan-14B 720P block's GEMMs, probed on CUDA:

    python scripts/gpu_gemm_probe.py [--out result.json]

1. Would one GEMM for q, k and v beat three? They read one activation (75,600 x 5120). As three
   GEMMs (what dense + Inductor and the OSP graph run) it is read three times and each GEMM has its
   own launch and tail wave; one GEMM against the concatenated weights [15360, 5120] reads it
   once. In bf16 the concatenation is all it takes. On the HiF8 FP8 path the three weights have
   three per-tensor dequantization scales, so one ``torch._scaled_mm`` needs row-wise scales
   (``scale_a`` [M, 1], ``scale_b`` [1, N]); the probe times that against three per-tensor GEMMs
   (and, as a bound, one per-tensor GEMM of the concatenation, whose result would be wrong).
2. Does Inductor's GEMM autotuning (``max-autotune``, ATen and Triton templates) find an FP8 GEMM
   faster than cuBLAS at the block's three shapes?

Rounds alternate the variants (paired, as ``gpu_overlap_probe.py``); each timing is one batch of
repeats long enough for the power cap to bite. The q/k/v operands are real HiF8-quantized random
tensors (the tensor cores' power depends on the bits). Prints the tables last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_overlap_probe import _paired  # noqa: E402

TOKENS, DIM = 75600, 5120


def _operands():
    from osp_compile.hif8.fp8 import quantize_act_e4m3, transcode_weight
    from osp_compile.hif8.inference import quantize_weight

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    ws = [torch.randn(DIM, DIM, device="cuda", generator=g, dtype=torch.bfloat16) * s for s in (0.02, 0.03, 0.05)]
    bs = [torch.randn(DIM, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1 for _ in range(3)]
    x8, x_dequant = quantize_act_e4m3(x)
    w8 = [transcode_weight(*quantize_weight(w)) for w in ws]
    return x, ws, bs, x8, x_dequant, w8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    x, ws, bs, x8, x_dequant, w8 = _operands()

    def three_fp8():
        return [torch._scaled_mm(x8, w.data.t(), scale_a=x_dequant, scale_b=w.dequant, bias=b,
                                 out_dtype=torch.bfloat16, use_fast_accum=True) for w, b in zip(w8, bs)]

    cat_w8 = torch.cat([w.data for w in w8]).contiguous()
    cat_b = torch.cat(bs)
    row_b = torch.cat([w.dequant.expand(DIM) for w in w8]).reshape(1, -1).contiguous()
    row_a = x_dequant.reshape(1, 1).expand(TOKENS, 1).contiguous()

    def one_fp8_rowwise():
        return torch._scaled_mm(x8, cat_w8.t(), scale_a=row_a, scale_b=row_b, bias=cat_b,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    def one_fp8_tensorwise():  # a bound only: one scale for three weights is wrong
        return torch._scaled_mm(x8, cat_w8.t(), scale_a=x_dequant, scale_b=w8[0].dequant, bias=cat_b,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    cat_w = torch.cat(ws).contiguous()

    def three_bf16():
        return [F.linear(x, w, b) for w, b in zip(ws, bs)]

    def one_bf16():
        return F.linear(x, cat_w, cat_b)

    separate, fused = torch.cat(three_fp8(), dim=1), one_fp8_rowwise()
    diff = (separate.float() - fused.float()).abs().max().item()
    ulp = separate.float().abs().max().item() * 2.0 ** -8
    with torch.no_grad():
        rows = {
            "fp8 q,k,v: 1 row-wise GEMM vs 3": _paired(three_fp8, one_fp8_rowwise, args.repeats, args.rounds),
            "fp8 q,k,v: 1 tensor-wise GEMM (bound) vs 3": _paired(three_fp8, one_fp8_tensorwise, args.repeats, args.rounds),
            "bf16 q,k,v: 1 GEMM vs 3": _paired(three_bf16, one_bf16, args.repeats // 2, args.rounds),
        }
        tuned = autotuned_rows(args.rounds)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "rowwise_max_abs_diff": diff, "bf16_ulp_at_max": ulp, "rows": rows, "autotune": tuned}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"row-wise vs three GEMMs: max |diff| {diff:.3g} (one bf16 ulp at the largest output: {ulp:.3g})")
    print(f"| sequence | three GEMMs ms | one GEMM ms | one / three, median of {args.rounds} (min-max) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['plain_ms']:.3f} | {r['overlapped_ms']:.3f} | "
              f"{r['overlapped_over_plain']:.4f} ({r['range'][0]:.4f}-{r['range'][1]:.4f}) |")
    print(f"| FP8 GEMM, fast accumulation | cuBLAS ms | max-autotune ms | autotuned / cuBLAS, median of {args.rounds} "
          f"(min-max) | max abs diff | compile s |")
    print("|---|---|---|---|---|---|")
    for name, r in tuned.items():
        print(f"| {name} | {r['plain_ms']:.3f} | {r['overlapped_ms']:.3f} | {r['overlapped_over_plain']:.4f} "
              f"({r['range'][0]:.4f}-{r['range'][1]:.4f}) | {r['max_abs_diff']:.3g} | {r['compile_s']:.0f} |")


def autotuned_rows(rounds: int) -> dict:
    """cuBLAS (``torch._scaled_mm``, eager) against the same call compiled with ``max-autotune``."""
    import time

    import torch._inductor.config as inductor_config

    def scaled_mm(x8, w8, sa, sb, b):
        return torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    rows = {}
    for name, (k, n) in {"q/k/v/o 5120 -> 5120": (DIM, DIM), "FFN up 5120 -> 13824": (DIM, 13824),
                         "FFN down 13824 -> 5120": (13824, DIM)}.items():
        operands = ((torch.randn(TOKENS, k, device="cuda") * 3).clamp(-200, 200).to(torch.float8_e4m3fn),
                    (torch.randn(n, k, device="cuda") * 3).clamp(-200, 200).to(torch.float8_e4m3fn),
                    torch.tensor(0.01, device="cuda"), torch.tensor(0.02, device="cuda"),
                    torch.randn(n, device="cuda", dtype=torch.bfloat16))
        start = time.perf_counter()
        with inductor_config.patch({"max_autotune_gemm_backends": "ATEN,TRITON"}):
            tuned = torch.compile(scaled_mm, mode="max-autotune-no-cudagraphs", dynamic=False)
            got = tuned(*operands)
        compile_s = time.perf_counter() - start
        row = _paired(lambda: scaled_mm(*operands), lambda: tuned(*operands), 20, rounds)
        row.update(compile_s=compile_s, max_abs_diff=(got.float() - scaled_mm(*operands).float()).abs().max().item())
        rows[name] = row
    return rows


if __name__ == "__main__":
    main()
