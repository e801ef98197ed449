"""The FP8 GEMM through cuBLASLt (``osp_compile/hif8/cublaslt.py``): every candidate the tuning
may pick computes the GEMM (float64 reference), the pick is recorded and cached for later
processes, a refused problem runs through ``torch._scaled_mm`` with a warning, CUDA graphs record
it; bad operands are refused with the reason, and the pick cache is read and written as
documented, on any machine."""
import json
import subprocess
import sys

import pytest
import torch

from osp_compile.hif8 import cublaslt, fp8
from osp_compile.oracle import rel_err
from markers import needs_sm89


def _operands(m: int, k: int, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x8 = (torch.randn(m, k, generator=g) * 40).clamp(-240, 240).to(torch.float8_e4m3fn)
    w8 = (torch.randn(n, k, generator=g) * 40).clamp(-240, 240).to(torch.float8_e4m3fn)
    x_dequant, w_dequant = torch.tensor(0.003), torch.tensor(0.0007)
    bias = torch.randn(n, generator=g)
    return [t.to(device) for t in (x8, x_dequant, w8, w_dequant, bias)]


def _float64(x8, x_dequant, w8, w_dequant, bias):
    out = (x8.double() @ w8.double().t()) * (x_dequant.double() * w_dequant.double())
    return out if bias is None else out + bias.double()


def test_bad_operands_are_refused_with_the_reason():
    x8, x_dequant, w8, w_dequant, bias = _operands(32, 64, 48, "cpu")
    cases = {
        "bfloat16 or float16": dict(out_dtype=torch.float32),
        "float8_e4m3fn": dict(x8=x8.float()),
        "contiguous": dict(w8=w8.t().contiguous().t()),
        "K must match": dict(w8=w8[:, :48].contiguous()),
        "CUDA tensors": {},
    }
    for reason, change in cases.items():
        args = dict(x8=x8, x_dequant=x_dequant, w8=w8, w_dequant=w_dequant, bias=bias, out_dtype=torch.bfloat16)
        args.update(change)
        with pytest.raises(cublaslt.CublasLtError, match=reason):
            cublaslt.fp8_gemm(**args)


def test_an_unknown_gemm_library_is_refused_at_import():
    run = subprocess.run([sys.executable, "-c", "import osp_compile.hif8.fp8"], capture_output=True, text=True,
                         env={"OSP_FP8_GEMM": "cutlass", "PATH": ""})
    assert run.returncode != 0 and "OSP_FP8_GEMM='cutlass': use one of ('cublaslt', 'scaled_mm')" in run.stderr


class _FakePlan:
    def __init__(self, candidates: int):
        self.algos, self.chosen, self.timings, self.cached = [object()] * candidates, None, None, False


@pytest.fixture
def pick_cache(tmp_path, monkeypatch):
    """The pick cache in a temporary file, keyed without a GPU."""
    path = tmp_path / "picks.json"
    monkeypatch.setenv("OSP_FP8_GEMM_CACHE", str(path))
    monkeypatch.setattr(cublaslt, "_cache_key", lambda p: f"{p.m}x{p.k} @ {p.k}x{p.n}")
    return path


def test_a_timed_pick_is_kept_and_read_back_by_a_later_process(pick_cache, monkeypatch):
    problem = cublaslt._Problem(0, 75600, 5120, 13824, 14, True, True)
    timed = []

    def tune(plan, run):
        timed.append(plan)
        plan.timings = [7.9, 7.5, 7.3]
        return 2

    monkeypatch.setattr(cublaslt, "_tune", tune)
    first = _FakePlan(3)
    assert cublaslt._choose(problem, first, run=None) == 2 and len(timed) == 1 and not first.cached
    entry = json.loads(pick_cache.read_text())["75600x13824 @ 13824x5120"]
    assert entry == {"chosen": 2, "candidates": 3, "ms": [7.9, 7.5, 7.3]}
    later = _FakePlan(3)  # a new process: a new plan, the same problem
    assert cublaslt._choose(problem, later, run=None) == 2 and len(timed) == 1 and later.cached
    other = cublaslt._Problem(0, 4096, 5120, 5120, 14, True, True)
    assert cublaslt._choose(other, _FakePlan(3), run=None) == 2 and len(timed) == 2
    assert len(json.loads(pick_cache.read_text())) == 2  # both problems kept


def test_a_pick_that_no_longer_fits_is_timed_again(pick_cache, monkeypatch):
    problem = cublaslt._Problem(0, 300, 64, 128, 14, False, False)
    monkeypatch.setattr(cublaslt, "_tune", lambda plan, run: 1)
    pick_cache.write_text(json.dumps({"300x128 @ 128x64": {"chosen": 5, "candidates": 8}}))
    assert cublaslt._cached_pick(problem, _FakePlan(4)) is None  # another candidate count: another library state
    pick_cache.write_text(json.dumps({"300x128 @ 128x64": {"chosen": 7, "candidates": 4}}))
    assert cublaslt._cached_pick(problem, _FakePlan(4)) is None  # out of range
    pick_cache.write_text("{not json")
    assert cublaslt._cached_pick(problem, _FakePlan(4)) is None
    assert cublaslt._choose(problem, _FakePlan(4), run=None) == 1  # and the corrupt file is replaced
    assert json.loads(pick_cache.read_text())["300x128 @ 128x64"]["chosen"] == 1


def test_the_pick_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("OSP_FP8_GEMM_CACHE", "")
    assert cublaslt._cache_path() is None
    monkeypatch.setattr(cublaslt, "_tune", lambda plan, run: 0)
    monkeypatch.setattr(cublaslt, "_cache_key", lambda p: pytest.fail("no cache, no key"))
    assert cublaslt._choose(cublaslt._Problem(0, 16, 16, 16, 14, False, False), _FakePlan(2), run=None) == 0
    monkeypatch.delenv("OSP_FP8_GEMM_CACHE")  # unset: the default file
    assert cublaslt._cache_path().endswith("osp_fp8_gemms.json")


@needs_sm89
def test_a_later_process_runs_the_cached_pick(tmp_path, monkeypatch):
    monkeypatch.setenv("OSP_FP8_GEMM_CACHE", str(tmp_path / "picks.json"))
    monkeypatch.setattr(cublaslt, "_PLANS", {})
    monkeypatch.setattr(cublaslt, "_REFUSED", {})
    x8, x_dequant, w8, w_dequant, bias = _operands(1024, 256, 512, "cuda", seed=7)
    first = cublaslt.fp8_gemm(x8, x_dequant, w8, w_dequant, bias)
    (row,) = cublaslt.tuning_report()
    assert row["candidates_ms"] is not None and not row["cached"]
    monkeypatch.setattr(cublaslt, "_PLANS", {})  # as in a new process
    monkeypatch.setattr(cublaslt, "_tune", lambda plan, run: pytest.fail("timed again"))
    again = cublaslt.fp8_gemm(x8, x_dequant, w8, w_dequant, bias)
    (row_again,) = cublaslt.tuning_report()
    assert row_again["cached"] and row_again["chosen"] == row["chosen"] and torch.equal(first, again)


@needs_sm89
@pytest.mark.parametrize("m", [300, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_every_candidate_computes_the_gemm(m, with_bias, out_dtype, fast_accum):
    x8, x_dequant, w8, w_dequant, bias = _operands(m, 512, 384, "cuda", seed=m)
    bias = bias if with_bias else None
    want = _float64(x8, x_dequant, w8, w_dequant, bias)
    tuned = cublaslt.fp8_gemm(x8, x_dequant, w8, w_dequant, bias, out_dtype, fast_accum=fast_accum)
    plan = cublaslt._plan(cublaslt._Problem(0, m, 384, 512, cublaslt._OUT_TYPES[out_dtype], with_bias, fast_accum))
    assert plan.chosen is not None and len(plan.timings) == len(plan.algos)
    outs = [tuned] + [cublaslt.fp8_gemm(x8, x_dequant, w8, w_dequant, bias, out_dtype, fast_accum=fast_accum,
                                        algo_index=i) for i in range(len(plan.algos))]
    for out in outs:
        assert out.dtype == out_dtype and out.shape == (m, 384)
        assert rel_err(out.double().cpu(), want.cpu()) <= 4e-3  # one rounding to 8 mantissa bits (fp16: 11)
    ref = torch._scaled_mm(x8, w8.t(), scale_a=x_dequant, scale_b=w_dequant,
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                           use_fast_accum=fast_accum)
    assert rel_err(tuned.double().cpu(), ref.double().cpu()) <= 4e-3
    row = next(r for r in cublaslt.tuning_report() if (r["m"], r["n"], r["k"]) == (m, 384, 512)
               and r.get("bias") == with_bias and r.get("fast_accum") == fast_accum)
    assert 0 <= row["chosen"] < row["candidates"]


@needs_sm89
def test_a_refused_problem_runs_through_scaled_mm(monkeypatch):
    x8, x_dequant, w8, w_dequant, bias = _operands(256, 128, 64, "cuda", seed=3)

    def refuse(problem):
        raise cublaslt.CublasLtError(f"no FP8 kernel for {problem} (test)")

    monkeypatch.setattr(cublaslt, "_new_plan", refuse)
    monkeypatch.setattr(cublaslt, "_PLANS", {})
    monkeypatch.setattr(cublaslt, "_REFUSED", {})
    with pytest.warns(UserWarning, match="runs through torch._scaled_mm"):
        got = fp8.fp8_matmul(x8, x_dequant, w8, w_dequant, bias, torch.bfloat16)
    monkeypatch.setattr(fp8, "GEMM", "scaled_mm")
    assert torch.equal(got, fp8.fp8_matmul(x8, x_dequant, w8, w_dequant, bias, torch.bfloat16))
    assert [r["refused"] for r in cublaslt.tuning_report()] == ["no FP8 kernel for " + str(
        cublaslt._Problem(0, 256, 64, 128, cublaslt._OUT_TYPES[torch.bfloat16], True, False)) + " (test)"]


@needs_sm89
def test_cuda_graphs_record_the_cublaslt_gemm():
    x8, x_dequant, w8, w_dequant, bias = _operands(512, 256, 128, "cuda", seed=5)
    eager = cublaslt.fp8_gemm(x8, x_dequant, w8, w_dequant, bias)  # tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recorded = cublaslt.fp8_gemm(x8, x_dequant, w8, w_dequant, bias)
    x8.copy_((x8.float() * -1).to(torch.float8_e4m3fn))  # new inputs in the recorded buffer
    graph.replay()
    assert not torch.equal(recorded, eager)
    assert rel_err(recorded.double().cpu(), _float64(x8, x_dequant, w8, w_dequant, bias).cpu()) <= 4e-3
