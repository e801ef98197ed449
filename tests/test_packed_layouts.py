"""Packed token layouts (what the hidden state runs in between sparse blocks): properties of the
index maps against skiparse.md's sid formula, the all-to-all routing simulated in numpy, and
per-sample ops that a packed layout leaves alone."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from osp_compile import OSPConfig, convert
from osp_compile.oracle import masked_oracle, rel_err, subsequence_id
from osp_compile.skiparse_layout import padded_extent, real_length_classes
from osp_compile.token_layouts import gather_order, local_token_ids, routing, shard_rows, slot_ids
from reference_model import PRESETS, build_model, make_inputs
from strategies import grids


@st.composite
def cases(draw):
    grid, p, pattern = draw(grids())
    world = draw(st.sampled_from([d for d in range(1, p * p + 1) if (p * p) % d == 0]))
    return grid, p, pattern, world


@settings(max_examples=120, deadline=None)
@given(cases())
def test_ranks_hold_whole_subsequences_of_real_tokens_only(case):
    grid, p, pattern, world = case
    sid = subsequence_id(grid, p, pattern).numpy()
    per = p * p // world
    held = [local_token_ids(pattern, grid, p, world, r) for r in range(world)]
    every = np.concatenate(held)
    assert np.array_equal(np.sort(every), np.arange(grid[0] * grid[1] * grid[2]))  # each token once, no padding
    for r, tokens in enumerate(held):
        offset, s = 0, r * per
        for start, count, n in real_length_classes(grid, p, pattern, r * per, per):
            assert start == offset
            for j in range(count):  # a run: `count` subsequences of `n` tokens, in order, frame-major inside
                rows = tokens[start + j * n:start + (j + 1) * n]
                assert np.all(sid[rows] == s) and np.all(np.diff(rows) > 0)
                assert len(rows) == (sid == s).sum()
                s += 1
            offset += count * n
        assert offset == len(tokens) and s == (r + 1) * per


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, 2), st.sampled_from(["natural", "token", "group"]), st.sampled_from(["natural", "token", "group"]))
def test_all_to_all_routing_delivers_every_row(case, batch, src, dst):
    """Run the all-to-all of `routing` in numpy: every rank ends with exactly the dst rows."""
    grid, p, _, world = case
    n = grid[0] * grid[1] * grid[2]
    if n % world or src == dst:
        return
    data = [slot_ids(src, grid, p, world, r, batch) for r in range(world)]  # each row carries its global id
    plans = [routing(src, dst, grid, p, world, r, batch) for r in range(world)]
    for r in range(world):
        received = []
        for q in range(world):  # what q sends to r: q's send rows in r's slot
            send, counts, _, _ = plans[q]
            lo = sum(counts[:r])
            received.append(data[q][send[lo:lo + counts[r]]])
        assert [len(x) for x in received] == plans[r][2]
        got = np.concatenate(received)[plans[r][3]]
        assert np.array_equal(got, slot_ids(dst, grid, p, world, r, batch))


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(1, 2))
def test_final_gather_restores_natural_order(case, batch):
    grid, p, pattern, world = case
    rows = shard_rows(pattern, grid, p, world, batch)
    shards = [np.pad(slot_ids(pattern, grid, p, world, r, batch), (0, rows - len(slot_ids(pattern, grid, p, world, r, batch))),
                     constant_values=-1) for r in range(world)]
    gathered = np.concatenate(shards)[gather_order(pattern, grid, p, world, batch)]
    assert np.array_equal(gathered, np.arange(batch * grid[0] * grid[1] * grid[2]))


class _SampleMixing(torch.nn.Module):
    """A block followed by an op across the batch (e.g. a guidance-style combination of samples):
    a folded layout would have to leave the fused layout around it; a packed one does not."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, *args):
        y = self.block(x, *args)
        rolled = torch.cat([y[1:], y[:1]], dim=0)  # sample b takes b+1's tokens, token for token
        return y - 0.25 * y.mean(0, keepdim=True) + 0.1 * rolled.transpose(0, 1).transpose(0, 1)


def test_ops_across_the_batch_stay_in_the_packed_layout():
    model = build_model("tiny", num_layers=4, seed=1)
    model.blocks = torch.nn.ModuleList(_SampleMixing(b) for b in model.blocks)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(3, 12, 20), seed=2, batch=2)
    config = OSPConfig(sparse_ratio=2, layout="all_sparse")
    converted = convert(model, args, kwargs, config)
    report = converted.osp_report
    rows = [row for g in report.graphs for pr in g.passes if pr.name == "token_layout" for row in pr.rows]
    assert rows and not [r for r in rows if "blocked" in r], rows
    assert report.layout_changes["after"] == 5  # in, 3 switches, out: nothing blocked by the batch ops
    with torch.no_grad():
        out = converted(*args, **kwargs)
        with masked_oracle(report.layout, (3, 6, 10), 2):
            ref = model(*args, **kwargs)
    assert rel_err(out, ref) <= 1e-5


def test_report_counts_the_flops_of_real_tokens_only():
    """On a ragged grid (3, 6, 10) the fused sites compute sum(len^2) pairs, not the padded fold's."""
    model = build_model("tiny", num_layers=2, seed=1)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(3, 12, 20), seed=2)
    report = convert(model, args, kwargs, OSPConfig(sparse_ratio=2, layout="all_sparse")).osp_report
    rows = [r for r in report.sites.values() if r.layout in ("token", "group")]
    assert len(rows) == 2
    for r in rows:
        sid = subsequence_id((3, 6, 10), 2, r.layout).numpy()
        pairs = sum(int((sid == s).sum()) ** 2 for s in range(4))
        assert r.flops_after == 4 * r.heads * r.head_dim * r.batch * pairs
        assert r.subsequence_len == max(int((sid == s).sum()) for s in range(4))  # the longest real one
        padded = 3 * padded_extent(6, 2) * padded_extent(10, 2) // 4
        assert r.flops_after < 4 * r.heads * r.head_dim * r.batch * 4 * padded ** 2  # the padded fold: more


class TextAsLongAsVideo(torch.nn.Module):
    """Self-attention over the video, then cross-attention to a text with a key-padding mask; run
    with as many text tokens as video tokens, so only the dataflow tells a position table from
    the text keys."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv, self.q2, self.kv2, self.out = (torch.nn.Linear(dim, n * dim) for n in (3, 1, 2, 1))

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, video, text, text_mask):
        x = self.embed(video).flatten(2).transpose(1, 2)
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, -1))
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        k2, v2 = (self.split(t) for t in self.kv2(text).chunk(2, -1))
        cross = torch.nn.functional.scaled_dot_product_attention(self.split(self.q2(x)), k2, v2,
                                                                 attn_mask=text_mask[:, None, None, :])
        return self.out(x + cross.transpose(1, 2).flatten(2))


def test_text_as_long_as_the_video_keeps_its_order():
    """Text keys and values are not position tables, whatever their length: moved into the packed
    layout, they would no longer line up with their key-padding mask."""
    grid = (2, 4, 6)
    model = TextAsLongAsVideo().eval()
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, 2, 8, 12, generator=gen)
    text = torch.randn(1, 48, 16, generator=gen)  # 48 = T*H*W
    mask = torch.rand(1, 48, generator=gen) < 0.5
    converted = convert(model, (video, text, mask), config=OSPConfig(layout=["token"]))
    # with grid= as well: the dataflow proved the second call cross-attention, its length changes nothing
    with_grid = convert(model, (video, text, mask), config=OSPConfig(layout=["token"], grid=grid))
    assert [s.kind for s in with_grid.osp_report.site_rows] == ["video_self", "cross"]
    sid = subsequence_id(grid, 2, "token")
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def oracle(q, k, v, attn_mask=None, **kw):  # the first call is the video self-attention
        calls.append(1)
        return real(q, k, v, attn_mask=(sid[:, None] == sid[None, :]) if len(calls) == 1 else attn_mask, **kw)

    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = oracle
        try:
            want = model(video, text, mask)
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
        assert rel_err(converted(video, text, mask), want) <= 1e-5
        assert rel_err(with_grid(video, text, mask), want) <= 1e-5
