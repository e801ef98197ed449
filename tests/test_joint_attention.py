"""Joint text+video attention: the op against its mask, the analysis of joined sequences (Conv2d on
folded frames, cat, slicing, in-place RoPE writes), and clear errors where it cannot follow."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from osp_compile import OSPConfig, convert
from osp_compile.joint_attention import joint_attention_flops, skiparse_attention_flops, skiparse_joint_attention
from osp_compile.oracle import _combine, joint_skiparse_mask, masked_oracle, rel_err
from osp_compile.lowering.composites import on_attention_kernel
from osp_compile.skiparse_layout import subsequence_length, subsequence_tokens
from strategies import grids
from passes.token_dims import JOINT, OTHER, TOK, Factor, permute, regroup


# -- the op ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,p,pattern,text_len,offset,mask", [
    ((2, 5, 6), 2, "token", 5, 5, None),  # CogVideoX: text first, padding
    ((2, 5, 6), 2, "group", 4, 0, "bool"),  # HunyuanVideo: video first, text padding mask
    ((2, 8, 8), 2, "token", 3, 0, None),  # no padding, no mask: no mask at all inside
    ((1, 7, 7), 3, "group", 6, 2, "float"),  # text on both sides, additive per-head mask
    ((2, 5, 6), 2, "group", 4, 4, "video"),  # a key mask over video tokens too: packed like the keys
])
def test_op_equals_dense_attention_under_the_joint_mask(grid, p, pattern, text_len, offset, mask):
    torch.manual_seed(0)
    n = grid[0] * grid[1] * grid[2] + text_len
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    if mask == "bool":
        mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
        mask[0, ..., -2:] = False  # the last two text tokens of sample 0 are padding
    elif mask == "video":
        mask = torch.rand(2, 1, 1, n, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., :text_len] = True  # every video query keeps its text keys
    elif mask == "float":
        mask = torch.zeros(1, 3, 1, n, dtype=torch.float64)
        mask[..., 0] = -1.5
    out = skiparse_joint_attention(q, k, v, mask, *grid, p, pattern, offset)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_combine(joint_skiparse_mask(grid, p, pattern, offset, text_len), mask))
    assert rel_err(out, ref) <= 1e-12
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(a, b) <= 1e-12


@settings(max_examples=40, deadline=None)
@given(grids(), st.integers(0, 4), st.data())
def test_op_equals_its_mask_on_any_grid(case, text_len, data):
    """Property: on any grid that fits (ragged ones too), text placed anywhere, with or without a
    model key mask, q/k/v head-major or token-major in memory, the packed op equals dense attention
    under the joint mask."""
    grid, p, pattern = case
    video = grid[0] * grid[1] * grid[2]
    offset = data.draw(st.integers(0, text_len))
    n = video + text_len
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    if data.draw(st.booleans()):  # token-major: the projection's [B, N, heads, D], transposed
        q, k, v = (torch.randn(2, n, 2, 4, dtype=torch.float64, generator=g).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64, generator=g) for _ in range(3))
    mask = None
    if text_len and data.draw(st.booleans()):  # video keys masked at random; every query keeps the text keys
        mask = torch.rand(2, 1, 1, n, generator=g) > 0.3
        mask[..., :offset] = mask[..., offset + video:] = True
    out = skiparse_joint_attention(q, k, v, mask, *grid, p, pattern, offset)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_combine(joint_skiparse_mask(grid, p, pattern, offset, text_len), mask))
    assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize("pattern", ["token", "group"])
def test_packed_video_queries_need_no_mask_on_a_padded_grid(pattern):
    """(5, 6) would pad to (8, 8): packed, the video queries' attention gets no mask, so a target's
    fast dense kernel (flash, cuDNN) can run it; and every query row attends real keys only."""
    calls = []

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.shape, attn_mask))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

    grid, p, text = (2, 5, 6), 2, 5
    q, k, v = (torch.randn(2, 3, text + 60, 8) for _ in range(3))
    on_attention_kernel("skiparse_joint_attention", recording)(q, k, v, None, *grid, p, pattern, text)
    assert all(mask is None for *_, mask in calls)
    video = calls[:-1]  # the last call is the text queries'
    lengths = sorted(len(t) for t in subsequence_tokens(grid, p, pattern))
    assert sorted(qs[2] for qs, _, _ in video for _ in range(qs[0] // 2)) == lengths  # real tokens only
    assert all(ks[2] == qs[2] + text for qs, ks, _ in video)  # each with the text keys alongside


@pytest.mark.parametrize("layout", ["head", "token"])
def test_output_is_token_major_so_merging_the_heads_is_a_view(layout):
    """Whatever the inputs' layout, the output lies [B, N, heads, D] in memory, as dense attention
    on the GPU leaves a token-major q's output: the model's transpose(1, 2).reshape is no copy."""
    grid, p, text, n = (2, 5, 6), 2, 5, 65
    shape = (2, 3, n, 8) if layout == "head" else (2, n, 3, 8)
    q, k, v = (torch.randn(shape) if layout == "head" else torch.randn(shape).transpose(1, 2) for _ in range(3))
    out = skiparse_joint_attention(q, k, v, None, *grid, p, "token", text)
    merged = out.transpose(1, 2).reshape(2, n, 24)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None


def test_flops_count_what_the_op_computes():
    """Query-key pairs counted from the joint mask itself (the oracle's), not from the op's packing."""
    grid, p, b, h, d, text, offset = (2, 5, 6), 2, 2, 2, 8, 5, 5
    for pattern in ("token", "group"):
        pairs = int(joint_skiparse_mask(grid, p, pattern, offset, text).sum())  # True = attended, per sample
        assert joint_attention_flops(b, h, d, grid, p, pattern, text) == 4 * h * d * b * pairs
    sub = subsequence_length(grid, p)  # the per-site op pads the grid
    assert skiparse_attention_flops(b, h, d, grid, p) == 4 * b * h * p * p * sub * sub * d


# -- the token-layout algebra ----------------------------------------------------------------------
def test_regroup_and_permute_follow_frames_folded_into_the_batch():
    b, f, c, h, w = 2, 3, 8, 4, 6
    conv = ((Factor(OTHER, b), Factor(TOK, f)), (Factor(OTHER, c),), (Factor(TOK, h),), (Factor(TOK, w),))
    x = regroup(conv, (b, f, c, h, w))  # .view(B, F, C, H, W)
    x = regroup(x, (b, f, c, h * w))  # .flatten(3)
    x = permute(x, (0, 1, 3, 2))  # .transpose(2, 3)
    x = regroup(x, (b, f * h * w, c))  # .flatten(1, 2)
    assert x == ((Factor(OTHER, b),), (Factor(TOK, f * h * w),), (Factor(OTHER, c),))
    assert permute(conv, (0, 1, 3, 2)) is None  # W before H: no longer frame-major
    assert regroup(((Factor(TOK, 12),), (Factor(OTHER, 5),)), (10, 6)) is None  # cuts a token and a channel factor
    assert regroup(((Factor(JOINT, 12),),), (3, 4)) is None  # a joined sequence is never split


# -- the analysis on a DiT of joint attention ------------------------------------------------------
class JointDiT(nn.Module):
    """CogVideoX-like: per-frame Conv2d, caption first, in-place RoPE-like write on the video part."""

    def __init__(self, dim=16, heads=2, layers=3, text_dim=8, mode="ok"):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.text = nn.Linear(text_dim, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))

    def forward(self, video, caption):  # video [B, F, C, H, W]
        b, f = video.shape[:2]
        x = self.embed(video.flatten(0, 1))
        x = x.view(b, f, *x.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
        text = self.text(caption)
        if self.mode == "two_streams":
            x = torch.cat([x, x * 2], dim=1)
        text, x = self.layers(self.qkv[:1], text, x)
        if self.mode == "graph_break":
            torch._dynamo.graph_break()  # the later graph finds its joint sites by their length
        return self.layers(self.qkv[1:], text, x)[1]

    def layers(self, layers, text, x):
        b, n_text = x.shape[0], text.shape[1]
        for qkv in layers:
            h = torch.cat([text, x], dim=1)
            if self.mode == "cut":  # pieces that cut the video tokens apart, joined again
                h = torch.cat([h[:, :n_text + 2], h[:, n_text + 2:]], dim=1)
            s, c = h.shape[1], h.shape[2]
            q, k, v = qkv(h).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q[:, :, n_text:] = q[:, :, n_text:] * 0.5  # an in-place write on the video tokens only
            mask = torch.ones(s, s, dtype=torch.bool).tril() if self.mode == "per_query_mask" else None
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, c)
            text, x = text + o[:, :n_text], x + o[:, n_text:]
        return text, x


def _inputs(text_len=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, 3, 10, 12, generator=g), torch.randn(1, text_len, 8, generator=g)  # grid (2, 5, 6)


@pytest.mark.parametrize("mode,text_len", [("ok", 4), ("graph_break", 4), ("ok", 0)])
def test_conv2d_on_folded_frames_and_the_joined_sequence_are_found(mode, text_len):
    """Also after a graph break (the later graph has no patch embedding: its joint sites are known
    by the length an earlier graph found) and with no text at all (the joined sequence is the video)."""
    torch.manual_seed(0)
    model, (video, caption) = JointDiT(mode=mode), _inputs(text_len)
    converted = convert(model, (video, caption), config=OSPConfig(layout="all_sparse"))
    report = converted.osp_report
    assert report.layout == ["token", "group", "token"]
    assert [(s.kind, s.grid, s.text_tokens) for s in report.video_sites] == [("joint", (2, 5, 6), text_len)] * 3
    assert sum(g.code.count("torch.ops.osp.skiparse_joint_attention") for g in report.graphs) == 3
    with torch.no_grad(), masked_oracle(report.layout, (2, 5, 6), 2, text_len=text_len, video_offset=text_len):
        ref = model(video, caption)
    with torch.no_grad():
        assert rel_err(converted(video, caption), ref) <= 1e-5


@pytest.mark.parametrize("mode,node_reason", [
    ("cut", "cuts through the video tokens"),
    ("two_streams", "joins video tokens with other token tensors"),
])
def test_joined_sequences_it_cannot_follow_name_the_node(mode, node_reason):
    model, inputs = JointDiT(mode=mode), _inputs()
    with pytest.raises(Exception) as info:
        convert(model, inputs, config=OSPConfig(layout="all_sparse"))
    msg = str(info.value)
    assert node_reason in msg and "stopped at node" in msg and "grid=(T, H, W)" in msg
    converted = convert(model, inputs, config=OSPConfig(layout="all_sparse", on_unsupported="skip"))
    assert all("kept dense" in r.decision for r in converted.osp_report.site_rows)


def test_a_mask_that_varies_per_query_is_refused_at_its_site():
    model, inputs = JointDiT(mode="per_query_mask"), _inputs()
    with pytest.raises(Exception) as info:
        convert(model, inputs, config=OSPConfig(layout="all_sparse"))
    msg = str(info.value)
    assert "site 0 (node 'scaled_dot_product_attention'" in msg and "varies per query" in msg
    assert "on_unsupported='skip'" in msg
    converted = convert(model, inputs, config=OSPConfig(layout="all_sparse", on_unsupported="skip"))
    rows = converted.osp_report.video_sites
    assert [r.layout for r in rows] == ["full"] * 3
    assert all("kept dense: the attention mask varies per query" in r.decision for r in rows)
    with torch.no_grad():
        assert rel_err(converted(*inputs), model(*inputs)) <= 1e-6
