"""Skiparse-2D token layouts: pad the (T, H, W) grid, fold the P*P subsequences into the batch, undo.

One implementation serves tensors and index maps: `fold` is pad + reshape + permute (so autograd,
Inductor and every device handle it natively), and `fold_index` is `fold` applied to the token
indices themselves (padding marked -1). The tests check both against the subsequence-id formula of
skiparse.md, which is written separately there.

Patterns (time is never split; y/x are rows/columns of the padded grid):
  token-wise: sid(t, y, x) = (y mod P, x mod P)            y = h*P + p
  group-wise: sid(t, y, x) = (floor(y/P) mod P, ...)        y = hh*P*P + p1*P + p2, sid part p1
Folded batch order is (p, q, b): subsequence-major, as OSP-Next's einops `(p q b)`.
Inside a subsequence tokens keep frame-major order: token-wise (t h w), group-wise (t hh p2 ww q2).

The fold (padding and all) serves the per-site op `osp::skiparse_attention` and the pictures. The
hidden state that runs between sparse blocks is *packed* instead (`subsequence_tokens`): the real
tokens only, subsequence after subsequence along the token dim, the batch dim untouched
(`osp_compile.token_layouts`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from .errors import OSPConfigError

PATTERNS = ("token", "group")
IntLike = int | torch.SymInt


def padded_extent(n: IntLike, p: int) -> IntLike:
    """H or W padded at the end to a multiple of P*P (skiparse.md: Padding)."""
    m = p * p
    return ((n + m - 1) // m) * m


def subsequence_length(grid: Sequence[IntLike], p: int) -> IntLike:
    t, h, w = grid
    return t * padded_extent(h, p) * padded_extent(w, p) // (p * p)


def check_fits(grid: Sequence[int], p: int, pattern: str, where: str = "") -> None:
    """Every subsequence must hold at least one real token, or its attention rows have no key.

    token-wise needs H, W >= P; group-wise needs H, W >= P*(P-1)+1 (the last group id first
    appears at row P*(P-1)).
    """
    if pattern not in PATTERNS:
        raise OSPConfigError(f"unknown Skiparse pattern {pattern!r}{where}: use 'token' or 'group'.")
    need = p if pattern == "token" else p * (p - 1) + 1
    _, h, w = (int(g) for g in grid)
    if h < need or w < need:
        raise OSPConfigError(
            f"sparse_ratio P={p} does not fit the token grid (T, H, W)={tuple(int(g) for g in grid)}{where}: "
            f"the {pattern}-wise pattern needs H and W >= {need}, otherwise some of its P*P="
            f"{p * p} subsequences hold no real token. Use a smaller sparse_ratio, a larger video, or "
            f"layout 'full' at this site."
        )


def _axis_factors(n_pad: IntLike, p: int, pattern: str) -> tuple[list[IntLike], int]:
    """Split a padded axis into factors; return them and the index of the subsequence-id factor."""
    if pattern == "token":
        return [n_pad // p, p], 1
    return [n_pad // (p * p), p, p], 1


def _fold_plan(grid: Sequence[IntLike], p: int, pattern: str):
    t, h, w = grid
    hp, wp = padded_extent(h, p), padded_extent(w, p)
    yf, ys = _axis_factors(hp, p, pattern)
    xf, xs = _axis_factors(wp, p, pattern)
    # dims of the factored view [B, T, *yf, *xf, R]
    b_dim, t_dim = 0, 1
    y_dims = list(range(2, 2 + len(yf)))
    x_dims = list(range(2 + len(yf), 2 + len(yf) + len(xf)))
    r_dim = x_dims[-1] + 1
    sid = [y_dims[ys], x_dims[xs]]
    rest = [t_dim] + [d for d in y_dims if d != sid[0]] + [d for d in x_dims if d != sid[1]]
    perm = sid + [b_dim] + rest + [r_dim]
    return (hp, wp), [t, *yf, *xf], perm


def fold(x: torch.Tensor, dim: int, grid: Sequence[IntLike], p: int, pattern: str, pad_value: float = 0.0) -> torch.Tensor:
    """[B, ..., S, ...] with S = T*H*W at `dim` -> [P*P*B, ..., L, ...], L the subsequence length."""
    dim = dim % x.dim()
    t, h, w = grid
    (hp, wp), factors, perm = _fold_plan(grid, p, pattern)
    moved = x.movedim(dim, 1)
    b, rest_shape = moved.shape[0], moved.shape[2:]
    g = moved.reshape(b, t, h, w, -1)
    if not (isinstance(hp, int) and isinstance(h, int) and hp == h and wp == w):
        g = F.pad(g, (0, 0, 0, wp - w, 0, hp - h), value=pad_value)
    g = g.reshape(b, *factors, g.shape[-1]).permute(perm)
    folded = g.reshape(p * p * b, -1, *rest_shape)
    return folded.movedim(1, dim)


def unfold(y: torch.Tensor, dim: int, grid: Sequence[IntLike], p: int, pattern: str) -> torch.Tensor:
    """Inverse of `fold`: [P*P*B, ..., L, ...] -> [B, ..., T*H*W, ...] (padding dropped)."""
    dim = dim % y.dim()
    t, h, w = grid
    (hp, wp), factors, perm = _fold_plan(grid, p, pattern)
    moved = y.movedim(dim, 1)
    pb, rest_shape = moved.shape[0], moved.shape[2:]
    b = pb // (p * p)
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    sizes = [b, *factors, -1]
    permuted_shape = [sizes[d] for d in perm]
    g = moved.reshape(permuted_shape).permute(inv).reshape(b, t, hp, wp, -1)
    if not (isinstance(hp, int) and isinstance(h, int) and hp == h and wp == w):
        g = g[:, :, :h, :w]
    out = g.reshape(b, t * h * w, *rest_shape)
    return out.movedim(1, dim)


def fold_index(grid: Sequence[int], p: int, pattern: str) -> torch.Tensor:
    """[P*P, L] original token index at each folded slot (row = subsequence p*P + q), -1 for padding."""
    return _fold_index(tuple(int(g) for g in grid), p, pattern).clone()


@lru_cache(maxsize=None)
def _fold_index(grid: tuple[int, int, int], p: int, pattern: str) -> torch.Tensor:
    # index maps are compile-time constants: build them for real even inside a fake-tensor trace
    with _disable_current_modes():
        t, h, w = grid
        idx = torch.arange(t * h * w, dtype=torch.long).view(1, -1, 1)
        return fold(idx, 1, grid, p, pattern, pad_value=-1).view(p * p, -1)


@lru_cache(maxsize=None)
def subsequence_tokens(grid: tuple[int, int, int], p: int, pattern: str) -> tuple[np.ndarray, ...]:
    """The real tokens of each of the P*P subsequences (in the fold's order), frame-major: what the
    packed layouts carry. No padded slot exists there at all: at 720P (H = 45, P = 2) the padded
    grid would add 6.7% rows, and every linear of a sparse run would work on them."""
    with _disable_current_modes():
        idx = _fold_index(grid, p, pattern).numpy()
        return tuple(row[row >= 0] for row in idx)


@lru_cache(maxsize=None)
def real_length_classes(grid: tuple[int, int, int], p: int, pattern: str, first: int, count: int) -> tuple:
    """Runs of consecutive subsequences [first, first+count) with equal real length, as
    (token offset of the run, number of subsequences, length): each run is one dense attention
    batch on a view of the packed tokens."""
    lengths = [len(t) for t in subsequence_tokens(grid, p, pattern)[first:first + count]]
    runs, start, offset = [], 0, 0
    for i in range(1, count + 1):
        if i == count or lengths[i] != lengths[start]:
            runs.append((offset, i - start, lengths[start]))
            offset += (i - start) * lengths[start]
            start = i
    return tuple(runs)


def packed_attention_pairs(grid: tuple[int, int, int], p: int, pattern: str) -> int:
    """(query, key) pairs one sample's packed attention computes: sum of squared real lengths."""
    return sum(len(t) ** 2 for t in subsequence_tokens(grid, p, pattern))


def key_padding_mask(grid: Sequence[IntLike], p: int, pattern: str, batch: int, device: torch.device) -> torch.Tensor | None:
    """Bool [P*P*B, 1, 1, L] (True = a real key), or None when the grid needs no padding."""
    t, h, w = grid
    if padded_extent(h, p) == h and padded_extent(w, p) == w:
        return None
    ones = torch.ones(1, t * h * w, 1, dtype=torch.uint8, device=device)
    valid = fold(ones, 1, grid, p, pattern, pad_value=0) > 0  # [P*P, L, 1]
    return valid.view(p * p, 1, 1, -1).repeat_interleave(batch, dim=0)


def relayout_local(x: torch.Tensor, dim: int, grid: Sequence[int], p: int, src: str, dst: str) -> torch.Tensor:
    """Change the layout of a token tensor on one process: one gather along the token dim."""
    from .token_layouts import gather_rows, local_gather

    if src == dst or {src, dst} <= {"full", "natural"}:
        return x
    grid = tuple(int(g) for g in grid)
    return gather_rows(x, dim, lambda lead: local_gather(src, dst, grid, p, 1, 0, lead), ("local", src, dst, grid, p))
