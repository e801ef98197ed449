"""The FP8 GEMM through cuBLASLt (``osp_compile/hif8/cublaslt.py``): every candidate the tuning
may pick computes the GEMM (float64 reference), the pick is recorded, a refused problem runs
through ``torch._scaled_mm`` with a warning, CUDA graphs record it; bad operands are refused
with the reason on any machine."""
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
