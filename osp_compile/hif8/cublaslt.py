"""FP8 GEMMs through cuBLASLt itself, with the algorithm chosen by timing.

``torch._scaled_mm`` (per-tensor scales) is cuBLASLt with its heuristic's first algorithm.  At
the Wan-14B 720P block's shapes that guess is not always the fastest of the heuristic's own
candidates: the FFN's down projection (13,824 -> 5120) ran 7% faster with its seventh candidate
(BENCHMARKS.md, fifteenth session).  `fp8_gemm` asks the heuristic for up to eight candidates,
times them on the first call of each problem (`_tune`; the choice and the times are in
`tuning_report`), and runs the fastest from then on.  The candidates compute the same GEMM with
other tiles and schedules; at the block's shapes their outputs were bitwise equal to
``_scaled_mm``'s.

The picks are kept in a JSON file (`_cache_path`: ``$OSP_FP8_GEMM_CACHE``, by default
``osp_fp8_gemms.json`` in Inductor's cache directory; an empty value turns it off), keyed by GPU
name, cuBLASLt version and problem, so a later process runs the same algorithms without timing
them again: candidates within a percent or two of each other otherwise swap places from run to run.

Called through ``ctypes`` on the ``libcublasLt`` that torch itself loaded (``/proc/self/maps``),
so no extension is built and the library is the one ``_scaled_mm`` runs.  Descriptors and
candidates are made once per problem (`_plan`); a call sets its pointers and launches on torch's
current stream, which CUDA graphs can record (tuning is skipped while a graph is captured: the
heuristic's first guess then stays).  Row-major torch tensors are cuBLAS's column-major
transposes: ``D^T [N, M] = W [N, K] @ X^T [K, M]`` is cuBLAS's "TN" form, the one its FP8 kernels
take (A = the weight, transposed; B = the activation).

What cuBLASLt cannot do here, probed: write ``max|D|`` (``CUBLASLT_MATMUL_DESC_AMAX_D_POINTER``)
of a bfloat16 output -- it refuses with ``CUBLAS_STATUS_INVALID_VALUE``, so the FFN's GELU max
pass cannot move into the first GEMM's epilogue.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass

import torch

# cuBLAS / CUDA enums (cublasLt.h, library_types.h)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF, _CUDA_R_8F_E4M3 = 0, 2, 14, 28
_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_A_SCALE, _DESC_B_SCALE, _DESC_FAST_ACCUM, _DESC_BIAS_TYPE = 17, 18, 25, 26
_EPILOGUE_DEFAULT, _EPILOGUE_BIAS = 1, 4
_PREF_MAX_WORKSPACE = 1
_CANDIDATES = 8  # heuristic results to time
_WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper
_OUT_TYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}


class CublasLtError(RuntimeError):
    """cuBLASLt is missing or refused a problem (the message says which and what to do)."""


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _loaded_library_path() -> str | None:
    """The ``libcublasLt`` this process has mapped (torch's), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libcublasLt.so" in path:
                    return path
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    torch.empty(16, 16, device="cuda") @ torch.empty(16, 16, device="cuda")  # torch loads cuBLAS(Lt) lazily
    path = _loaded_library_path() or ctypes.util.find_library("cublasLt")
    if path is None:
        raise CublasLtError("no libcublasLt in this process or on the library path: the cuBLASLt FP8 GEMM needs "
                            "torch's CUDA build (which ships it)")
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise CublasLtError(f"cannot load {path}: {exc}") from exc
    p, i, u64, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64
    pp = ctypes.POINTER(ctypes.c_void_p)
    signatures = {
        "cublasLtCreate": (pp,),
        "cublasLtMatmulDescCreate": (pp, i, i),
        "cublasLtMatmulDescSetAttribute": (p, i, p, ctypes.c_size_t),
        "cublasLtMatrixLayoutCreate": (pp, i, u64, u64, i64),
        "cublasLtMatmulPreferenceCreate": (pp,),
        "cublasLtMatmulPreferenceSetAttribute": (p, i, p, ctypes.c_size_t),
        "cublasLtMatmulAlgoGetHeuristic": (p, p, p, p, p, p, p, i, ctypes.POINTER(_HeuristicResult),
                                           ctypes.POINTER(i)),
        "cublasLtMatmul": (p, p, p, p, p, p, p, p, p, p, p, p, p, p, ctypes.c_size_t, p),
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.cublasLtGetVersion.argtypes, lib.cublasLtGetVersion.restype = (), ctypes.c_size_t
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"cuBLASLt {what} failed with status {status}")


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


@dataclass(frozen=True)
class _Problem:
    device: int
    m: int
    n: int
    k: int
    out_type: int
    bias: bool
    fast_accum: bool


def _problem_of(x8: torch.Tensor, w8: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                fast_accum: bool) -> _Problem:
    return _Problem(x8.device.index or 0, x8.shape[0], w8.shape[0], x8.shape[-1], _OUT_TYPES.get(out_dtype, -1),
                    bias is not None, fast_accum)


@dataclass
class _Plan:
    desc: ctypes.c_void_p
    layouts: tuple  # A (weight), B (activation), D
    algos: list  # the heuristic's candidates, best guess first
    chosen: int | None = None  # index into algos, once tuned
    timings: list | None = None  # ms per candidate, from the tuning
    cached: bool = False  # chosen read from the pick cache, not timed here


@functools.lru_cache(maxsize=None)
def _handle(device: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(_lib().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    return handle


@functools.lru_cache(maxsize=None)
def _workspace(device: int) -> torch.Tensor:
    return torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device("cuda", device))


_PLANS: dict[_Problem, _Plan] = {}


def _plan(problem: _Problem) -> _Plan:
    if problem not in _PLANS:
        _PLANS[problem] = _new_plan(problem)
    return _PLANS[problem]


def tuning_report() -> list[dict]:
    """Per problem this process ran: its shape, the candidates' times (ms) and the one chosen; or
    why cuBLASLt refused it (`fp8_gemm_or_none`)."""
    rows = [{"m": p.m, "n": p.n, "k": p.k, "bias": p.bias, "fast_accum": p.fast_accum, "candidates": len(plan.algos),
             "chosen": plan.chosen, "candidates_ms": plan.timings, "cached": plan.cached} for p, plan in _PLANS.items()]
    return rows + [{"m": p.m, "n": p.n, "k": p.k, "refused": why} for p, why in _REFUSED.items()]


def _new_plan(problem: _Problem) -> _Plan:
    lib = _lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _CUDA_R_32F), "cublasLtMatmulDescCreate")
    set_desc = lib.cublasLtMatmulDescSetAttribute
    _set(set_desc, desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
    _set(set_desc, desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
    _set(set_desc, desc, _DESC_EPILOGUE, ctypes.c_uint32(_EPILOGUE_BIAS if problem.bias else _EPILOGUE_DEFAULT))
    if problem.bias:
        _set(set_desc, desc, _DESC_BIAS_TYPE, ctypes.c_int32(problem.out_type))
    _set(set_desc, desc, _DESC_FAST_ACCUM, ctypes.c_int8(int(problem.fast_accum)))
    # the heuristic only reads whether these pointers are set (and their alignment): 256-aligned placeholders
    placeholder = ctypes.c_void_p(256)
    for attr in (_DESC_A_SCALE, _DESC_B_SCALE) + ((_DESC_BIAS_POINTER,) if problem.bias else ()):
        _set(set_desc, desc, attr, placeholder)
    layouts = []
    for dtype, rows, cols in ((_CUDA_R_8F_E4M3, problem.k, problem.n), (_CUDA_R_8F_E4M3, problem.k, problem.m),
                              (problem.out_type, problem.n, problem.m)):
        layout = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, rows), "layout")
        layouts.append(layout)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
    _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(_WORKSPACE_BYTES))
    results, count = (_HeuristicResult * _CANDIDATES)(), ctypes.c_int(0)
    a, b, d = layouts
    status = lib.cublasLtMatmulAlgoGetHeuristic(_handle(problem.device), desc, a, b, d, d, pref, _CANDIDATES,
                                                results, ctypes.byref(count))
    if status != 0 or count.value == 0:
        raise CublasLtError(f"cuBLASLt has no FP8 kernel for {problem} (status {status}): use torch._scaled_mm")
    return _Plan(desc, tuple(layouts), [results[i] for i in range(count.value)])


def _launch(plan: _Plan, algo: _HeuristicResult, x8, x_scale, w8, w_scale, bias, out) -> None:
    lib = _lib()
    set_desc = lib.cublasLtMatmulDescSetAttribute
    _set(set_desc, plan.desc, _DESC_A_SCALE, ctypes.c_void_p(w_scale.data_ptr()))
    _set(set_desc, plan.desc, _DESC_B_SCALE, ctypes.c_void_p(x_scale.data_ptr()))
    if bias is not None:
        _set(set_desc, plan.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    a, b, d = plan.layouts
    device = out.device.index
    _check(lib.cublasLtMatmul(
        _handle(device), plan.desc, ctypes.byref(alpha), ctypes.c_void_p(w8.data_ptr()), a,
        ctypes.c_void_p(x8.data_ptr()), b, ctypes.byref(beta), ctypes.c_void_p(out.data_ptr()), d,
        ctypes.c_void_p(out.data_ptr()), d, ctypes.byref(algo.algo), ctypes.c_void_p(_workspace(device).data_ptr()),
        _WORKSPACE_BYTES, ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream)), "cublasLtMatmul")


def _tune(plan: _Plan, run, rounds: int = 5, repeats: int = 5) -> int:
    """The fastest of the heuristic's candidates on these operands: ``rounds`` round-robin passes
    over them (so clock drift reaches all alike), each ``repeats`` launches; the least median wins
    (kept in ``plan.timings``, ms per launch; inf for a candidate that failed to launch)."""
    times = [[] for _ in plan.algos]
    failed = set()  # candidates that fail to launch: never chosen
    for i, algo in enumerate(plan.algos):
        try:
            run(algo)
        except CublasLtError:
            failed.add(i)
    for _ in range(rounds):
        for i, algo in enumerate(plan.algos):
            if i in failed:
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                run(algo)
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end))
    medians = [float("inf") if i in failed else sorted(t)[len(t) // 2] / repeats for i, t in enumerate(times)]
    plan.timings = medians
    return medians.index(min(medians))


def _cache_path() -> str | None:
    """Where timed picks are kept (module docstring); None: not kept."""
    path = os.environ.get("OSP_FP8_GEMM_CACHE")
    if path is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir
            directory = cache_dir()
        except ImportError:
            directory = tempfile.gettempdir()
        path = os.path.join(directory, "osp_fp8_gemms.json")
    return path or None


def _cache_key(problem: _Problem) -> str:
    return (f"{torch.cuda.get_device_name(problem.device)} | cuBLASLt {_lib().cublasLtGetVersion()} | "
            f"{problem.m}x{problem.k} @ {problem.k}x{problem.n} | out {problem.out_type} | bias {problem.bias} | "
            f"fast_accum {problem.fast_accum}")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            picks = json.load(f)
        return picks if isinstance(picks, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: time again
        return {}


def _cached_pick(problem: _Problem, plan: _Plan) -> int | None:
    """The pick kept for this problem, if it still fits its candidates."""
    path = _cache_path()
    entry = _read_cache(path).get(_cache_key(problem)) if path else None
    if not isinstance(entry, dict) or entry.get("candidates") != len(plan.algos):
        return None
    chosen = entry.get("chosen")
    return chosen if isinstance(chosen, int) and 0 <= chosen < len(plan.algos) else None


def _keep_pick(problem: _Problem, plan: _Plan) -> None:
    """Add this problem's pick to the cache file (written whole, then renamed: readers never see a
    half-written file; concurrent writers may drop each other's new entries, which are timed again)."""
    path = _cache_path()
    if not path:
        return
    picks = _read_cache(path)
    picks[_cache_key(problem)] = {"chosen": plan.chosen, "candidates": len(plan.algos), "ms": plan.timings}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(picks, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"osp_compile: cannot keep the FP8 GEMM picks in {path} ({exc}); set OSP_FP8_GEMM_CACHE to a "
                      "writable file, or to an empty value to turn the cache off", stacklevel=3)


def _choose(problem: _Problem, plan: _Plan, run) -> int:
    """The candidate to run from now on: the cached pick, else the fastest by `_tune` (kept)."""
    cached = _cached_pick(problem, plan)
    if cached is not None:
        plan.cached = True
        return cached
    plan.chosen = _tune(plan, run)
    _keep_pick(problem, plan)
    return plan.chosen


_REFUSED: dict[_Problem, str] = {}


def fp8_gemm_or_none(x8: torch.Tensor, x_dequant: torch.Tensor, w8: torch.Tensor, w_dequant: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, *, fast_accum: bool = False) -> torch.Tensor | None:
    """`fp8_gemm`, or None where cuBLASLt refuses the problem or the operands (the caller then runs
    ``torch._scaled_mm``, the same GEMM); each refusal is warned once and kept in `tuning_report`."""
    try:
        return fp8_gemm(x8, x_dequant, w8, w_dequant, bias, out_dtype, fast_accum=fast_accum)
    except CublasLtError as exc:
        key = _problem_of(x8, w8, bias, out_dtype, fast_accum)
        if key not in _REFUSED:
            _REFUSED[key] = str(exc)
            warnings.warn(f"osp_compile: {exc}; this GEMM runs through torch._scaled_mm", stacklevel=2)
        return None


def fp8_gemm(x8: torch.Tensor, x_dequant: torch.Tensor, w8: torch.Tensor, w_dequant: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16, *, fast_accum: bool = False,
             tune: bool = True, algo_index: int | None = None) -> torch.Tensor:
    """``x8 @ w8^T * x_dequant * w_dequant + bias`` in ``out_dtype``: what ``torch._scaled_mm``
    computes with per-tensor scales, with cuBLASLt's algorithm chosen by timing (``tune``: the
    first call of each problem takes the cached pick or times the heuristic's candidates; else
    its first guess, or ``algo_index``).

    ``x8`` [M, K] and ``w8`` [N, K] contiguous E4M3, the dequantization scales float32 with one
    element, ``bias`` [N] (cast to ``out_dtype``, as cuBLASLt takes it).  Raises `CublasLtError`
    where cuBLASLt refuses the problem."""
    if out_dtype not in _OUT_TYPES:
        raise CublasLtError(f"out_dtype {out_dtype}: the cuBLASLt FP8 path writes bfloat16 or float16")
    for name, t in (("x8", x8), ("w8", w8)):
        if t.dtype != torch.float8_e4m3fn or t.dim() != 2 or not t.is_contiguous() or t.data_ptr() % 16:
            raise CublasLtError(f"{name} must be a contiguous, 16-byte aligned 2-D float8_e4m3fn tensor, got "
                                f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    k, n = x8.shape[1], w8.shape[0]
    if w8.shape[1] != k or k % 16 or n % 16:
        raise CublasLtError(f"x8 {tuple(x8.shape)} @ w8 {tuple(w8.shape)}^T: K must match and K, N be multiples of 16")
    if not (x8.is_cuda and w8.is_cuda):
        raise CublasLtError(f"x8 on {x8.device}, w8 on {w8.device}: cuBLASLt needs CUDA tensors")
    problem = _problem_of(x8, w8, bias, out_dtype, fast_accum)  # a CUDA tensor's device has its index
    plan = _plan(problem)
    out = torch.empty(problem.m, n, dtype=out_dtype, device=x8.device)
    x_scale, w_scale = x_dequant.to(torch.float32).contiguous(), w_dequant.to(torch.float32).contiguous()
    bias = None if bias is None else bias.to(out_dtype).contiguous()

    def run(algo):
        _launch(plan, algo, x8, x_scale, w8, w_scale, bias, out)

    if algo_index is None:
        if plan.chosen is None and tune and len(plan.algos) > 1 and not torch.cuda.is_current_stream_capturing():
            plan.chosen = _choose(problem, plan, run)
        algo_index = plan.chosen or 0
    run(plan.algos[algo_index])
    return out  # the scale and bias copies may be freed now: the allocator reuses memory in this stream's order
