"""The CUDA kernel choice: flash-attn where it is installed and can take the call, else PyTorch's SDPA.

flash-attn needs a GPU, so these CPU tests run the lowering against an EMULATION of its two
documented functions (plain PyTorch, below; it asserts the documented argument contract). They
check our side: which calls go to flash-attn, the varlen packing of padded keys, and that the
lowered model and its export compute what convert() computes. scripts/gpu_export_check.py runs
the CUDA export on a real GPU.
"""
import importlib.util
import sys
import types

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from osp_compile import OSPConfig, convert
from osp_compile.export import export_model
from osp_compile.lowering.composites import on_attention_kernel
from osp_compile.lowering.cuda import _flash_check, flash_sdpa
from osp_compile.oracle import rel_err
from test_lowering import LAYOUT, lowering_rows, tiny

CALLS: list[str] = []
_HALF = (torch.float16, torch.bfloat16)


def _attend(q, k, v, scale, keep=None):
    """[B, S, H, D] attention in float32 (keys with keep False masked), cast back."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    mask = None if keep is None else keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """EMULATION of flash_attn.flash_attn_func: q [B, Sq, H, D], k/v [B, Skv, Hkv, D], fp16/bf16."""
    assert q.dtype in _HALF and q.dtype == k.dtype == v.dtype and q.dim() == k.dim() == 4
    assert q.shape[2] % k.shape[2] == 0 and q.shape[-1] <= 256 and dropout_p == 0.0 and not causal
    assert k.shape == v.shape and q.shape[0] == k.shape[0] and v.shape[-1] == q.shape[-1]  # CHECK_SHAPE(v, ...)
    CALLS.append("flash_attn_func")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _attend(q, k, v, scale).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):
    """EMULATION of flash_attn.flash_attn_varlen_func: packed [total, H, D] sequences, cu_seqlens int32."""
    assert q.dtype in _HALF and q.dim() == k.dim() == 3 and dropout_p == 0.0 and not causal
    for cu, total, longest in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
        lengths = cu.diff()
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == total and (lengths >= 0).all()
        assert lengths.max() <= longest
    CALLS.append("flash_attn_varlen_func")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = [_attend(q[a:b][None], k[c:d][None], v[c:d][None], scale)[0]
           for a, b, c, d in zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])]
    return torch.cat(out).to(q.dtype)


@pytest.fixture
def flash_emulation(monkeypatch):
    """The flash_attn EMULATION importable (from sys.modules) for one test only."""
    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    CALLS.clear()
    return CALLS


def test_cuda_lowering_runs_attention_on_flash_attn(flash_emulation):
    model, args, kwargs = tiny(dtype=torch.bfloat16)
    cpu = convert(model, args, kwargs, OSPConfig(layout=LAYOUT, target="cpu"))
    cuda = convert(model, args, kwargs, OSPConfig(layout=LAYOUT, target="cuda"))
    rows = lowering_rows(cuda).rows
    attention = [r for r in rows if "attention" in r["op"]]
    assert attention and all("flash-attn" in r["kernel"] for r in attention)
    flash_emulation.clear()
    with torch.no_grad():  # (convert captured without grad: no recompilation)
        assert rel_err(cuda(*args, **kwargs), cpu(*args, **kwargs)) <= 1e-2  # bfloat16
    assert "flash_attn_func" in flash_emulation


def test_padded_keys_go_to_varlen_flash_attn(flash_emulation):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3 * 5 * 7, 16, dtype=torch.bfloat16) for _ in range(3))  # (5, 7) pads to (8, 8)
    for pattern in ("token", "group"):
        ref = torch.ops.osp.skiparse_attention(q, k, v, 3, 5, 7, 2, pattern)
        out = on_attention_kernel("skiparse_attention", flash_sdpa)(q, k, v, 3, 5, 7, 2, pattern)
        assert rel_err(out, ref) <= 1e-2
    assert flash_emulation == ["flash_attn_varlen_func"] * 2  # packed real keys, not a mask


def _sdpa_node(dtype):
    """An SDPA node of a graph, with example values as Dynamo records them."""
    g = fx.Graph()
    q = g.placeholder("q")
    q.meta["example_value"] = torch.empty(1, 2, 6, 16, dtype=dtype, device="meta")
    node = g.call_function(F.scaled_dot_product_attention, (q, q, q))
    g.output(node)
    return node


def test_flash_attn_refused_in_float32_or_when_not_installed(flash_emulation, monkeypatch):
    assert _flash_check(_sdpa_node(torch.bfloat16)) is None
    assert _flash_check(_sdpa_node(torch.float32)) == "flash-attn needs float16/bfloat16, not torch.float32"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert _flash_check(_sdpa_node(torch.bfloat16)).startswith("flash-attn is not installed")


def test_flash_refusals_and_the_scale(flash_emulation):
    """What flash-attn cannot take runs SDPA (same result, no flash call); an explicit scale reaches it."""
    from osp_compile.lowering.cuda import flash_refusal

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 6, 16, generator=g).bfloat16()
    cases = {
        "a mask that is not a boolean key-padding mask": dict(attn_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool)),
        "causal attention": dict(is_causal=True),
        "dropout": dict(dropout_p=0.1),
    }
    for why, kwargs in cases.items():
        facts = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, **kwargs}
        assert flash_refusal(q, q, q, **facts).startswith(why)
    wide = torch.randn(1, 2, 6, 320, generator=g).bfloat16()
    assert flash_refusal(wide, wide, wide, None, 0.0, False) == "head dim 320 > 256"
    k1 = q[:1]
    assert flash_refusal(q, k1, k1, None, 0.0, False).startswith("batch sizes 2/1/1 differ")
    for args, kwargs in (((q, q, q), cases["causal attention"]), ((q, k1, k1), {}), ((wide, wide, wide), {})):
        assert torch.equal(flash_sdpa(*args, **kwargs), F.scaled_dot_product_attention(*args, **kwargs))
    assert not flash_emulation
    got = flash_sdpa(q, q, q, scale=0.3)
    assert flash_emulation == ["flash_attn_func"]
    assert rel_err(got, F.scaled_dot_product_attention(q.float(), q.float(), q.float(), scale=0.3)) <= 1e-2
    assert rel_err(got, F.scaled_dot_product_attention(q.float(), q.float(), q.float())) > 5e-2  # not the default


def test_cuda_export_with_flash_attn_equals_the_lowered_model(flash_emulation, tmp_path):
    model, args, kwargs = tiny(dtype=torch.bfloat16)
    config = OSPConfig(layout=LAYOUT)
    result = export_model(model, args, kwargs, config, "cuda", str(tmp_path))
    text = open(result.module_path).read()
    assert "import flash_attn" in text and "osp_compile" not in text
    spec = importlib.util.spec_from_file_location("osp_export_cuda_flash", result.module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.load(str(tmp_path), "cpu")
    flash_emulation.clear()
    with torch.no_grad():
        out = net(*args, **kwargs)
        assert flash_emulation
        lowered = convert(model, args, kwargs, config.replace(target="cuda"))
        assert rel_err(out, lowered(*args, **kwargs)) <= 1e-6
