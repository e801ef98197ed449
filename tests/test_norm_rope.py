"""RMSNorm + RoPE as one op (OSPConfig.fuse_norm_rope): the pass on the reference model, exact
against the unfused conversion with gradients; what it leaves alone; the Triton kernel against the
op's calls (interpreted on CPU, compiled on CUDA) and against float64; its fallback and when
lowering may pick it."""
import pytest
import torch
import torch.nn as nn

from osp_compile import OSPConfig, convert
from osp_compile.backend import osp_backend, report_for
from osp_compile.lowering import cuda_norm_rope
from osp_compile.oracle import rel_err
from osp_compile.ops import rms_norm_rope
from reference_model import PRESETS, build_model, make_inputs
from reference_model.model import RMSNorm, apply_rope, rope_cos_sin
from test_hif8_fusions import output_and_input_grad
from test_linear_fusions import _rows
from markers import as_if_triton_on_cuda, needs_cuda, needs_interp


LATENT = (3, 14, 20)  # two length classes per sparse site
SMALL = (2, 4, 8)
KERNEL = "Triton RMSNorm + RoPE (one pass, pairs split in registers)"


def _convert(fuse: bool, latent=LATENT, **options):
    model = build_model("tiny", num_layers=2, seed=1)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=latent, seed=2)
    x = args[0].clone().requires_grad_(True)
    config = OSPConfig(num_full_blocks=1, fuse_norm_rope=fuse, **options)
    return convert(model, (x, *args[1:]), kwargs, config), (x, *args[1:]), kwargs


def test_pass_fuses_each_self_attention_q_and_k_and_equals_the_unfused_conversion():
    """Both blocks (one full, one sparse: its tables come through the token layout) fuse q and k;
    the cross-attention's q/k norms have no RoPE and stay. On CPU the op runs its calls: outputs and
    input gradients are those of the unfused conversion bit for bit."""
    outs = {}
    for fuse in (False, True):
        converted, args, kwargs = _convert(fuse)
        rows = _rows(converted.osp_report, "norm_rope")
        if fuse:
            assert [r["decision"].split(":")[0] for r in rows].count("fused") == 4
            kept = [r["decision"] for r in rows if r["decision"].startswith("kept")]
            assert kept == ["kept: no interleaved rotary embedding reads the view alone"] * 4
        else:
            assert rows == []
        outs[fuse] = output_and_input_grad(converted, args, kwargs)
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])


class _QK(nn.Module):
    """A q projection, its RMSNorm and RoPE as the reference writes them; `leak` also returns the
    normalized activation (a second reader)."""

    def __init__(self, heads=4, head_dim=8, leak=False):
        super().__init__()
        self.heads, self.head_dim, self.leak = heads, head_dim, leak
        self.q = nn.Linear(heads * head_dim, heads * head_dim)
        self.norm = RMSNorm(heads * head_dim)

    def forward(self, x, cos, sin):
        y = self.norm(self.q(x))
        out = apply_rope(y.view(*x.shape[:-1], self.heads, self.head_dim), cos, sin)
        return (out, y) if self.leak else out


def _qk_inputs(tokens=6, heads=4, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos, sin = rope_cos_sin((1, 1, tokens), head_dim)
    return torch.randn(2, tokens, heads * head_dim, generator=g), cos, sin


@pytest.mark.parametrize("case, why", [
    ("leak", "an intermediate value of the norm has another reader"),
    ("float32 weight", "the norm's weight (torch.float32, (32,)) is not one torch.bfloat16 value per channel"),
])
def test_left_alone_with_the_reason(case, why):
    module, (x, cos, sin) = _QK(leak=case == "leak"), _qk_inputs()
    if case == "float32 weight":
        module.q.to(torch.bfloat16)
        x = x.bfloat16()
    options = {"layout": "dense"}
    torch._dynamo.reset()
    torch.compile(module, backend=osp_backend, options=options)(x, cos, sin)
    assert [r["decision"] for r in _rows(report_for(options), "norm_rope")] == [f"kept: {why}"]


@needs_interp
@pytest.mark.parametrize("heads, table_shape", [(5, (1, 7, 1, 8)), (4, (7, 1, 8)), (3, (1, 1, 8))])
def test_kernel_interpreted_against_the_op(heads, table_shape):
    """float32 (the interpreter's casts truncate); a head count that is not a power of two; tables
    with and without leading ones, and one row for all tokens."""
    x, cos, sin = _qk_inputs(tokens=7, heads=heads)
    w = torch.randn(x.shape[-1])
    cos, sin = (t[: table_shape[-3]].reshape(table_shape) for t in (cos, sin))
    got = torch.ops.osp_cuda.rms_norm_rope(x, w, 1e-6, cos, sin, heads)
    want = rms_norm_rope(x, w, 1e-6, cos, sin, heads)
    assert got.shape == want.shape == (2, 7, heads, 8)
    assert rel_err(got, want) <= 1e-6


def test_kernel_takes_the_ops_calls_for_tables_it_cannot_index(monkeypatch):
    """Tables that differ per head are not the kernel's layout: the op's calls run instead (the
    Triton launch is never reached)."""
    x, _, _ = _qk_inputs()
    w = torch.randn(32)
    per_head = [torch.randn(6, 4, 8) for _ in range(2)]
    monkeypatch.setattr(cuda_norm_rope, "_kernel", lambda interpret: pytest.fail("launched the kernel"))
    got = torch.ops.osp_cuda.rms_norm_rope(x, w, 1e-6, *per_head, 4)
    assert torch.equal(got, rms_norm_rope(x, w, 1e-6, *per_head, 4))


def _lowered(converted) -> list[str]:
    return [r["kernel"] for r in _rows(converted.osp_report, "lowering") if r["op"] == "osp::rms_norm_rope"]


@needs_interp
def test_lowering_picks_the_kernel_for_cuda_inference_only(monkeypatch):
    """Lowered for CUDA (the kernel runs interpreted on these CPU tensors): chosen without
    autograd, and the output matches the op's calls; with autograd the op keeps its calls."""
    as_if_triton_on_cuda(monkeypatch)
    with torch.no_grad():
        converted, args, kwargs = _convert(True, SMALL, target="cuda")  # the interpreter is slow
        plain, _, _ = _convert(True, SMALL)
        assert _lowered(converted) == [KERNEL] * 4
        assert rel_err(converted(*args, **kwargs), plain(*args, **kwargs)) <= 1e-5
    training, args, kwargs = _convert(True, SMALL, target="cuda")
    training(*args, **kwargs).sum().backward()  # captured again with autograd on
    assert _lowered(training)[-4:] == ["composite (portable torch)"] * 4 and args[0].grad.abs().sum() > 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_on_cuda_against_the_op_and_float64(dtype):
    """On the GPU the casts round as the op's calls do; the float32 arithmetic between them may
    contract into FMAs, so a few bfloat16 elements land on the neighbouring value."""
    heads, head_dim, tokens = 40, 128, 300
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, tokens, heads * head_dim, generator=g) * 3).to(dtype)
    w = torch.randn(heads * head_dim, generator=g).to(dtype)
    cos, sin = (t[:tokens].reshape(1, tokens, 1, head_dim) for t in rope_cos_sin((3, 10, 10), head_dim))
    got = torch.ops.osp_cuda.rms_norm_rope(x.cuda(), w.cuda(), 1e-6, cos.cuda(), sin.cuda(), heads).cpu()
    want = rms_norm_rope(x, w, 1e-6, cos, sin, heads)
    exact = rms_norm_rope(x.double(), w.double(), 1e-6, cos.double(), sin.double(), heads)
    if dtype == torch.bfloat16:  # in float32 every contraction shows; the float64 bound below is the check
        assert (got != want).float().mean() <= 1e-3
    assert rel_err(got, exact) <= 1.01 * rel_err(want, exact) + 1e-6
