"""The LoRA pass on the Skiparse-converted tiny DiT, through convert() and torch.compile(backend="osp"):
identity at init, gradients to the adapters only, the no-recompile switch, save/load, merge, the report,
and Inductor's AOTAutograd reaching the adapters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from osp_compile import OSPConfig, convert
from osp_compile.backend import report_for, state_for
from osp_compile.grpo import adapters_disabled, load_adapters, lora_adapters, merge_adapters, save_adapters
from passes.lora import LoRAAdapters
from reference_model import build_model, make_inputs

LATENT = (2, 8, 8)  # token grid (2, 4, 4): one full and one Skiparse site with 2 layers
ATTN_LINEARS = 16   # 2 blocks x (self, cross) x q/k/v/o


@pytest.fixture(scope="module")
def inputs():
    return make_inputs("tiny", batch=2, latent_shape=LATENT)


@pytest.fixture(scope="module")
def base_out(inputs):
    """The Skiparse-converted model without adapters."""
    args, kwargs = inputs
    with torch.no_grad():
        return convert(build_model("tiny", num_layers=2), args, kwargs, OSPConfig(num_full_blocks=1))(*args, **kwargs)


def _lora_model(inputs, **lora):
    args, kwargs = inputs
    return convert(build_model("tiny", num_layers=2), args, kwargs, OSPConfig(num_full_blocks=1, lora_rank=4, **lora))


def _randomise_b(store: LoRAAdapters, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, b in store.items():
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def test_init_equals_base_and_report_lists_every_linear(inputs, base_out):
    args, kwargs = inputs
    osp = _lora_model(inputs)
    with torch.no_grad():
        torch.testing.assert_close(osp(*args, **kwargs), base_out, rtol=0, atol=0)
    assert osp.osp_report.layout == ["full", "token"]  # Skiparse still applied
    lora_report = next(p for p in osp.osp_report.graphs[0].passes if p.name == "lora")
    rows = {r["linear"]: r["adapter"] for r in lora_report.rows}
    assert len(rows) == 26 and sum(v == "yes" for v in rows.values()) == ATTN_LINEARS
    assert rows["blocks.1.cross_attn.o.weight"] == "yes" and rows["blocks.0.ffn.0.weight"] == "no"
    store = lora_adapters(osp)
    assert set(store.fqns.values()) == {k for k, v in rows.items() if v == "yes"}
    a, b = store.lora_A["blocks__0__self_attn__q"], store.lora_B["blocks__0__self_attn__q"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and torch.equal(b, torch.zeros_like(b)) and a.abs().sum() > 0
    assert list(osp.state_dict()) == list(build_model("tiny", num_layers=2).state_dict())  # no new keys


def test_adapters_train_base_frozen_switch_needs_no_recompile(inputs, base_out):
    args, kwargs = inputs
    osp = _lora_model(inputs)
    store = lora_adapters(osp)
    for p in osp.parameters():
        p.requires_grad_(False)
    _randomise_b(store)
    out = osp(*args, **kwargs)  # grad mode and requires_grad changed: Dynamo captures again
    out.square().mean().backward()
    assert lora_adapters(osp) is store and len(store.fqns) == ATTN_LINEARS  # the re-capture reused the store
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in store.parameters())
    assert all(p.grad is None for p in osp.parameters())
    assert not torch.allclose(out, base_out)

    graphs = len(osp.osp_report.graphs)
    with adapters_disabled(osp):
        off = osp(*args, **kwargs)
    torch.testing.assert_close(off, base_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(osp(*args, **kwargs), out)  # back on
    assert len(osp.osp_report.graphs) == graphs  # toggling captured nothing new


def test_save_load_round_trip(inputs, tmp_path):
    args, kwargs = inputs
    osp = _lora_model(inputs)
    store = lora_adapters(osp)
    _randomise_b(store)
    with torch.no_grad():
        expected = osp(*args, **kwargs)
    path = str(tmp_path / "adapters.safetensors")
    save_adapters(osp, path)
    with torch.no_grad():
        for p in store.parameters():
            p.zero_()
    load_adapters(osp, path)
    with torch.no_grad():
        torch.testing.assert_close(osp(*args, **kwargs), expected, rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert "blocks.0.self_attn.q.lora_A.weight" in f.keys() and f.metadata()["rank"] == "4"
    with pytest.raises(ValueError, match="rank"):
        load_adapters(LoRAAdapters(rank=8), path)


def test_merge_keeps_outputs_and_custom_targets_and_alpha(inputs):
    args, kwargs = inputs
    osp = _lora_model(inputs, lora_alpha=8.0, lora_targets=["*self_attn.[qv].weight", "blocks.*.ffn.2.weight"])
    store = lora_adapters(osp)
    assert sorted(store.fqns.values()) == ["blocks.0.ffn.2.weight", "blocks.0.self_attn.q.weight",
                                           "blocks.0.self_attn.v.weight", "blocks.1.ffn.2.weight",
                                           "blocks.1.self_attn.q.weight", "blocks.1.self_attn.v.weight"]
    assert store.scaling == 2.0
    _randomise_b(store)
    q = osp.get_parameter("blocks.0.self_attn.q.weight")
    q_expected = q.detach() + 2.0 * store.lora_B["blocks__0__self_attn__q"].detach() @ store.lora_A["blocks__0__self_attn__q"].detach()
    with torch.no_grad():
        on = osp(*args, **kwargs)
        merge_adapters(osp)
        merged = osp(*args, **kwargs)
        with adapters_disabled(osp):
            merged_off = osp(*args, **kwargs)
    torch.testing.assert_close(q.detach(), q_expected)
    torch.testing.assert_close(merged, on, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_off, on, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(b, torch.zeros_like(b)) for _, _, b in store.items())


def test_torch_compile_backend_osp_eager(inputs, base_out):
    args, kwargs = inputs
    model = build_model("tiny", num_layers=2)
    options = {"num_full_blocks": 1, "lora_rank": 4, "inner": "eager"}
    compiled = torch.compile(model, backend="osp", options=options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args, **kwargs), base_out, rtol=0, atol=0)
    assert report_for(options).layout == ["full", "token"]
    store = lora_adapters(compiled, options)
    assert store is state_for(options)["lora"] and len(store.fqns) == ATTN_LINEARS
    _randomise_b(store)
    compiled(*args, **kwargs).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in store.parameters())
    with torch.no_grad(), adapters_disabled(compiled, options):
        torch.testing.assert_close(compiled(*args, **kwargs), base_out, rtol=1e-6, atol=1e-6)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.o = nn.Linear(16, 8)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)))


class _TwoLinears(nn.Module):
    """The smallest graph with attention-named linears: Inductor compiles it in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention()

    def forward(self, x):
        return self.self_attn(x)


def test_inductor_gradients_reach_the_adapters_and_switch_needs_no_recompile():
    torch.manual_seed(0)
    model = _TwoLinears()
    x = torch.randn(2, 5, 16)
    base = model(x).detach()
    options = {"lora_rank": 2, "layout": "dense", "inner": "inductor"}
    compiled = torch.compile(model, backend="osp", options=options)
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool for two tiny kernels
        torch.testing.assert_close(compiled(x), base)
        store = lora_adapters(compiled, options)
        _randomise_b(store)
        out = compiled(x)
        out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in store.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())

    # the same adapters applied by hand, in eager PyTorch
    h = model.self_attn.q(x) + store.scaling * (x @ store.lora_A["self_attn__q"].T) @ store.lora_B["self_attn__q"].T
    h = torch.tanh(h)
    expected = model.self_attn.o(h) + store.scaling * (h @ store.lora_A["self_attn__o"].T) @ store.lora_B["self_attn__o"].T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    store.zero_grad()
    expected.square().sum().backward()
    for n, p in store.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)

    graphs = len(report_for(options).graphs)
    with adapters_disabled(store):
        torch.testing.assert_close(compiled(x), base)
    torch.testing.assert_close(compiled(x), out)
    assert len(report_for(options).graphs) == graphs == 1  # one capture served the whole test


def test_adapters_beside_hif8_inference_linears(inputs):
    """LoRA on a frozen HiF8 model (the adapters train beside the quantized q/k/v/o): the codes'
    symbolic sizes once made the adapters' shapes fail. At init the output is the HiF8 model's;
    every adapter gets a gradient."""
    args, kwargs = inputs
    config = OSPConfig(num_full_blocks=1, quant="hif8-infer")
    with torch.no_grad():
        plain = convert(build_model("tiny", num_layers=2), args, kwargs, config)(*args, **kwargs)
    model = convert(build_model("tiny", num_layers=2), args, kwargs, config.replace(lora_rank=4))
    store = lora_adapters(model)
    assert len(store.lora_A) == ATTN_LINEARS
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs), plain)
    _randomise_b(store)
    model(*args, **kwargs).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in store.parameters())
