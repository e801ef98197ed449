"""Single-device speed of one denoising step: dense vs OSP, measured side by side in one process.

One step = one forward of the transformer (bf16, random weights) at a named resolution, 81 frames
(`frames` sets fewer for a quick run; the goals are set at 81). The model is a reference preset, or
``cogvideox-5b`` / ``hunyuanvideo``: diffusers' CogVideoX at CogVideoX-5B's shape (480x720, 49
frames) or HunyuanVideo at its own (720x1280 or 544x960, 129 frames), whose joint
text+video attention the passes find in a model written by someone else.
Variants: dense eager; dense under torch.compile (Inductor) - the fair baseline; OSP via
`convert()` (Dynamo graph, eager kernels); OSP via ``torch.compile(backend="osp")`` (Inductor);
OSP + ``quant="hif8-infer"`` (when its kernels exist for the device; ``osp-hif8-fast`` with
``fp8_fast_accum=True``). Medians over repeated runs
after warm-up (CUDA events), peak memory, compile time; a profiler breakdown of the OSP step
(attention, GEMMs, layout changes, the rest), its top kernels and every attention launch in order
say where the time goes. ``nvidia-smi`` is sampled while the steps are timed: a long step can hold
the GPU at its power cap, with clocks far below those a short microbenchmark sees. Each variant's
first-step output is compared with a reference variant's (``reference``): what a speedup costs
in output. On CUDA the FP8 GEMMs' timed cuBLASLt picks are listed (``hif8/cublaslt.py``).

What the layout costs is measured, not inferred from kernel names (Inductor fuses the token
gathers into neighbouring norms, so no kernel is "the relayout"): the ablation ``osp-no-relayout``
compiles the same OSP graph with every relayout replaced by the identity - the same kernels on the
same shapes, since a packed layout has exactly the natural layout's shape on one device - and the
difference to ``osp-backend`` is the cost of rearranging and switching. Padding costs nothing by
construction (packed layouts carry no padded row). The ablation ``osp-hif8-no-actquant`` measures
HiF8's activation quantization the same way: ``osp-hif8-fast`` with every FP8 linear replaying the
E4M3 activation it got in the first step instead of quantizing its input again, so the difference
bounds what any fusion of the quantization (into the norms, into the GEMM) could give the step.
"""
from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .models import patch_grid
from .oracle import rel_err

VARIANT_HELP = {
    "dense-eager": "the model as written, eager",
    "dense-inductor": "torch.compile (Inductor): the baseline of every ratio",
    "dense-osp": "every site dense, through the osp backend: only the fusions apply",
    "osp-convert": "osp_compile.convert()",
    "osp-backend": 'torch.compile(backend="osp")',
    "osp-unfused": "osp-backend with the fusions off (fuse_linears=False, fuse_norm_rope=False)",
    "osp-hif8": "osp-backend with HiF8 inference linears (FP8 tensor cores on CUDA)",
    "osp-hif8-fast": "osp-hif8 with fp8_fast_accum=True",
    "dense-inductor-graphs": 'dense-inductor with CUDA graphs (mode="reduce-overhead"): what graphs give the dense model',
    "osp-hif8-fast-graphs": "osp-hif8-fast with CUDA graphs (backend option cudagraphs=True)",
    "osp-hif8-unfused": "osp-hif8-fast with the fusions off (fuse_linears=False, fuse_norm_rope=False)",
    "osp-no-relayout": "ablation: relayouts replaced by identity (output invalid, timing only)",
    "osp-hif8-no-actquant": "ablation: osp-hif8-fast, FP8 linears replay the first step's E4M3 activations (timing only; use --layers)",
}
VARIANTS = tuple(VARIANT_HELP)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "osp-hif8-no-actquant" and not v.endswith("-graphs"))
"""What runs unless asked: all but the ablation that holds a whole step's activations on the GPU,
and the CUDA-graph variants (a short step's question: ask for them with their baseline)."""
BACKEND_OPTIONS = {
    "osp-backend": {},
    "osp-unfused": {"fuse_linears": False, "fuse_norm_rope": False},
    "osp-hif8": {"quant": "hif8-infer"},
    "osp-hif8-fast": {"quant": "hif8-infer", "fp8_fast_accum": True},
    "osp-hif8-fast-graphs": {"quant": "hif8-infer", "fp8_fast_accum": True, "cudagraphs": True},
    "osp-hif8-unfused": {"quant": "hif8-infer", "fp8_fast_accum": True, "fuse_linears": False, "fuse_norm_rope": False},
    "dense-osp": {"layout": "dense"},
}
"""Variants compiled with the osp backend, and their options beyond the preset's sparse layout
(an ablation compiles as the variant it ablates). ``dense-osp`` keeps every site dense: what the
backend's other rewrites (the fusions) give a model without Skiparse, so that the
Skiparse share of a speedup can be told apart."""

@dataclass(frozen=True)
class Ablation:
    """A timing-only variant: `of` compiled and run with one piece of work taken out by `patch`
    (a context manager active while it compiles and runs; what it yields, if not None, is called
    once the first step has run). ``of - ablation`` is what that work costs in the step, kernels
    and power cap included."""

    of: str
    work: str
    patch: Callable[[], contextlib.AbstractContextManager]


@dataclass
class Row:
    variant: str
    median_ms: float | None = None
    min_ms: float | None = None
    compile_s: float | None = None
    peak_gib: float | None = None
    speedup_vs_inductor: float | None = None
    rel_err: float | None = None  # ||out - ref|| / ||ref||, ref: the reference variant's output (first steps)
    note: str = ""
    gpu_state: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    round_medians_ms: list = field(default_factory=list)  # rounds > 1: the median of each round
    round_speedups: list = field(default_factory=list)  # the baseline's round median / this one's, round by round


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


@dataclass
class Workload:
    """What a run times: a model, one step's inputs, its frames, token grid and how many blocks it has."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict
    frames: int
    grid: tuple[int, int, int]
    layers: int
    layer_reduced: bool


def reference_workload(preset: str, resolution: str, layers: int | None, frames: int, device: str,
                       dtype: torch.dtype) -> Workload:
    from reference_model import PRESETS, latent_shape, make_inputs, token_grid

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join([*PRESETS, *THIRD_PARTY])}")
    cfg = PRESETS[preset]
    model = build(preset, layers, device, dtype)
    args, kwargs = make_inputs(cfg, resolution=resolution, frames=frames, device=device, dtype=dtype)
    total = layers or cfg.num_layers
    return Workload(model, args, kwargs, frames, token_grid(cfg, latent_shape(resolution, frames)), total,
                    total != cfg.num_layers)


def _diffusers_latent(preset: str, resolutions: dict, resolution: str, frames: int) -> tuple[tuple, tuple]:
    """(latent shape, token grid) of a diffusers video model at one of its own resolutions: its VAE
    compresses time 4x and space 8x, its patches are 1x2x2 (CogVideoX and HunyuanVideo alike)."""
    if resolution not in resolutions:
        sizes = ", ".join(f"{name} ({h}x{w})" for name, (h, w) in resolutions.items())
        raise ValueError(f"{preset} runs at {sizes}, got {resolution!r}")
    if (frames - 1) % 4:
        raise ValueError(f"frames={frames}: {preset}'s VAE takes 4n + 1 frames ({DEFAULT_FRAMES[preset]} is its default)")
    height, width = resolutions[resolution]
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    return latent, patch_grid(latent)


COGVIDEOX_5B_RESOLUTIONS = {"480p": (480, 720)}
"""CogVideoX-5B's own resolution (its pipeline's default), not Wan's 480x832."""


def cogvideox_5b_workload(resolution: str, layers: int | None, frames: int, device: str,
                          dtype: torch.dtype) -> Workload:
    """diffusers' CogVideoXTransformer3DModel at CogVideoX-5B's shape (42 blocks, 48 heads of 64, 226
    text tokens, 3-D RoPE precomputed as its pipeline does), random weights initialised on the
    device: joint text+video attention (`osp::skiparse_joint_attention`) in a third-party model."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    latent, grid = _diffusers_latent("cogvideox-5b", COGVIDEOX_5B_RESOLUTIONS, resolution, frames)
    total = layers or 42
    with torch.device(device):
        model = CogVideoXTransformer3DModel(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
            text_embed_dim=4096, num_layers=total, sample_frames=49, sample_height=60, sample_width=90,
            use_rotary_positional_embeddings=True)
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    cos, sin = get_3d_rotary_pos_embed(64, crops_coords=((0, 0), grid[1:]), grid_size=grid[1:], temporal_size=grid[0],
                                       device=device)
    args = (torch.randn(1, latent[0], 16, *latent[1:], device=device, dtype=dtype, generator=gen),)
    kwargs = {"encoder_hidden_states": torch.randn(1, 226, 4096, device=device, dtype=dtype, generator=gen),
              "timestep": torch.tensor([437], device=device), "image_rotary_emb": (cos, sin), "return_dict": False}
    return Workload(model, args, kwargs, frames, grid, total, total != 42)


HUNYUANVIDEO_RESOLUTIONS = {"720p": (720, 1280), "544p": (544, 960)}
"""HunyuanVideo's own two resolutions (its pipeline's default is 720x1280)."""
HUNYUANVIDEO_TEXT, HUNYUANVIDEO_PROMPT = 256, 128
"""Text tokens of a step (the pipeline pads every prompt to 256) and how many of them are the
prompt: the rest is padding, masked by the model's key mask as in a real step."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build a model directly in `dtype`: a 13B model built in float32 first would need 52 GB."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def hunyuanvideo_workload(resolution: str, layers: int | None, frames: int, device: str,
                          dtype: torch.dtype) -> Workload:
    """diffusers' HunyuanVideoTransformer3DModel at HunyuanVideo's shape (20 double-stream and 40
    single-stream blocks, 24 heads of 128, 256 text tokens of which the last 128 are masked padding),
    random weights initialised on the device. A joint text+video attention with the video *first*
    and a key mask: the other joint form `osp::skiparse_joint_attention` covers. ``layers`` keeps
    the double:single ratio (1:2)."""
    from diffusers import HunyuanVideoTransformer3DModel

    latent, grid = _diffusers_latent("hunyuanvideo", HUNYUANVIDEO_RESOLUTIONS, resolution, frames)
    total = layers or 60
    double = max(1, round(total / 3))
    with torch.device(device), _default_dtype(dtype):
        model = HunyuanVideoTransformer3DModel(num_layers=double, num_single_layers=total - double).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    mask = torch.zeros(1, HUNYUANVIDEO_TEXT, device=device, dtype=torch.bool)
    mask[:, :HUNYUANVIDEO_PROMPT] = True
    args = (torch.randn(1, 16, *latent, device=device, dtype=dtype, generator=gen),)
    kwargs = {"timestep": torch.tensor([437], device=device),
              "encoder_hidden_states": torch.randn(1, HUNYUANVIDEO_TEXT, 4096, device=device, dtype=dtype, generator=gen),
              "encoder_attention_mask": mask,
              "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype, generator=gen),
              "guidance": torch.tensor([6000.0], device=device, dtype=dtype), "return_dict": False}
    return Workload(model, args, kwargs, frames, grid, total, total != 60)


THIRD_PARTY = {"cogvideox-5b": cogvideox_5b_workload, "hunyuanvideo": hunyuanvideo_workload}
"""Benchmarkable models beyond the reference presets (their packages must be installed)."""
DEFAULT_FRAMES = {"cogvideox-5b": 49, "hunyuanvideo": 129}
"""Frames of a step where a model's own default is not the reference presets' 81."""


def workload(preset: str, resolution: str, layers: int | None, frames: int | None, device: str,
             dtype: torch.dtype) -> Workload:
    """The model a run times: a reference preset or a `THIRD_PARTY` one (``frames`` None: its default)."""
    frames = frames or DEFAULT_FRAMES.get(preset, 81)
    if preset in THIRD_PARTY:
        return THIRD_PARTY[preset](resolution, layers, frames, device, dtype)
    return reference_workload(preset, resolution, layers, frames, device, dtype)


def full_blocks_for(total: int, preset: str, requested: int | None) -> int:
    """The paper's 14B ratio (8 of 40 full) unless asked otherwise: 6 of 30 for the 1.3B."""
    if requested is not None:
        return requested
    return max(2, round(total * 8 / 40 / 2) * 2)


class GPUSampler:
    """SM clock, power and throttle reasons sampled by ``nvidia-smi`` while the timed steps run.

    A long step can hold the GPU at its power limit, where the clock drops and every kernel slows;
    a kernel timed alone then runs faster than it does inside the model. The summary (median SM
    MHz, median W, share of samples throttled by the power cap) says which regime a row ran in.
    Nothing is sampled off CUDA or where ``nvidia-smi`` is missing. Entered again (the rounds of
    an interleaved run), it keeps sampling into the same summary."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"
    SW_POWER_CAP = 0x4

    def __init__(self, device: str, interval_ms: int = 100):
        self.device, self.interval_ms = device, interval_ms
        self.proc, self.output = None, ""

    def __enter__(self) -> "GPUSampler":
        import shutil
        import subprocess

        if self.device == "cuda" and shutil.which("nvidia-smi"):
            index = torch.cuda.current_device()
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(index), f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.output += self.proc.communicate(timeout=10)[0] + "\n"  # a line cut off stays alone

    def summary(self) -> dict:
        if self.proc is None:
            return {}
        rows = []
        for line in self.output.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                rows.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
            except (ValueError, IndexError):
                continue  # a "[N/A]" field or a line cut off by terminate()
        if not rows:
            return {}
        return {"sm_mhz_median": statistics.median(r[0] for r in rows),
                "power_w_median": round(statistics.median(r[1] for r in rows), 1),
                "power_capped_share": round(sum(bool(r[2] & self.SW_POWER_CAP) for r in rows) / len(rows), 2),
                "samples": len(rows)}


INDUCTOR_FUSED = ("triton_poi_", "triton_red_", "triton_per_")
"""Name prefixes of Inductor's pointwise and reduction kernels: named after the ops they fuse (a
norm next to attention is ``triton_red_fused__scaled_dot_product_cudnn_attention_...``), they are
never an attention kernel or a GEMM, whatever their name mentions."""


def categorize(name: str) -> str:
    n = name.lower()
    fused = n.startswith(INDUCTOR_FUSED)
    if not fused and any(k in n for k in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("index_select", "gather")):
        return "relayout (gather; fused neighbours included)"
    if any(k in n for k in ("cat", "pad", "repeat")):
        return "cat/pad/repeat"
    if not fused and any(k in n for k in ("gemm", "sm90", "cutlass", "matmul", "mm_", "_mm", "cublas", "scaled_mm", "xmma")):
        return "gemm"
    return "other (norms, modulation, pointwise)"


@contextlib.contextmanager
def relayouts_as_identity():
    """While active, `osp::skiparse_relayout` traces to the identity (the ablation variant).
    Inductor's and AOTAutograd's caches are off meanwhile: the graph text is the same as the real
    variant's, so a cache hit would bring the real relayouts back."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from . import ops

    real = ops.relayout_local
    ops.relayout_local = lambda x, *args: x
    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            yield
    finally:
        ops.relayout_local = real


@contextlib.contextmanager
def activations_prequantized():
    """While active, a HiF8 linear on FP8 tensor cores skips its activation quantization (the absmax
    pass and the quantize pass) and multiplies an E4M3 tensor quantized beforehand (the ablation
    variant ``osp-hif8-no-actquant``). The first step (the one that compiles) quantizes as usual and
    keeps every result in call order; once the bench calls the function this yields, each later
    step replays them, the n-th call getting the n-th result. Every step takes the same inputs, so
    each GEMM multiplies exactly the bits it multiplies in ``osp-hif8-fast``: that matters, because
    the tensor cores' power depends on those bits and the step runs at the power cap (fixed or
    random E4M3 inputs moved the clock and made a 10-block 14B step 1.7-2.2% slower, quantization
    passes removed). Holds one step's quantized activations on the GPU (about 3 GB a 14B block at
    720P): use it with ``--layers``."""
    from .hif8 import fp8

    real = fp8._activation_e4m3
    recorded: list = []
    replayed: int | None = None  # calls since the first step ended; None while it runs

    def prequantized(x: torch.Tensor, *how) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal replayed
        if replayed is None:
            recorded.append(real(x, *how))
            return recorded[-1]
        result = recorded[replayed % len(recorded)]
        replayed += 1
        if result[0].shape != (x.numel() // x.shape[-1], x.shape[-1]):
            raise RuntimeError("osp-hif8-no-actquant: a step called the FP8 linears in another order than the first")
        return result

    def first_step_done() -> None:
        nonlocal replayed
        if not recorded:
            raise RuntimeError("osp-hif8-no-actquant: the first step ran no FP8 linear (no CUDA FP8 path here)")
        replayed = 0

    fp8._activation_e4m3 = prequantized
    try:
        yield first_step_done
    finally:
        fp8._activation_e4m3 = real


ABLATIONS = {
    "osp-no-relayout": Ablation("osp-backend", "rearranging and switching", relayouts_as_identity),
    "osp-hif8-no-actquant": Ablation("osp-hif8-fast", "HiF8 activation quantization", activations_prequantized),
}
"""Timing-only variants, by name (their outputs are invalid, so no speedup is given for them)."""


def profile_breakdown(fn: Callable, device: str, top: int = 40) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels: list[tuple[float, int, str]] = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) if device == "cuda" else evt.self_cpu_time_total
        if device == "cuda" and (evt.device_type != torch.autograd.DeviceType.CUDA if hasattr(evt, "device_type") else False):
            continue
        if not t:
            continue
        cat = categorize(evt.key)
        totals[cat] = totals.get(cat, 0.0) + t / 1e3
        kernels.append((t / 1e3, evt.count, evt.key))
    whole = sum(totals.values()) or 1.0
    out = {k: {"ms": round(v, 3), "share": round(v / whole, 4)} for k, v in sorted(totals.items())}
    out["top_kernels"] = [{"ms": round(ms, 3), "calls": c, "name": name[:120]} for ms, c, name in sorted(kernels, reverse=True)[:top]]
    out["attention_calls_ms"] = []
    if device == "cuda":
        gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["attention_calls_ms"] = attention_calls(gpu)
        out["timeline"] = timeline([(e.time_range.start, e.time_range.end, e.name) for e in gpu])
    return out


def timeline(intervals: list[tuple[float, float, str]], largest: int = 8) -> dict:
    """How busy the GPU was over one step, from its kernels' (start, end, name) in microseconds: the
    span from the first start to the last end, the time some kernel ran (overlaps counted once), the
    idle rest, and the longest gaps with the kernels on either side. A step whose idle share grows is
    waiting on the host (launch overhead, a synchronization), not on its kernels."""
    if not intervals:
        return {}
    intervals = sorted(intervals)
    busy, gaps = 0.0, []
    run_start, run_end, last = intervals[0][0], intervals[0][1], intervals[0][2]
    for start, end, name in intervals[1:]:
        if start > run_end:
            busy += run_end - run_start
            gaps.append((start - run_end, last, name))
            run_start = start
        if end >= run_end:
            run_end, last = end, name
    busy += run_end - run_start
    span = run_end - intervals[0][0]
    gaps.sort(key=lambda g: g[0], reverse=True)
    return {"span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3), "idle_ms": round((span - busy) / 1e3, 3),
            "gaps": len(gaps), "largest_gaps": [{"us": round(us, 1), "after": a[:60], "before": b[:60]}
                                                for us, a, b in gaps[:largest]]}


def attention_calls(gpu_events) -> list[dict]:
    """Each attention-kernel launch of the step in order (ms and kernel name), from the profiler's
    GPU events: which sites are dense, sparse (one launch per length class) or cross-attention shows
    in the sequence, and so does a site that runs slower in the model than its kernel alone."""
    events = [e for e in gpu_events if categorize(e.name) == "attention"]
    events.sort(key=lambda e: e.time_range.start)
    return [{"ms": round(e.time_range.elapsed_us() / 1e3, 3), "name": e.name[:60]} for e in events]


def _output_tensor(out) -> torch.Tensor | None:
    """The model's output tensor: the tensor itself, a tuple's first, or diffusers' ``.sample``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _output_tensor(out[0])
    return _output_tensor(out.sample) if hasattr(out, "sample") else None


def _timed(step: Callable, timer: Callable, iters: int, sampler: GPUSampler) -> list[float]:
    with sampler:
        return [timer(step) for _ in range(iters)]


def _finish(row: Row, times: list[float], sampler: GPUSampler, step: Callable, device: str, profile: bool) -> None:
    """A row's statistics from all its timed steps, then its profile (one more step, not timed)."""
    row.gpu_state = sampler.summary()
    row.median_ms, row.min_ms = round(statistics.median(times), 2), round(min(times), 2)
    if profile and row.variant != "dense-eager":
        row.breakdown = profile_breakdown(step, device)


def _interleaved_rounds(live: dict[str, tuple[Row, Callable]], timer: Callable, iters: int, rounds: int, device: str,
                        profile: bool, progress: bool) -> None:
    """Time compiled variants in rounds, each round `iters` steps of every variant, the order reversed
    every other round (A B, B A, A B, ...): a slow drift of the GPU's state (clock, temperature,
    power cap) then reaches every variant alike, and each round gives one paired ratio."""
    samplers = {v: GPUSampler(device) for v in live}
    times: dict[str, list[float]] = {v: [] for v in live}
    order = list(live)
    rounds_iter = range(rounds)
    if progress:
        from tqdm import tqdm

        rounds_iter = tqdm(rounds_iter, desc="rounds", unit="round")
    for r in rounds_iter:
        for variant in order if r % 2 == 0 else order[::-1]:
            row, step = live[variant]
            if row.note.startswith("failed"):
                continue
            try:
                with torch.no_grad():
                    t = _timed(step, timer, iters, samplers[variant])
            except Exception as exc:
                row.note = f"failed in round {r + 1}: {type(exc).__name__}: {str(exc)[:300]}"
                continue
            row.round_medians_ms.append(round(statistics.median(t), 2))
            times[variant] += t
    for variant, (row, step) in live.items():
        if not row.note.startswith("failed"):
            with torch.no_grad():
                _finish(row, times[variant], samplers[variant], step, device, profile)


def run(preset: str = "wan-1.3b", resolution: str = "480p", layers: int | None = None, num_full_blocks: int | None = None,
        sparse_ratio: int = 2, variants=DEFAULT_VARIANTS, warmup: int = 2, iters: int = 5, device: str = "cuda",
        profile: bool = True, progress: bool = True, partial_json: str | None = None, rounds: int = 1,
        frames: int | None = None, reference: str | None = None) -> dict:
    """One step of each variant, side by side (see the module docstring). ``partial_json``: rewrite
    this file after every variant with the rows so far, so that a run cut short keeps them.

    ``rounds``: 1 times each variant right after compiling it (then drops it). More compiles every
    variant first and keeps them all, then times them interleaved (`_interleaved_rounds`); each row
    gets its per-round medians and its per-round ratios to the baseline, whose spread says how far
    a single run's ratio can be trusted. Peak memory then includes what the variants compiled
    before held (their weights and HiF8 codes). Ablations patch code while they run, so they time
    alone (rounds=1).

    ``reference``: the variant whose first-step output every other one is compared with (relative
    error of the outputs, each row's ``rel_err``); default dense + Inductor, else dense eager. With
    ``osp-hif8-fast`` as the reference, ``osp-hif8-fast-graphs`` shows what CUDA graphs change.
    Ablations give no output to compare."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: the bench times steps on a GPU (--device cpu runs a smoke test, "
                         "with a small --preset and --frames)")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least 1")
    if reference is None:
        reference = next((v for v in ("dense-inductor", "dense-eager") if v in variants), None)
    elif reference not in variants or reference in ABLATIONS:
        raise ValueError(f"reference={reference!r}: name one of the variants run ({', '.join(variants)}), not an "
                         "ablation")
    if rounds > 1 and any(v in ABLATIONS for v in variants):
        raise ValueError(f"rounds={rounds}: the ablations ({', '.join(v for v in variants if v in ABLATIONS)}) patch "
                         "code while they run and cannot be interleaved; time them with rounds=1")
    from . import OSPConfig, convert
    from .backend import osp_backend

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    work = workload(preset, resolution, layers, frames, device, dtype)
    model, args, kwargs, grid, total, frames = work.model, work.args, work.kwargs, work.grid, work.layers, work.frames
    full = full_blocks_for(total, preset, num_full_blocks)
    config = OSPConfig(sparse_ratio=sparse_ratio, layout="dual_end", num_full_blocks=full)
    timer = step_timer(device)
    setup = {  # what every result (and a partial one) says about the run
        "preset": preset, "resolution": resolution, "frames": frames, "layers": total, "full_blocks": full, "sparse_ratio": sparse_ratio,
        "grid": grid, "tokens": grid[0] * grid[1] * grid[2], "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "warmup": warmup, "iters": iters, "rounds": rounds,
        "layer_reduced": work.layer_reduced, "reference": reference,
    }
    rows: list[Row] = []

    def make(variant: str) -> Callable:
        if variant == "dense-eager":
            return model
        if variant == "dense-inductor":
            return torch.compile(model, dynamic=False)
        if variant == "dense-inductor-graphs":
            return torch.compile(model, mode="reduce-overhead", dynamic=False)
        if variant == "osp-convert":
            return convert(model, args, kwargs, config)
        # the backend callable itself: the same as backend="osp", without relying on the pip entry point
        compiled_as = ABLATIONS[variant].of if variant in ABLATIONS else variant
        if compiled_as in BACKEND_OPTIONS:
            opts = {"sparse_ratio": sparse_ratio, "layout": "dual_end", "num_full_blocks": full,
                    **BACKEND_OPTIONS[compiled_as]}
            return torch.compile(model, backend=osp_backend, options=opts, dynamic=False)
        raise ValueError(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")

    iterator = variants
    if progress:
        from tqdm import tqdm

        iterator = tqdm(variants, desc="bench", unit="variant")
    live: dict[str, tuple[Row, Callable]] = {}  # rounds > 1: compiled variants, timed after all compiled
    outputs: dict[str, torch.Tensor] = {}  # each valid variant's first-step output, on the CPU
    for variant in iterator:
        ablation = ABLATIONS.get(variant)
        row = Row(variant, note=VARIANT_HELP[variant] if ablation else "")
        try:
            if rounds == 1 or not live:  # interleaved variants stay compiled side by side
                torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad(), (ablation.patch() if ablation else contextlib.nullcontext()) as first_step_done:
                t0 = time.perf_counter()
                fn = make(variant)
                step = functools.partial(fn, *args, **kwargs)
                out = _output_tensor(step())
                if out is not None and not ablation:  # copied now: a CUDA graph's replay overwrites its outputs
                    outputs[variant] = out.detach().float().cpu()
                del out  # the GPU copy: not held through the other variants' compiles
                if device == "cuda":
                    torch.cuda.synchronize()
                row.compile_s = round(time.perf_counter() - t0, 1)
                if first_step_done is not None:
                    first_step_done()
                for _ in range(warmup):
                    step()
                if device == "cuda":
                    row.peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if rounds > 1:
                    live[variant] = (row, step)
                else:
                    sampler = GPUSampler(device)
                    _finish(row, _timed(step, timer, iters, sampler), sampler, step, device, profile)
            del fn, step
        except Exception as exc:  # one failing variant must not hide the others
            row.note = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        if progress:
            done = f"median {row.median_ms} ms, " if rounds == 1 else ""
            iterator.write(f"  {variant}: {done}compiled in {row.compile_s} s {row.note}".rstrip())
        if partial_json:
            dump({**setup, "partial": True, "rows": [asdict(r) for r in rows]}, partial_json)
    if live:
        _interleaved_rounds(live, timer, iters, rounds, device, profile, progress)
    baseline = next((r for r in rows if r.variant == "dense-inductor" and r.median_ms), None)
    for r in rows:
        if baseline and r.median_ms and r.variant not in ABLATIONS:
            r.speedup_vs_inductor = round(baseline.median_ms / r.median_ms, 3)
            r.round_speedups = [round(b / m, 3) for b, m in zip(baseline.round_medians_ms, r.round_medians_ms)]
        if reference in outputs and r.variant in outputs:
            r.rel_err = float(f"{rel_err(outputs[r.variant], outputs[reference]):.3g}")
    timed = {r.variant: r.median_ms for r in rows if r.median_ms}
    costs = []
    for name, a in ABLATIONS.items():
        if a.of in timed and name in timed:
            cost = timed[a.of] - timed[name]
            costs.append({"work": a.work, "of": a.of, "ablation": name, "ms": round(cost, 2),
                          "share_of_step": round(cost / timed[a.of], 4)})
    from .hif8 import cublaslt

    return {**setup, "ablation_costs": costs, "fp8_gemms": cublaslt.tuning_report(), "rows": [asdict(r) for r in rows]}


def table(result: dict) -> str:
    from .report import format_table

    head = (f"{result['preset']} {result['resolution']} {result.get('frames', 81)} frames, grid {tuple(result['grid'])} ({result['tokens']} tokens), "
            f"{result['layers']} blocks{' (layer-reduced)' if result['layer_reduced'] else ''}, dual_end "
            f"{result['full_blocks']} full, P={result['sparse_ratio']}, {result['dtype']}, {result['device']}, "
            f"torch {result['torch']}, median of {_samples(result)}")
    rows = [{"variant": r["variant"], "median ms": r["median_ms"], "min ms": r["min_ms"], "x vs dense+inductor":
             r["speedup_vs_inductor"], **_rounds_cell(result, r), f"rel err vs {result.get('reference')}": r.get("rel_err"),
             "compile s": r["compile_s"], "peak GiB": r["peak_gib"],
             "SM MHz / W / power-capped": _gpu_state_cell(r.get("gpu_state") or {}), "note": r["note"]}
            for r in result["rows"]]
    lines = [head, format_table(rows)]
    for cost in result.get("ablation_costs", ()):
        lines.append(f"  cost of {cost['work']} ({cost['of']} - {cost['ablation']}): {cost['ms']} ms = "
                     f"{100 * cost['share_of_step']:.1f}% of the {cost['of']} step")
    if any(c["ablation"] == "osp-no-relayout" for c in result.get("ablation_costs", ())):
        lines.append("  padding: none (packed layouts carry no padded row)")
    for g in result.get("fp8_gemms", ()):
        if "refused" in g:
            how = f"torch._scaled_mm, cuBLASLt refused it ({g['refused']})"
        elif g.get("cached"):
            how = f"cuBLASLt candidate {g['chosen']} of {g['candidates']} (the pick cached by an earlier run)"
        elif g["candidates_ms"] is None:
            how = f"cuBLASLt's first guess of {g['candidates']}, not timed"
        else:
            how = (f"cuBLASLt candidate {g['chosen']} of {g['candidates']} (timed ms: "
                   + ", ".join(f"{t:.3f}" for t in g["candidates_ms"]) + ")")
        lines.append(f"  FP8 GEMM {g['m']}x{g['k']} @ {g['k']}x{g['n']}: {how}")
    for r in result["rows"]:
        if r["breakdown"]:
            parts = ", ".join(f"{k} {v['ms']} ms ({100 * v['share']:.1f}%)" for k, v in r["breakdown"].items()
                              if k not in ("top_kernels", "attention_calls_ms", "timeline"))
            t = r["breakdown"].get("timeline")
            idle = f"; GPU idle {t['idle_ms']} of {t['span_ms']} ms ({t['gaps']} gaps)" if t else ""
            lines.append(f"  profile {r['variant']}: {parts}{idle}")
    return "\n".join(lines)


def _samples(result: dict) -> str:
    rounds = result.get("rounds", 1)
    if rounds == 1:
        return str(result["iters"])
    return f"{rounds} interleaved rounds x {result['iters']} (peak GiB includes the variants compiled before)"


def _rounds_cell(result: dict, row: dict) -> dict:
    """With interleaved rounds: the column of per-round ratios, as their median and range."""
    if result.get("rounds", 1) == 1:
        return {}
    x = row.get("round_speedups") or []
    cell = f"{statistics.median(x):.3f} ({min(x):.3f}-{max(x):.3f})" if x else "-"
    return {"x per round: median (min-max)": cell}


def _gpu_state_cell(state: dict) -> str:
    if not state:
        return "-"
    return f"{state['sm_mhz_median']:.0f} / {state['power_w_median']:.0f} / {100 * state['power_capped_share']:.0f}%"


def dump(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
