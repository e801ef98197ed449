"""Host time of one HiF8 linear call and of its parts, on a GPU: where a short step's CPU time goes.

A step whose blocks take a few ms each (CogVideoX-5B at 480x720, the one-row conditioning
linears of any model) can run ahead of its host: then every microsecond the host spends per op
shows as an idle GPU. This times each call path on inputs small enough that the GPU finishes
first (M rows, default 1 and 64), so the time per call is the host's: ``calls`` back to back
after a warm-up, then one synchronize. Compare with ``F.linear`` in bf16.

    python scripts/gpu_host_cost.py --json $OUT/host.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from osp_compile.hif8 import fp8, inference
from osp_compile.hif8.triton_fp8 import quantize_act_e4m3_triton
from osp_compile.lowering import hif8_kernels
from osp_compile.report import format_table


def host_us(fn, calls: int) -> float:
    """Microseconds per call, the GPU's work included only where the host waits for it."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=3072, help="in = out features (CogVideoX-5B's width)")
    ap.add_argument("--rows", default="1,64", help="comma-separated M (rows of the activation)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev, k = "cuda", a.features
    gen = torch.Generator().manual_seed(0)
    codes, scale = inference.quantize_weight(torch.randn(k, k, generator=gen) / 50)
    codes, scale = codes.to(dev), scale.to(dev)
    weight = fp8.cached_e4m3_weight(codes, scale)
    bias = torch.randn(k, generator=gen).to(dev, torch.bfloat16)
    w_bf16 = weight.data.to(torch.bfloat16)
    rows = []
    for m in (int(r) for r in a.rows.split(",")):
        x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
        x8, dequant = quantize_act_e4m3_triton(x, 15.0)
        x8 = torch.cat([x8, x8.new_zeros(-m % 16, k)])
        amax = x.abs().amax()
        paths = {
            "F.linear (bf16)": lambda: F.linear(x, w_bf16, bias),
            "osp_cuda::hif8_linear_fast_accum (x quantized once, then reused)":
                lambda: hif8_kernels.hif8_linear_cuda_fast_accum(x, codes, bias, scale, "", None),
            "fp8.fp8_linear, x quantized every call": lambda: fp8.fp8_linear(x, weight, bias, use_fast_accum=True,
                                                                            reuse_activation=False),
            "quantize_act_e4m3_triton (its absmax included)": lambda: quantize_act_e4m3_triton(x, 15.0),
            "quantize_act_e4m3_triton, amax given": lambda: quantize_act_e4m3_triton(x, 15.0, amax),
            "absmax (torch vector_norm)": lambda: torch.linalg.vector_norm(x, float("inf")).to(torch.float32),
            "torch._scaled_mm": lambda: torch._scaled_mm(x8, weight.data.t(), scale_a=dequant, scale_b=weight.dequant,
                                                         bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True),
        }
        with torch.no_grad():
            rows += [{"M": m, "path": name, "us per call": round(host_us(fn, a.calls), 1)} for name, fn in paths.items()]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {k} x {k} linear, {a.calls} calls each")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
