"""Tests of the dense reference Wan DiT (reference_model): shapes, RoPE, token order,
plain-dense attention structure, gradients, sampler and presets. All run on the tiny
preset on CPU in a few seconds."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import reference_model
from reference_model import (
    PRESETS,
    RESOLUTIONS,
    WanConfig,
    WanDiT,
    build_model,
    euler_step,
    latent_shape,
    make_inputs,
    sample,
    shifted_sigmas,
    token_grid,
)
from reference_model.model import apply_rope, rope_axis_dims, rope_cos_sin, sinusoidal_embedding


@pytest.fixture(scope="module")
def tiny() -> WanDiT:
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def tiny_inputs():
    return make_inputs("tiny")


# ----------------------------------------------------------------------------- forward


def test_forward_shape_dtype_finite(tiny, tiny_inputs):
    args, kwargs = tiny_inputs
    (x,) = args
    assert x.shape == (1, 4, 3, 12, 20)
    with torch.no_grad():
        out = tiny(*args, **kwargs)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().mean() > 1e-3  # not degenerate (no zero-initialised head)


def test_forward_batch_and_other_latent_shape(tiny):
    args, kwargs = make_inputs("tiny", batch=2, latent_shape=(2, 8, 6), seed=3)
    with torch.no_grad():
        out = tiny(*args, **kwargs)
        single = tiny(args[0][1:], t=kwargs["t"][1:], context=kwargs["context"][1:])
    assert out.shape == (2, 4, 2, 8, 6)
    torch.testing.assert_close(out[1:], single, rtol=1e-4, atol=1e-5)


def test_deterministic_with_seed(tiny_inputs):
    args, kwargs = tiny_inputs
    with torch.no_grad():
        a = build_model("tiny", seed=0)(*args, **kwargs)
        b = build_model("tiny", seed=0)(*args, **kwargs)
        c = build_model("tiny", seed=1)(*args, **kwargs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # make_inputs is deterministic too, and does not touch the global RNG
    state = torch.get_rng_state()
    a2, k2 = make_inputs("tiny")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a2[0], args[0]) and torch.equal(k2["context"], kwargs["context"])
    a3, _ = make_inputs("tiny", seed=1)
    assert not torch.equal(a3[0], args[0])


def test_output_depends_on_every_input(tiny, tiny_inputs):
    (x,), kwargs = tiny_inputs
    t, context = kwargs["t"], kwargs["context"]
    with torch.no_grad():
        ref = tiny(x, t=t, context=context)
        for changed in (
            tiny(x + 0.1 * torch.randn_like(x), t=t, context=context),
            tiny(x, t=t * 0.5, context=context),
            tiny(x, t=t, context=context + 0.1 * torch.randn_like(context)),
        ):
            assert (changed - ref).abs().max() > 1e-4


def test_bfloat16_forward():
    model = build_model("tiny", dtype=torch.bfloat16)
    args, kwargs = make_inputs("tiny", dtype=torch.bfloat16)
    assert args[0].dtype == torch.bfloat16 and kwargs["t"].dtype == torch.float32
    with torch.no_grad():
        out = model(*args, **kwargs)
        ref = build_model("tiny")(args[0].float(), t=kwargs["t"], context=kwargs["context"].float())
    assert out.dtype == torch.bfloat16 and out.shape == args[0].shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.25  # same weights, bf16 rounding only


def test_gradients_reach_every_parameter():
    model = build_model("tiny", num_layers=2)
    args, kwargs = make_inputs("tiny", seed=5)
    loss = model(*args, **kwargs).square().mean()
    loss.backward()
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    nonzero = [name for name, p in params.items() if p.grad.abs().max() > 0]
    assert len(nonzero) == len(params), sorted(set(params) - set(nonzero))


# ----------------------------------------------------------------------------- RoPE


def _rope_complex_reference(x: torch.Tensor, grid, head_dim: int, theta: float) -> torch.Tensor:
    """Independent float64 complex implementation in the style of the Wan2.1 code."""
    T, H, W = grid

    def axis_freqs(n, part):
        inv = 1.0 / theta ** (torch.arange(0, part, 2, dtype=torch.float64) / part)
        ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)  # [n, part/2] complex

    dt, dh, dw = rope_axis_dims(head_dim)
    ft, fh, fw = axis_freqs(T, dt), axis_freqs(H, dh), axis_freqs(W, dw)
    rows = []
    for t in range(T):  # frame-major token order, built with plain loops
        for y in range(H):
            for xx in range(W):
                rows.append(torch.cat([ft[t], fh[y], fw[xx]]))
    freqs = torch.stack(rows)[:, None, :]  # [S, 1, head_dim/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs).flatten(-2)


@pytest.mark.parametrize("head_dim,grid", [(16, (3, 6, 10)), (128, (2, 3, 5)), (12, (1, 4, 3))])
def test_rope_matches_complex_reference(head_dim, grid):
    g = torch.Generator().manual_seed(0)
    S = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, S, 3, head_dim, generator=g)
    cos, sin = rope_cos_sin(grid, head_dim, 10000.0)
    assert cos.shape == sin.shape == (S, 1, head_dim) and cos.dtype == torch.float32
    out = apply_rope(x, cos, sin)
    ref = _rope_complex_reference(x, grid, head_dim, 10000.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rope_axis_split_and_bf16():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(16) == (8, 4, 4)
    x = torch.randn(1, 12, 2, 16)
    cos, sin = rope_cos_sin((1, 3, 4), 16)
    out = apply_rope(x.bfloat16(), cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rope(x, cos, sin), rtol=2e-2, atol=2e-2)
    # norm-preserving rotation, identity at the origin token
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x, cos, sin)[:, 0], x[:, 0])


def test_sinusoidal_embedding_cos_then_sin():
    t = torch.tensor([0.0, 500.0])
    emb = sinusoidal_embedding(t, 32)
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(500.0)))
    torch.testing.assert_close(emb[1, 16], torch.sin(torch.tensor(500.0)))


# ----------------------------------------------------------------------------- token order


def test_tokens_are_frame_major(tiny, tiny_inputs):
    """Perturbing latent pixel (f, y, x) changes exactly token (f*H + y//2)*W + x//2."""
    (x,), kwargs = tiny_inputs
    T, H, W = token_grid(tiny.config, x.shape[2:])
    captured = []
    handle = tiny.blocks[0].register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            tiny(x, **kwargs)
            for f, y, xx in [(0, 0, 0), (2, 7, 13), (1, 11, 19), (2, 0, 5)]:
                x2 = x.clone()
                x2[0, 1, f, y, xx] += 1.0
                tiny(x2, **kwargs)
                diff = (captured[-1] - captured[0]).abs().amax(dim=-1)[0]  # [S]
                changed = torch.nonzero(diff > 0).flatten().tolist()
                assert changed == [(f * H + y // 2) * W + xx // 2]
    finally:
        handle.remove()
    assert captured[0].shape == (1, T * H * W, tiny.config.dim)


# ----------------------------------------------------------------------------- plain dense structure


def test_two_dense_sdpa_calls_per_block(tiny, tiny_inputs, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *extra, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), extra, kw))
        return real_sdpa(q, k, v, *extra, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    (x,), kwargs = tiny_inputs
    cfg = tiny.config
    T, H, W = token_grid(cfg, x.shape[2:])
    with torch.no_grad():
        tiny(x, **kwargs)
    assert len(calls) == 2 * cfg.num_layers
    for i in range(cfg.num_layers):
        (q_self, k_self, extra_s, kw_s), (q_cross, k_cross, extra_c, kw_c) = calls[2 * i], calls[2 * i + 1]
        assert q_self == k_self == (1, cfg.num_heads, T * H * W, cfg.head_dim)
        assert q_cross == (1, cfg.num_heads, T * H * W, cfg.head_dim)
        assert k_cross == (1, cfg.num_heads, cfg.text_len, cfg.head_dim)
        assert extra_s == extra_c == () and kw_s == kw_c == {}  # no mask, no dropout


def test_fx_symbolic_trace_sees_plain_graph(tiny_inputs):
    model = build_model("tiny", num_layers=2)
    gm = torch.fx.symbolic_trace(model)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == 4
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "patch_embedding")
    flatten = next(u for u in conv.users if u.op == "call_method" and u.target == "flatten")
    assert any(u.op == "call_method" and u.target == "transpose" for u in flatten.users)
    args, kwargs = tiny_inputs
    with torch.no_grad():
        torch.testing.assert_close(gm(*args, **kwargs), model(*args, **kwargs))


# ----------------------------------------------------------------------------- sampler


def test_shifted_sigmas():
    for shift in (1.0, 3.0, 5.0):
        s = shifted_sigmas(10, shift)
        assert s.shape == (11,)
        assert s[0] == 1.0 and s[-1] == 0.0
        assert (s[1:] < s[:-1]).all()
    torch.testing.assert_close(shifted_sigmas(7, 1.0), torch.linspace(1, 0, 8))
    # shift > 1 spends more steps at high noise
    assert (shifted_sigmas(10, 5.0)[1:-1] > torch.linspace(1, 0, 11)[1:-1]).all()
    s = 0.5
    torch.testing.assert_close(shifted_sigmas(2, 5.0)[1], torch.tensor(5 * s / (1 + 4 * s)))
    with pytest.raises(ValueError):
        shifted_sigmas(0, 5.0)


def test_euler_step_arithmetic():
    x = torch.tensor([1.0, -2.0, 3.0])
    v = torch.tensor([0.5, 4.0, -1.0])
    out = euler_step(x, v, 0.8, 0.6)
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.1, -2.0 - 0.8, 3.0 + 0.2]))
    out_t = euler_step(x, v, torch.tensor(0.8), torch.tensor(0.6))
    torch.testing.assert_close(out_t, out)


def test_sample_calls_model_as_velocity_predictor():
    calls = []

    def fake_model(x, t, context):
        calls.append((t.clone(), context))
        return torch.ones_like(x)  # constant velocity: x_0 = noise - 1

    noise = torch.randn(2, 4, 1, 2, 2)
    ctx, neg = torch.zeros(2, 3, 5), torch.ones(2, 3, 5)
    out = sample(fake_model, noise, ctx, num_steps=4, shift=3.0)
    torch.testing.assert_close(out, noise - 1)
    sig = shifted_sigmas(4, 3.0)
    assert len(calls) == 4
    for (t, c), s in zip(calls, sig[:-1]):
        assert t.shape == (2,) and t.dtype == torch.float32
        torch.testing.assert_close(t, torch.full((2,), float(s) * 1000))
        assert c is ctx

    # classifier-free guidance: v = v_neg + g * (v_pos - v_neg)
    def ctx_model(x, t, context):
        return torch.full_like(x, float(context.mean()))  # v_pos = 0, v_neg = 1

    out = sample(ctx_model, noise, ctx, num_steps=3, guidance_scale=4.0, negative_context=neg)
    torch.testing.assert_close(out, noise + 3.0)  # v = 1 + 4 * (0 - 1) = -3, integrated over sigma 1 -> 0
    out = sample(ctx_model, noise, ctx, num_steps=3, guidance_scale=1.0, negative_context=neg)
    with pytest.raises(ValueError, match="needs a negative_context"):
        sample(ctx_model, noise, ctx, num_steps=3, guidance_scale=4.0)
    torch.testing.assert_close(out, noise)


def test_sample_tiny_model(tiny, tiny_inputs):
    (x,), kwargs = tiny_inputs
    out = sample(tiny, x, kwargs["context"], num_steps=3, progress=False)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, x)


# ----------------------------------------------------------------------------- presets


def test_tiny_preset_and_default_inputs():
    cfg = PRESETS["tiny"]
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.head_dim, cfg.num_layers) == (64, 128, 4, 16, 12)
    assert (cfg.in_channels, cfg.out_channels, cfg.text_dim, cfg.text_len, cfg.freq_dim) == (4, 4, 32, 8, 32)
    (x,), kwargs = make_inputs(cfg)
    grid = token_grid(cfg, x.shape[2:])
    assert grid == (3, 6, 10)
    assert any(n % 2 for n in grid)  # needs padding for a P=2 sparse pattern
    t, context = kwargs["t"], kwargs["context"]
    assert t.shape == (1,) and ((t > 0) & (t < 1000)).all()
    assert context.shape == (1, 8, 32)
    assert (x != 0).all() and (context != 0).all()


def test_big_preset_configs_without_building():
    c13, c14 = PRESETS["wan-1.3b"], PRESETS["wan-14b"]
    assert (c13.dim, c13.ffn_dim, c13.num_heads, c13.num_layers, c13.head_dim) == (1536, 8960, 12, 30, 128)
    assert (c14.dim, c14.ffn_dim, c14.num_heads, c14.num_layers, c14.head_dim) == (5120, 13824, 40, 40, 128)
    for c in (c13, c14):
        assert (c.in_channels, c.out_channels, c.text_dim, c.text_len, c.freq_dim) == (16, 16, 4096, 512, 256)
        assert c.patch_size == (1, 2, 2) and c.eps == 1e-6 and c.rope_theta == 10000.0
        assert c.cross_attn_norm and c.qk_norm
    assert RESOLUTIONS == {"480p": (832, 480), "720p": (1280, 720), "768p": (1280, 768)}
    assert latent_shape("480p") == (21, 60, 104)
    assert latent_shape("720p") == (21, 90, 160)
    assert latent_shape("480p", frames=1) == (1, 60, 104)
    assert token_grid(c14, latent_shape("720p")) == (21, 45, 80)
    assert token_grid("wan-14b", latent_shape("480p")) == (21, 30, 52)
    assert token_grid(c13, latent_shape("768p")) == (21, 48, 80)  # anchors.md: 80,640 tokens
    with pytest.raises(ValueError):
        latent_shape("480p", frames=80)
    with pytest.raises(ValueError):
        latent_shape("1080p")
    with pytest.raises(ValueError):
        token_grid(c14, (21, 61, 104))


def test_build_model_options_and_errors():
    with pytest.raises(ValueError, match="tiny.*wan-1.3b.*wan-14b"):
        build_model("wan-2b")
    model = build_model("tiny", num_layers=1, seed=7)
    assert len(model.blocks) == 1 and model.config.num_layers == 1
    assert PRESETS["tiny"].num_layers == 12  # preset untouched
    custom = dataclasses.replace(PRESETS["tiny"], num_layers=2, num_heads=2)
    assert len(build_model(custom).blocks) == 2
    # same seed -> same weights whatever the dtype
    bf = build_model("tiny", num_layers=1, seed=7, dtype=torch.bfloat16)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), bf.named_parameters()):
        assert n1 == n2 and p2.dtype == torch.bfloat16
        assert torch.equal(p1.bfloat16(), p2)
    with pytest.raises(ValueError):
        WanConfig(dim=63, ffn_dim=128, num_heads=4, num_layers=1)
    with pytest.raises(ValueError):
        make_inputs("tiny", latent_shape=(3, 12, 20), resolution="480p")


def test_make_inputs_from_resolution():
    (x,), kwargs = make_inputs("wan-1.3b", resolution="480p", frames=5, dtype=torch.bfloat16)
    assert x.shape == (1, 16, 2, 60, 104) and x.dtype == torch.bfloat16
    assert kwargs["context"].shape == (1, 512, 4096) and kwargs["context"].dtype == torch.bfloat16


def test_public_exports():
    for name in [
        "WanConfig", "WanDiT", "PRESETS", "RESOLUTIONS", "build_model", "make_inputs",
        "latent_shape", "token_grid", "shifted_sigmas", "euler_step", "sample",
    ]:
        assert hasattr(reference_model, name) and name in reference_model.__all__
