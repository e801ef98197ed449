"""Bad input gets a clear, specific error."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from osp_compile import OSPAnalysisError, OSPConfig, OSPConfigError, OSPError, convert
from reference_model import PRESETS, build_model, make_inputs


@pytest.mark.parametrize("kwargs,match", [
    ({"sparse_ratio": 0}, "sparse_ratio must be an integer >= 1"),
    ({"layout": "diagonal"}, "unknown layout 'diagonal'"),
    ({"layout": ["full", "sparse"]}, r"layout\[1\] = 'sparse' is not a site layout"),
    ({"num_full_blocks": -1}, "num_full_blocks must be"),
    ({"grid": (3, 4)}, "grid must be three positive integers"),
    ({"target": "tpu"}, "unknown target"),
    ({"quant": "hif8-infer", "quant_exclude": "head*"}, r"quant_exclude must be None or a list .* got 'head\*'"),
    ({"lora_targets": [1]}, "lora_targets must be None or a list"),
    ({"fuse_linears": "no"}, "fuse_linears must be True or False, got 'no'"),
    ({"lora_rank": 2, "lora_alpha": "x"}, "lora_alpha must be None"),
    ({"lora_rank": 2, "lora_alpha": 0}, "lora_alpha must be None"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(OSPConfigError, match=match):
        OSPConfig(**kwargs)


def test_layout_length_and_full_count_checked_against_the_model():
    with pytest.raises(OSPConfigError, match="lists 2 entries but the model has 3"):
        OSPConfig(layout=["full", "token"]).resolve_layout(3)
    with pytest.raises(OSPConfigError, match="num_full_blocks=8 is larger than the number of video self-attention sites \\(4\\)"):
        OSPConfig(num_full_blocks=8).resolve_layout(4)


def test_named_layouts():
    assert OSPConfig(num_full_blocks=2).resolve_layout(6) == ["full", "token", "group", "token", "group", "full"]
    assert OSPConfig(num_full_blocks=8).resolve_layout(40)[:5] == ["full"] * 4 + ["token"]
    assert OSPConfig(num_full_blocks=8).resolve_layout(40)[-5:] == ["group"] + ["full"] * 4
    assert OSPConfig(layout="uniform", num_full_blocks=2).resolve_layout(8) == [
        "token", "group", "full", "token", "group", "token", "full", "group"]
    assert OSPConfig(layout="all_sparse").resolve_layout(3) == ["token", "group", "token"]
    assert OSPConfig(layout="dense").resolve_layout(2) == ["full", "full"]


def test_wrong_layout_length_for_the_model():
    model = build_model("tiny", num_layers=2)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(2, 8, 8))
    with pytest.raises(OSPConfigError, match="lists 3 entries but the model has 2"):  # ours, not Dynamo's wrapper
        convert(model, args, kwargs, OSPConfig(layout=["full", "token", "group"]))


def test_sparse_ratio_that_does_not_fit_the_grid():
    model = build_model("tiny", num_layers=2)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(2, 8, 8))  # grid (2, 4, 4)
    with pytest.raises(Exception, match=r"sparse_ratio P=3 does not fit the token grid \(T, H, W\)=\(2, 4, 4\).*group-wise"):
        convert(model, args, kwargs, OSPConfig(sparse_ratio=3, layout=["token", "group"]))


class NoPatchEmbedDiT(nn.Module):
    """Tokens come in already flattened: nothing in the graph tells the grid."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens):
        b, s, c = tokens.shape
        q, k, v = self.qkv(tokens).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, c))


def test_no_grid_found_names_the_problem_and_the_fix():
    model = NoPatchEmbedDiT()
    x = torch.randn(1, 2 * 4 * 6, 16)
    with pytest.raises(Exception) as info:
        convert(model, (x,), config=OSPConfig(num_full_blocks=0))
    msg = str(info.value)
    assert "no patch embedding" in msg and "grid=(T, H, W)" in msg
    # with the grid given, the same model converts (and is checked against the oracle elsewhere)
    converted = convert(model, (x,), config=OSPConfig(num_full_blocks=0, grid=(2, 4, 6)))
    assert converted.osp_report.layout == ["token"]


class LostTrailDiT(nn.Module):
    """Patch embedding, then a token-mixing op (cumsum over tokens) before attention."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, video):
        x = self.embed(video).flatten(2).transpose(1, 2)
        x = x.cumsum(dim=1)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


def test_search_stop_names_the_node():
    model = LostTrailDiT()
    with pytest.raises(Exception) as info:
        convert(model, (torch.randn(1, 3, 2, 8, 8),), config=OSPConfig(num_full_blocks=0))
    msg = str(info.value)
    assert "cumsum" in msg and "stopped at node" in msg and "grid=(T, H, W)" in msg
    # on_unsupported="skip" keeps the model dense and says so
    converted = convert(model, (torch.randn(1, 3, 2, 8, 8),), config=OSPConfig(num_full_blocks=0, on_unsupported="skip"))
    rows = converted.osp_report.site_rows
    assert rows and all("kept dense" in r.decision for r in rows)


def test_unknown_backend_option():
    model = NoPatchEmbedDiT()
    compiled = torch.compile(model, backend="osp", options={"sparse_ratio": 2, "colour": "red"})
    with pytest.raises(Exception, match="unknown osp backend option"):
        compiled(torch.randn(1, 8, 16))


def test_cuda_graphs_need_inductor_and_are_a_backend_option():
    from osp_compile.backend import OSPBackend, split_options

    config, extra = split_options({"sparse_ratio": 2, "cudagraphs": True})
    assert extra == {"cudagraphs": True} and config.sparse_ratio == 2
    with pytest.raises(Exception, match="cudagraphs=True needs inner='inductor'"):
        OSPBackend(config, inner="eager", cudagraphs=True)


def _tiny(latent=(3, 12, 20)):
    model = build_model("tiny", num_layers=2)
    return model, *make_inputs(PRESETS["tiny"], latent_shape=latent)


def test_a_grid_that_contradicts_the_models_own_is_refused():
    model, args, kwargs = _tiny()  # grid (3, 6, 10)
    for wrong in ((2, 9, 10), (3, 10, 6)):
        with pytest.raises(OSPAnalysisError, match=re.escape(f"grid={wrong} contradicts the grid (3, 6, 10)")):
            convert(model, args, kwargs, OSPConfig(grid=wrong, num_full_blocks=0))
    convert(model, args, kwargs, OSPConfig(grid=(3, 6, 10), num_full_blocks=0))  # the same grid is fine


def test_recompiles_past_the_limit_raise_instead_of_running_dense():
    """Past Dynamo's recompile limit the original forward would run eagerly: dense, without a word."""
    model, args, kwargs = _tiny((1, 8, 8))
    converted = convert(model, args, kwargs, OSPConfig(layout="all_sparse"))
    def call(latent):
        a, k = make_inputs(PRESETS["tiny"], latent_shape=latent)
        return converted(*a, **k)

    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        call((2, 8, 8))
        with pytest.raises(OSPError, match="compiled for 2 input signatures .* would run the original dense model"):
            call((3, 8, 8))


class TokensIn(nn.Module):
    """Tokens come in flattened; the grid is given, so only inputs of its length are video."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).unbind(-3)
        return self.out(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).flatten(-2))


def test_a_recompile_that_loses_a_site_raises_or_says_it_runs_dense():
    x = torch.randn(1, 180, 32)
    other = torch.randn(1, 240, 32)  # not (3, 6, 10) tokens: the site cannot be video self-attention
    converted = convert(TokensIn(), (x,), None, OSPConfig(layout="all_sparse", grid=(3, 6, 10)))
    with pytest.raises(OSPAnalysisError, match="was video self-attention site 0 in an earlier graph"):
        converted(other)
    skipping = convert(TokensIn(), (x,), None, OSPConfig(layout="all_sparse", grid=(3, 6, 10), on_unsupported="skip"))
    model = TokensIn()
    model.load_state_dict(skipping.state_dict())
    assert torch.equal(skipping(other), model(other))  # dense, as the report says
    assert any(r.decision.startswith("kept dense: the attention at") for r in skipping.osp_report.site_rows)


def test_lora_targets_that_match_nothing_and_npu_without_torch_npu():
    model, args, kwargs = _tiny()
    with pytest.raises(OSPConfigError, match=r"lora_targets \['nothing\*'\] matched none of WanDiT's linear weights"):
        convert(model, args, kwargs, OSPConfig(num_full_blocks=0, lora_rank=2, lora_targets=["nothing*"]))
    with pytest.raises(OSPConfigError, match="torch_npu is not installed here .* `osp-compile export --target npu`"):
        convert(model, args, kwargs, OSPConfig(num_full_blocks=0, target="npu"))
