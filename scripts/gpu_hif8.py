"""GPU check and speed benchmark of the HiF8 linears. Run from the repo root on a CUDA machine:

    python scripts/gpu_hif8.py [--quick] [--no-tests]

1. The GPU tests of the HiF8 files (pytest -k on the CUDA-only tests; the CPU ones run in CI).
2. Correctness on the GPU at the Wan-14B 720P shapes: relative error against a float64 reference
   of the QAT forward (HiF8-quantized x and W, float64 matmul) of the Triton decode GEMM, of the
   FP8 path (fused activation kernel + torch._scaled_mm; exact accumulation and fast accumulation),
   and of the dense bf16 linear for scale; the fused activation kernel bit for bit against torch.
3. Speed, Wan-14B block GEMMs at 720P (75600 tokens, dim 5120, ffn 13824): q/k/v/o 5120->5120,
   ffn up 5120->13824, ffn down 13824->5120, bf16 activations. bf16 F.linear against the HiF8 FP8
   path = activation quantization (absmax + one fused Triton pass) + _scaled_mm, weights
   transcoded to E4M3 once beforehand; also each part alone. Medians of CUDA-event timings.
Prints a short table LAST and writes $OUT/hif8_bench.json when $OUT is set. Every row catches its
own failure (printed, then the next row runs). Takes about 2 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOKENS, DIM, FFN = 75600, 5120, 13824
SHAPES = {"qkvo 5120->5120": (DIM, DIM), "ffn up 5120->13824": (DIM, FFN), "ffn down 13824->5120": (FFN, DIM)}
RESULTS: dict = {"speed": [], "block": [], "correctness": [], "errors": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def guarded(name: str):
    """Run a row; on failure print the traceback, record it and go on."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (a benchmark row must not stop the others)
                traceback.print_exc()
                RESULTS["errors"].append({"row": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"!! {name}: {type(exc).__name__}: {exc}")
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                return None
        return run
    return wrap


def median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make_layer(k: int, n: int, tokens: int, seed: int):
    """bf16 activations with a few outlier channels (as DiT activations have), a weight, a bias."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=g)
    x *= 1 + 7 * (torch.rand(k, device="cuda", generator=g) > 0.995).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16)
    b = (torch.randn(n, device="cuda", generator=g) / 10).to(torch.bfloat16)
    return x, w, b


# ---------------------------------------------------------------------------------------- tests

@guarded("pytest (GPU tests)")
def run_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           "tests/test_hif8_kernels.py", "tests/test_hif8_qat.py", "tests/test_hif8_infer.py",
           "-k", "cuda or sm89 or scaled_mm_path"]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    log("\n".join(out[-25:]))
    RESULTS["tests"] = {"rc": proc.returncode, "summary": out[-1] if out else "", "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------- correctness

@guarded("correctness")
def correctness(name: str, k: int, n: int, tokens: int, check_rows: int) -> None:
    from osp_compile.hif8 import api, fp8, inference
    from osp_compile.hif8.triton_fp8 import quantize_act_e4m3_triton
    from osp_compile.hif8.triton_gemm import hif8_linear_triton

    x16, w, b16 = make_layer(k, n, tokens, seed=1)
    # float32 activations (the bf16 ones, upcast exactly) and float32 outputs: the errors below are the
    # kernels' own (accumulation, E4M3 underflow), not bf16 output rounding (~2e-3)
    x, b = x16.float(), b16.float()
    codes, scale = inference.quantize_weight(w)
    # float64 reference of the QAT forward on the first rows (the activation scale is per tensor: all rows)
    x_q = api.quantize_scaled(x, 15.0)[:check_rows].double()
    w_q = inference.dequantize_weight(codes, scale, torch.float32).double()
    ref = x_q @ w_q.T + b.double()
    rows = {"dense bf16 linear (= HiF8 quantization error, for scale)": rel(F.linear(x16[:check_rows], w, b16), ref)}
    xs = x[:check_rows * 4]  # the decode GEMM is slow-ish: a smaller activation, its own scale
    ref_small = (api.quantize_scaled(xs, 15.0).double() @ w_q.T + b.double())
    rows["Triton decode GEMM"] = rel(hif8_linear_triton(xs, codes, b, scale), ref_small)
    if fp8.scaled_mm_supported(x.device):
        w8 = fp8.transcode_weight(codes, scale)
        rows[f"FP8 path (weight outside window {w8.outside}/{w8.numel}, shift {w8.shift})"] = \
            rel(fp8.fp8_linear(x, w8, b)[:check_rows], ref)
        rows["FP8 path, fast accumulation"] = rel(fp8.fp8_linear(x, w8, b, use_fast_accum=True)[:check_rows], ref)
        rows["FP8 path, bf16 in/out"] = rel(fp8.fp8_linear(x16, w8, b16)[:check_rows], ref)
    sample = x16[:65536]
    got, got_dq = quantize_act_e4m3_triton(sample, 15.0)
    want, want_dq = fp8.quantize_act_e4m3_reference(sample, 15.0)
    bitwise = bool(torch.equal(got.float(), want.float()) and torch.equal(got_dq, want_dq))
    for path, err in rows.items():
        RESULTS["correctness"].append({"shape": name, "path": path, "rel_err_vs_fp64": err})
        log(f"  {name:22s} {path:60s} rel err {err:.3e}")
    RESULTS["correctness"].append({"shape": name, "path": "fused activation kernel == torch reference (bits)",
                                   "rel_err_vs_fp64": 0.0 if bitwise else float("nan")})
    log(f"  {name:22s} fused activation kernel bitwise == torch reference: {bitwise}")


# ---------------------------------------------------------------------------------------- speed

@guarded("speed")
def speed(name: str, k: int, n: int, tokens: int, with_triton_gemm: bool) -> None:
    from osp_compile.hif8 import fp8, inference
    from osp_compile.hif8.triton_fp8 import quantize_act_e4m3_triton
    from osp_compile.hif8.triton_gemm import hif8_linear_triton

    x, w, b = make_layer(k, n, tokens, seed=2)
    codes, scale = inference.quantize_weight(w)
    w8 = fp8.cached_e4m3_weight(codes, scale)  # transcoded once, before timing
    flops = 2.0 * tokens * k * n
    x8, x_dq = quantize_act_e4m3_triton(x, 15.0)
    timings = {  # reuse_activation=False: every call quantizes its activation (no q/k/v sharing here)
        "bf16 F.linear": lambda: F.linear(x, w, b),
        "HiF8 FP8 (act quant + _scaled_mm)": lambda: fp8.fp8_linear(x, w8, b, reuse_activation=False),
        "HiF8 FP8, fast accum": lambda: fp8.fp8_linear(x, w8, b, use_fast_accum=True, reuse_activation=False),
        "  act quant alone (absmax + fused pass)": lambda: quantize_act_e4m3_triton(x, 15.0),
        "  absmax alone (torch vector_norm inf)": lambda: torch.linalg.vector_norm(x, float("inf")),
        "  _scaled_mm alone": lambda: torch._scaled_mm(x8, w8.data.t(), scale_a=x_dq, scale_b=w8.dequant, bias=b,
                                                       out_dtype=torch.bfloat16),
        "  _scaled_mm alone, fast accum": lambda: torch._scaled_mm(x8, w8.data.t(), scale_a=x_dq, scale_b=w8.dequant,
                                                                   bias=b, out_dtype=torch.bfloat16,
                                                                   use_fast_accum=True),
    }
    if with_triton_gemm:
        timings["Triton decode GEMM (portable path)"] = lambda: hif8_linear_triton(x, codes, b, scale)
    base = None
    for label, fn in timings.items():
        try:
            ms = median_ms(fn)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["errors"].append({"row": f"{name}: {label}", "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"!! {name}: {label}: {exc}")
            continue
        base = ms if label == "bf16 F.linear" else base
        row = {"shape": name, "path": label.strip(), "ms": round(ms, 3),
               "speedup_vs_bf16": round(base / ms, 3) if base else None}
        if "act quant" in label:
            row["GB_per_s"] = round(x.numel() * (2 + 2 + 1) / ms / 1e6, 1)  # absmax read, fused read + write
        elif "absmax" in label:
            row["GB_per_s"] = round(x.numel() * 2 / ms / 1e6, 1)
        else:
            row["TFLOPS"] = round(flops / ms / 1e9, 1)
        RESULTS["speed"].append(row)
        log(f"  {name:22s} {label:42s} {ms:8.3f} ms  " + (f"x{base / ms:.2f}" if base else ""))
    del x, w, b, codes, x8
    torch.cuda.empty_cache()


@guarded("block")
def block_speed(tokens: int) -> None:
    """One Wan-14B block's six GEMMs in sequence (q, k, v on one activation, then o, ffn up, ffn down),
    as the converted model runs them: the FP8 path quantizes the shared q/k/v input once."""
    from osp_compile.hif8 import fp8, inference

    layers = {}
    for i, (name, (k, n)) in enumerate([("q", (DIM, DIM)), ("k", (DIM, DIM)), ("v", (DIM, DIM)), ("o", (DIM, DIM)),
                                        ("up", (DIM, FFN)), ("down", (FFN, DIM))]):
        x, w, b = make_layer(k, n, tokens if name in ("q", "o", "up", "down") else 1, seed=10 + i)  # k, v read q's x
        layers[name] = (x, w, b, fp8.cached_e4m3_weight(*inference.quantize_weight(w)))
    x_qkv = layers["q"][0]
    inputs = {"q": x_qkv, "k": x_qkv, "v": x_qkv, "o": layers["o"][0], "up": layers["up"][0], "down": layers["down"][0]}

    def run(linear):
        return [linear(inputs[name], *layers[name][1:]) for name in layers]

    variants = {
        "bf16 F.linear": lambda: run(lambda x, w, b, w8: F.linear(x, w, b)),
        "HiF8 FP8": lambda: run(lambda x, w, b, w8: fp8.fp8_linear(x, w8, b)),
        "HiF8 FP8, fast accum": lambda: run(lambda x, w, b, w8: fp8.fp8_linear(x, w8, b, use_fast_accum=True)),
    }
    base = None
    for label, fn in variants.items():
        ms = median_ms(fn, warmup=2, iters=5)
        base = base or ms
        RESULTS["block"].append({"path": label, "ms": round(ms, 3), "speedup_vs_bf16": round(base / ms, 3)})
        log(f"  block (q,k,v,o,up,down)  {label:42s} {ms:8.3f} ms  x{base / ms:.2f}")
    del layers, inputs
    torch.cuda.empty_cache()


def final_table() -> None:
    """One line per GEMM shape for correctness and one for speed."""
    log("\n==== HiF8 linears on " + RESULTS["device"] + f", M = {RESULTS['tokens']} tokens ====")
    if "tests" in RESULTS:
        log(f"GPU tests: rc={RESULTS['tests']['rc']}  {RESULTS['tests']['summary']}")
    log("rel err vs float64 QAT forward   decode-GEMM    FP8    FP8-fast  FP8-bf16io  act-bits  (dense bf16)")
    for shape in SHAPES:
        got = {r["path"].split(" (")[0]: r["rel_err_vs_fp64"] for r in RESULTS["correctness"] if r["shape"] == shape}
        cell = lambda key: f"{got[key]:.1e}" if key in got else "-"  # noqa: E731
        bits = got.get("fused activation kernel == torch reference")
        log(f"  {shape:30s} {cell('Triton decode GEMM'):>10s} {cell('FP8 path'):>8s} "
            f"{cell('FP8 path, fast accumulation'):>8s} {cell('FP8 path, bf16 in/out'):>10s} "
            f"{('ok' if bits == 0.0 else 'FAIL' if bits is not None else '-'):>9s}  {cell('dense bf16 linear'):>9s}")
    log("median ms (speedup vs bf16)      bf16     HiF8-FP8        HiF8-FP8-fast    act-quant (GB/s)   scaled_mm")
    for shape in SHAPES:
        got = {r["path"]: r for r in RESULTS["speed"] if r["shape"] == shape}
        ms = lambda key: f"{got[key]['ms']:.2f}" if key in got else "-"  # noqa: E731
        sp = lambda key: f"{ms(key)} (x{got[key]['speedup_vs_bf16']:.2f})" if key in got else "-"  # noqa: E731
        act = got.get("act quant alone (absmax + fused pass)")
        act_cell = f"{act['ms']:.2f} ({act['GB_per_s']:.0f})" if act else "-"
        log(f"  {shape:30s} {ms('bf16 F.linear'):>6s} {sp('HiF8 FP8 (act quant + _scaled_mm)'):>14s} "
            f"{sp('HiF8 FP8, fast accum'):>16s} {act_cell:>16s} {ms('_scaled_mm alone'):>10s}")
    if RESULTS["block"]:
        log("Wan-14B block, 6 GEMMs (q/k/v share one act quant): " + ",  ".join(
            f"{r['path']} {r['ms']:.2f} ms (x{r['speedup_vs_bf16']:.2f})" for r in RESULTS["block"]))
    for err in RESULTS["errors"]:
        log(f"  ERROR {err['row']}: {err['error'][:150]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8192 tokens instead of 75600 (smoke run)")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        log("no CUDA device")
        return 1
    import triton

    tokens = 8192 if opts.quick else TOKENS
    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = f"{props.name} (sm{props.major}{props.minor}), torch {torch.__version__}, triton {triton.__version__}"
    RESULTS["tokens"] = tokens
    log(RESULTS["device"])
    t0 = time.time()
    if not opts.no_tests:
        run_tests()
    log("\n-- correctness (rel err vs float64 reference of the QAT forward)")
    for i, (name, (k, n)) in enumerate(SHAPES.items()):
        correctness(name, k, n, tokens, check_rows=2048)
    log("\n-- speed (median ms)")
    for i, (name, (k, n)) in enumerate(SHAPES.items()):
        speed(name, k, n, tokens, with_triton_gemm=(i == 0))
    block_speed(tokens)
    RESULTS["seconds"] = round(time.time() - t0, 1)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "hif8_bench.json"), "w") as f:
            json.dump(RESULTS, f, indent=2)
    final_table()
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
