"""Single-device speed of one denoising step: dense vs OSP, measured side by side in one process.

One step = one forward of the transformer (bf16, random weights) at a named resolution, 81 frames.
Variants: dense eager; dense under torch.compile (Inductor) - the fair baseline; OSP via
`convert()` (Dynamo graph, eager kernels); OSP via ``torch.compile(backend="osp")`` (Inductor);
OSP + ``quant="hif8-infer"`` (when its kernels exist for the device). Medians over repeated runs
after warm-up (CUDA events), peak memory, compile time; a profiler breakdown of the OSP step
(attention, GEMMs, layout changes, the rest) answers what the rearrangement costs.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

VARIANTS = ("dense-eager", "dense-inductor", "osp-convert", "osp-backend", "osp-hif8")


@dataclass
class Row:
    variant: str
    median_ms: float | None = None
    min_ms: float | None = None
    compile_s: float | None = None
    peak_gib: float | None = None
    speedup_vs_inductor: float | None = None
    note: str = ""
    breakdown: dict = field(default_factory=dict)


def step_timer(device: str) -> Callable[[Callable], float]:
    """A function that runs `fn()` once and returns its time in ms (CUDA events on a GPU)."""
    def cuda_time(fn):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)

    def cpu_time(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cuda_time if device == "cuda" else cpu_time


def build(preset: str, layers: int | None, device: str, dtype: torch.dtype, seed: int = 0):
    """Random weights drawn on the device (a 14B-shaped model initialises in seconds)."""
    from reference_model import build_model

    model = build_model(preset, num_layers=layers, device="meta").to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()


def full_blocks_for(total: int, preset: str, requested: int | None) -> int:
    """The paper's 14B ratio (8 of 40 full) unless asked otherwise: 6 of 30 for the 1.3B."""
    if requested is not None:
        return requested
    return max(2, round(total * 8 / 40 / 2) * 2)


def categorize(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("index_select", "gather")):
        return "relayout (gather; fused neighbours included)"
    if any(k in n for k in ("cat", "pad", "repeat")):
        return "cat/pad/repeat"
    if any(k in n for k in ("gemm", "sm90", "cutlass", "matmul", "mm_", "_mm", "cublas", "scaled_mm", "xmma")):
        return "gemm"
    return "other (norms, modulation, pointwise)"


def profile_breakdown(fn: Callable, device: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) if device == "cuda" else evt.self_cpu_time_total
        if device == "cuda" and (evt.device_type != torch.autograd.DeviceType.CUDA if hasattr(evt, "device_type") else False):
            continue
        if not t:
            continue
        cat = categorize(evt.key)
        totals[cat] = totals.get(cat, 0.0) + t / 1e3
    whole = sum(totals.values()) or 1.0
    return {k: {"ms": round(v, 3), "share": round(v / whole, 4)} for k, v in sorted(totals.items())}


def run(preset: str = "wan-1.3b", resolution: str = "480p", layers: int | None = None, num_full_blocks: int | None = None,
        sparse_ratio: int = 2, variants=VARIANTS, warmup: int = 2, iters: int = 5, device: str = "cuda",
        profile: bool = True, progress: bool = True) -> dict:
    from reference_model import PRESETS, make_inputs, token_grid, latent_shape

    from . import OSPConfig, convert
    from .backend import osp_backend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = PRESETS[preset]
    total = layers or cfg.num_layers
    full = full_blocks_for(total, preset, num_full_blocks)
    model = build(preset, layers, device, dtype)
    args, kwargs = make_inputs(cfg, resolution=resolution, device=device, dtype=dtype)
    grid = token_grid(cfg, latent_shape(resolution))
    config = OSPConfig(sparse_ratio=sparse_ratio, layout="dual_end", num_full_blocks=full)
    timer = step_timer(device)
    rows: list[Row] = []

    def make(variant: str) -> Callable:
        if variant == "dense-eager":
            return model
        if variant == "dense-inductor":
            return torch.compile(model, dynamic=False)
        if variant == "osp-convert":
            return convert(model, args, kwargs, config)
        # the backend callable itself: the same as backend="osp", without relying on the pip entry point
        if variant == "osp-backend":
            opts = {"sparse_ratio": sparse_ratio, "layout": "dual_end", "num_full_blocks": full}
            return torch.compile(model, backend=osp_backend, options=opts, dynamic=False)
        if variant == "osp-hif8":
            opts = {"sparse_ratio": sparse_ratio, "layout": "dual_end", "num_full_blocks": full, "quant": "hif8-infer"}
            return torch.compile(model, backend=osp_backend, options=opts, dynamic=False)
        raise ValueError(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")

    iterator = variants
    if progress:
        from tqdm import tqdm

        iterator = tqdm(variants, desc="bench", unit="variant")
    for variant in iterator:
        row = Row(variant)
        try:
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                t0 = time.perf_counter()
                fn = make(variant)
                step = lambda: fn(*args, **kwargs)  # noqa: E731
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                row.compile_s = round(time.perf_counter() - t0, 1)
                for _ in range(warmup):
                    step()
                times = [timer(step) for _ in range(iters)]
                row.median_ms, row.min_ms = round(statistics.median(times), 2), round(min(times), 2)
                if device == "cuda":
                    row.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if profile and variant in ("osp-backend", "dense-inductor", "osp-hif8", "osp-convert"):
                    row.breakdown = profile_breakdown(step, device)
            del fn
        except Exception as exc:  # one failing variant must not hide the others
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    base = next((r.median_ms for r in rows if r.variant == "dense-inductor" and r.median_ms), None)
    for r in rows:
        if base and r.median_ms:
            r.speedup_vs_inductor = round(base / r.median_ms, 3)
    return {
        "preset": preset, "resolution": resolution, "layers": total, "full_blocks": full, "sparse_ratio": sparse_ratio,
        "grid": grid, "tokens": grid[0] * grid[1] * grid[2], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "warmup": warmup, "iters": iters,
        "layer_reduced": layers is not None and layers != cfg.num_layers,
        "rows": [asdict(r) for r in rows],
    }


def table(result: dict) -> str:
    from .report import format_table

    head = (f"{result['preset']} {result['resolution']} grid {tuple(result['grid'])} ({result['tokens']} tokens), "
            f"{result['layers']} blocks{' (layer-reduced)' if result['layer_reduced'] else ''}, dual_end "
            f"{result['full_blocks']} full, P={result['sparse_ratio']}, {result['dtype']}, {result['device']}, "
            f"torch {result['torch']}, median of {result['iters']}")
    rows = [{"variant": r["variant"], "median ms": r["median_ms"], "min ms": r["min_ms"], "x vs dense+inductor":
             r["speedup_vs_inductor"], "compile s": r["compile_s"], "peak GiB": r["peak_gib"], "note": r["note"]}
            for r in result["rows"]]
    lines = [head, format_table(rows)]
    for r in result["rows"]:
        if r["breakdown"]:
            parts = ", ".join(f"{k} {v['ms']} ms ({100 * v['share']:.1f}%)" for k, v in r["breakdown"].items())
            lines.append(f"  profile {r['variant']}: {parts}")
    return "\n".join(lines)


def dump(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
