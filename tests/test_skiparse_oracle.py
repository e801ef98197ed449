"""convert() against the masked dense oracle: reference model and diffusers' Wan, several grids,
sparse ratios and layouts; outputs and gradients."""
import pytest
import torch

from osp_compile.oracle import masked_oracle, rel_err
from osp_compile import OSPConfig, convert
from reference_model import PRESETS, build_model, make_inputs


def _reference(num_layers, latent):
    model = build_model("tiny", num_layers=num_layers, seed=1)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=latent, seed=2)
    return model, args, kwargs


def _diffusers_wan(num_layers, latent):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=64,
    ).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, *latent, generator=g)
    kwargs = {"timestep": torch.tensor([437.0]), "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
              "return_dict": False}
    return model, (x,), kwargs


def _first(out):
    return out[0] if isinstance(out, tuple) else out


CASES = [
    # (builder, layers, latent (F, Hl, Wl) -> grid (F, Hl/2, Wl/2), config)
    pytest.param(_reference, 6, (3, 12, 20), OSPConfig(sparse_ratio=2, layout="dual_end", num_full_blocks=2), id="ref-P2-dual_end-pad"),
    pytest.param(_reference, 6, (3, 12, 20), OSPConfig(sparse_ratio=2, layout="uniform", num_full_blocks=2), id="ref-P2-uniform"),
    pytest.param(_reference, 4, (2, 16, 14), OSPConfig(sparse_ratio=3, layout="all_sparse"), id="ref-P3-all_sparse-pad"),
    pytest.param(_reference, 3, (2, 8, 8), OSPConfig(sparse_ratio=2, layout=["group", "full", "token"]), id="ref-P2-explicit-nopad"),
    pytest.param(_diffusers_wan, 4, (3, 12, 20), OSPConfig(sparse_ratio=2, layout="dual_end", num_full_blocks=2), id="wan-P2-dual_end-pad"),
    pytest.param(_diffusers_wan, 3, (2, 14, 14), OSPConfig(sparse_ratio=3, layout=["token", "group", "full"]), id="wan-P3-explicit-pad"),
]


@pytest.mark.parametrize("builder,layers,latent,config", CASES)
def test_convert_matches_masked_oracle(builder, layers, latent, config):
    model, args, kwargs = builder(layers, latent)
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    converted = convert(model, args, kwargs, config)
    layout = converted.osp_report.layout
    assert layout == config.resolve_layout(layers)
    assert any(entry != "full" for entry in layout)

    # outputs
    with torch.no_grad():
        out = _first(converted(*args, **kwargs))
        with masked_oracle(layout, grid, config.sparse_ratio):
            ref = _first(model(*args, **kwargs))
        dense = _first(model(*args, **kwargs))
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, dense) > 1e-3  # the oracle is not trivially the dense model

    # gradients (w.r.t. every parameter and the input)
    x = args[0].clone().requires_grad_(True)
    weight = torch.randn_like(out)
    model.zero_grad()
    (_first(converted(x, *args[1:], **kwargs)) * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gx = x.grad.clone()
    model.zero_grad()
    x.grad = None
    with masked_oracle(layout, grid, config.sparse_ratio):
        (_first(model(x, *args[1:], **kwargs)) * weight).sum().backward()
    assert rel_err(gx, x.grad) <= 1e-5
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads.items():
        if g.norm() > 0:
            assert rel_err(g, model.get_parameter(name).grad) <= 1e-4, name


def test_converted_module_shares_parameters_and_state_dict():
    model, args, kwargs = _reference(2, (2, 8, 8))
    converted = convert(model, args, kwargs, OSPConfig(num_full_blocks=0))
    assert list(converted.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(converted.parameters(), model.parameters()))
    # an optimizer step on the converted module changes the original's weights
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    before = model.blocks[0].self_attn.q.weight.detach().clone()
    converted(*args, **kwargs).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].self_attn.q.weight)
    converted.eval()
    assert not model.training and not converted.training
    assert converted.patch_embedding is model.patch_embedding
    assert converted.config is model.config  # attributes the wrapper lacks read through


def test_diffusers_output_structure_kept():
    model, args, kwargs = _diffusers_wan(2, (2, 8, 8))
    converted = convert(model, args, kwargs, OSPConfig(num_full_blocks=0))
    out = converted(*args, **kwargs)
    assert isinstance(out, tuple) and len(out) == 1
    out_dict = converted(*args, **{**kwargs, "return_dict": True})
    assert hasattr(out_dict, "sample")
    assert converted.config.num_layers == 2  # attributes read through to the original
