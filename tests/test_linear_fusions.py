"""Fusions into linears (OSPConfig.fuse_linears): the per-class output projection of packed sparse
sites and linear + GELU as one op; exact against the unfused conversion and the masked oracle, what
they leave alone, and when CUDA's cuBLASLt epilogue kernel may take the fused op."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from osp_compile import OSPConfig, convert
from osp_compile.lowering.cuda_linear import epilogue_refusal, linear_gelu_cublaslt
from osp_compile.oracle import masked_oracle, rel_err
from osp_compile.ops import folded_attention, folded_attention_linear, linear_gelu
from osp_compile.pipeline import PassContext, SiteRegistry
from osp_compile.report import OSPReport
from passes.linear_gelu import linear_gelu_pass
from reference_model import PRESETS, build_model, make_inputs

LATENT = (3, 14, 20)  # grid (3, 7, 10): H odd, so each sparse site has two length classes
GRID = (3, 7, 10)


def _rows(report, name):
    return [r for g in report.graphs for p in g.passes if p.name == name for r in p.rows]


def _targets(report):
    return {n.target for g in report.graphs for n in g.module.graph.nodes if n.op == "call_function"}


def _model(layers=4):
    model = build_model("tiny", num_layers=layers, seed=1)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=LATENT, seed=2)
    return model, args, kwargs


def test_fused_conversion_matches_unfused_and_oracle_with_gradients():
    model, args, kwargs = _model()
    config = OSPConfig(num_full_blocks=2)
    fused = convert(model, args, kwargs, config)
    plain = convert(model, args, kwargs, config.replace(fuse_linears=False))
    assert folded_attention_linear in _targets(fused.osp_report) and folded_attention not in _targets(fused.osp_report)
    assert folded_attention in _targets(plain.osp_report) and linear_gelu not in _targets(plain.osp_report)
    projected = _rows(fused.osp_report, "attention_projection")
    assert [r["decision"] for r in projected] == ["projected per length class"] * 2
    assert len(_rows(fused.osp_report, "linear_gelu")) == 4 + 1  # every FFN, and the text embedding's MLP

    x = args[0].clone().requires_grad_(True)
    weight = torch.randn(fused(*args, **kwargs).shape, generator=torch.Generator().manual_seed(5))
    outs, grads = [], []
    for module in (fused, plain):
        model.zero_grad()
        out = module(x, *args[1:], **kwargs)
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} | {"x": x.grad.clone()})
        x.grad = None
    with torch.no_grad(), masked_oracle(fused.osp_report.layout, GRID, 2):
        oracle = model(*args, **kwargs)
    assert rel_err(outs[0], oracle) <= 1e-5
    assert rel_err(outs[0], outs[1]) <= 1e-6
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert rel_err(g, grads[1][name]) <= 1e-5, name


@pytest.mark.parametrize("config,why", [
    (OSPConfig(num_full_blocks=2, quant="hif8"), "the output projection is hif8_qat_linear"),
    (OSPConfig(num_full_blocks=2, lora_rank=2), "not read by one linear alone"),
])
def test_projection_kept_where_the_linear_needs_the_whole_activation(config, why):
    model, args, kwargs = _model()
    converted = convert(model, args, kwargs, config)
    rows = _rows(converted.osp_report, "attention_projection")
    assert len(rows) == 2 and all(why in r["decision"] for r in rows)
    assert folded_attention in _targets(converted.osp_report)


class _MLP(nn.Module):
    def __init__(self, bias=True, approximate="tanh"):
        super().__init__()
        self.up, self.down, self.approximate = nn.Linear(16, 32, bias=bias), nn.Linear(32, 16), approximate

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


def _refusals(module, x, grad):
    """Capture `module` with Dynamo, run the linear + GELU pass, and ask the CUDA kernel's check."""
    seen = []

    def backend(gm, example_inputs):
        ctx = PassContext(OSPConfig(), SiteRegistry(OSPConfig()), OSPReport())
        gm, _ = linear_gelu_pass(gm, ctx)
        seen.extend(epilogue_refusal(n) for n in gm.graph.nodes if n.target is linear_gelu)
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(module, backend=backend, dynamic=False)(x)
    assert len(seen) == 1
    return seen[0]


def test_cuda_epilogue_kernel_only_where_it_computes_the_op():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert _refusals(_MLP().to(torch.bfloat16), x, grad=False) is None
    assert "tanh" in _refusals(_MLP(approximate="none").to(torch.bfloat16), x, grad=False)
    assert "bias" in _refusals(_MLP(bias=False).to(torch.bfloat16), x, grad=False)
    assert "dtypes" in _refusals(_MLP(), x.float(), grad=False)
    assert "autograd" in _refusals(_MLP().to(torch.bfloat16), x, grad=True)


def test_inductor_keeps_the_epilogue_call_whole():
    """The CUDA kernel relies on Inductor running _addmm_activation as one external call (not
    decomposed back into addmm + gelu); checked on the CPU, where the same rule applies."""
    from torch._inductor.utils import run_and_get_code

    b, x, w = torch.randn(8), torch.randn(4, 16), torch.randn(8, 16)
    with torch.no_grad():
        _, codes = run_and_get_code(torch.compile(lambda b, x, w: torch._addmm_activation(b, x, w.t(), use_gelu=True) * 2),
                                    b, x, w)
    assert any("aten._addmm_activation" in line and "buf" in line for line in codes[0].splitlines())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuBLASLt)")
def test_cublaslt_gelu_epilogue_against_float64():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 100, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16, generator=g)
    out = linear_gelu_cublaslt(x, w, b, "tanh")
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_err(out.double(), ref) <= 4e-3  # bf16 output rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_converted_bf16_model_on_cuda_matches_the_float32_oracle():
    """The whole lowered graph on the GPU (cuDNN/flash SDPA per length class, the per-class
    projections, cuBLASLt's GELU epilogue, Inductor) against the masked oracle in float32."""
    model, args, kwargs = _model()
    model = model.cuda()
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    config = OSPConfig(num_full_blocks=2)
    with torch.no_grad():
        with masked_oracle(config.resolve_layout(4), GRID, 2):
            oracle = model(*args, **kwargs)
        model16 = model.to(torch.bfloat16)
        args16 = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)
        kwargs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kwargs.items()}
        converted = convert(model16, args16, kwargs16, config)
        out = converted(*args16, **kwargs16)
    kernels = {r["kernel"] for r in _rows(converted.osp_report, "lowering")}
    assert "cuBLASLt GEMM + GELU epilogue (_addmm_activation)" in kernels
    assert folded_attention_linear in _targets(converted.osp_report)
    assert rel_err(out.float(), oracle) <= 3e-2  # bf16 weights and activations against float32
