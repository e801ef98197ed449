"""Property tests of the Skiparse index maps: bijection, inverse, subsequence ids agree with the mask."""
import torch
from hypothesis import given, settings, strategies as st

from osp_compile.oracle import subsequence_id
from osp_compile.skiparse_layout import fold, fold_index, key_padding_mask, padded_extent, subsequence_length, unfold
from strategies import grids


@settings(max_examples=120, deadline=None)
@given(grids())
def test_fold_index_is_a_bijection_onto_real_tokens(case):
    grid, p, pattern = case
    idx = fold_index(grid, p, pattern)
    t, h, w = grid
    assert idx.shape == (p * p, subsequence_length(grid, p))
    real = idx[idx >= 0]
    assert torch.equal(real.sort().values, torch.arange(t * h * w))
    pads = (idx < 0).sum().item()
    assert pads == t * padded_extent(h, p) * padded_extent(w, p) - t * h * w


@settings(max_examples=120, deadline=None)
@given(grids())
def test_subsequence_of_every_slot_agrees_with_the_mask_formula(case):
    grid, p, pattern = case
    idx = fold_index(grid, p, pattern)
    sid = subsequence_id(grid, p, pattern)
    for s in range(p * p):
        row = idx[s][idx[s] >= 0]
        assert row.numel() > 0  # the fit condition guarantees a real token per subsequence
        assert bool((sid[row] == s).all())
        # inside a subsequence, tokens keep frame-major order
        assert bool((row[1:] > row[:-1]).all())


@settings(max_examples=60, deadline=None)
@given(grids(), st.integers(1, 2), st.integers(0, 2))
def test_unfold_inverts_fold_on_any_token_dim(case, batch, dim):
    grid, p, pattern = case
    t, h, w = grid
    token_dim = dim + 1
    shape = [batch, 2, 3]
    shape.insert(token_dim, t * h * w)
    x = torch.randn(*shape)
    y = fold(x, token_dim, grid, p, pattern)
    assert y.shape[0] == p * p * batch
    assert torch.equal(unfold(y, token_dim, grid, p, pattern), x)
    # fold is the gather given by fold_index (padding -> zeros)
    idx = fold_index(grid, p, pattern)
    moved = x.movedim(token_dim, 1)
    padded = torch.cat([moved, torch.zeros_like(moved[:, :1])], dim=1)
    gathered = padded[:, idx.clamp(min=-1).where(idx >= 0, torch.tensor(t * h * w))]  # [B, P*P, L, ...]
    expect = gathered.movedim(1, 0).reshape(p * p * batch, *gathered.shape[2:]).movedim(1, token_dim)
    assert torch.equal(y, expect)


@settings(max_examples=40, deadline=None)
@given(grids(), st.integers(1, 3))
def test_key_padding_mask_marks_exactly_the_padding(case, batch):
    grid, p, pattern = case
    mask = key_padding_mask(grid, p, pattern, batch, torch.device("cpu"))
    idx = fold_index(grid, p, pattern)
    if mask is None:
        assert bool((idx >= 0).all())
    else:
        expect = (idx >= 0).repeat_interleave(batch, dim=0)
        assert torch.equal(mask[:, 0, 0], expect)
