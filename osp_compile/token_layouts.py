"""Token layouts of the hidden state and the routing between them, on one rank or S ranks.

A token tensor has the T*H*W video tokens on one dim (any other dims, the batch included, ride
along untouched). Its *layout* says which tokens a rank holds along that dim, in which order:

- ``full``    every token, natural (frame-major) order, on every rank (replicated);
- ``natural`` natural order, rank r holds tokens [r*N/S, (r+1)*N/S) (Ulysses' sequence shards);
- ``token`` / ``group``  Skiparse-*packed*: the real tokens of the P*P subsequences, subsequence
  after subsequence (`skiparse_layout.subsequence_tokens`), rank r holding subsequences
  [r*P*P/S, (r+1)*P*P/S) (SSP).
With S = 1, ``natural`` is ``full``. A layout is a permutation (and, over S ranks, a split) of the
token dim and nothing else: no padding, no batch folding. So per-sample tensors (text, modulation)
broadcast as they are, linears never work on padded rows, and a subsequence is a contiguous run of
rows that attention reads as a view. Ranks of a packed layout may hold different token counts
(subsequences of a ragged grid differ in length). Every change of layout is a routing of rows (one
row = one token of one leading index), computed here once from the two index maps, never from data.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .errors import OSPConfigError
from .skiparse_layout import subsequence_tokens

LAYOUTS = ("full", "natural", "token", "group")
FOLDED = ("token", "group")


def check_world(grid: tuple[int, int, int], p: int, world: int, heads: int | None = None, where: str = "",
                subsequences: bool = True, natural: bool = True) -> None:
    """The arithmetic SSP (whole subsequences per rank) and Ulysses (token and head shards) need,
    as errors that say how to fix it. ``subsequences``: some layout holds whole subsequences per
    rank (an SSP sparse site); ``natural``: some holds a shard of the natural order (a full site
    under SSP, every site under Ulysses). Only what is used is checked."""
    t, h, w = grid
    if subsequences and (p * p) % world:
        raise OSPConfigError(
            f"SSP with {world} ranks needs the world size to divide P*P = {p * p}{where}: each rank holds whole "
            f"subsequences. Use a world size in {[d for d in range(1, p * p + 1) if (p * p) % d == 0]}, or a larger P."
        )
    if natural and (t * h * w) % world:
        raise OSPConfigError(
            f"{t * h * w} tokens (grid {grid}) do not split evenly over {world} ranks{where} for the full-attention "
            f"(Ulysses) shards: use a world size that divides T*H*W."
        )
    if heads is not None and heads % world:
        raise OSPConfigError(
            f"Ulysses attention scatters heads over the ranks, but {heads} heads do not divide by world size "
            f"{world}{where}: use a world size that divides the head count."
        )


def owned_subsequences(p: int, world: int, rank: int) -> range:
    """The subsequences rank `rank` holds in a packed layout over `world` ranks (SSP)."""
    per = p * p // world
    return range(rank * per, (rank + 1) * per)


@lru_cache(maxsize=None)
def local_token_ids(layout: str, grid: tuple[int, int, int], p: int, world: int, rank: int) -> np.ndarray:
    """The tokens (natural index) a rank holds, in local order along the token dim."""
    n = grid[0] * grid[1] * grid[2]
    if layout == "full":
        return np.arange(n)
    if layout == "natural":
        chunk = n // world
        return np.arange(rank * chunk, (rank + 1) * chunk)
    subs = subsequence_tokens(grid, p, layout)
    return np.concatenate([subs[s] for s in owned_subsequences(p, world, rank)])


def local_tokens(layout: str, grid: tuple[int, int, int], p: int, world: int, rank: int) -> int:
    """How many tokens a rank holds along the token dim."""
    return len(local_token_ids(layout, grid, p, world, rank))


@lru_cache(maxsize=None)
def slot_ids(layout: str, grid: tuple[int, int, int], p: int, world: int, rank: int, batch: int) -> np.ndarray:
    """Global row id (b * N + token) of every local row, rows in local memory order (b-major)."""
    n = grid[0] * grid[1] * grid[2]
    tok = local_token_ids(layout, grid, p, world, rank)
    return (np.arange(batch)[:, None] * n + tok[None, :]).reshape(-1)


@lru_cache(maxsize=None)
def routing(src: str, dst: str, grid: tuple[int, int, int], p: int, world: int, rank: int, batch: int):
    """All-to-all routing from `src` to `dst` on `rank`: rows to send (grouped by destination),
    split sizes, and for every destination row its index into the received rows."""
    total = batch * grid[0] * grid[1] * grid[2]
    owner_rank = np.empty(total, dtype=np.int64)
    owner_row = np.empty(total, dtype=np.int64)
    for r in range(world):
        ids = slot_ids(src, grid, p, world, r, batch)
        owner_rank[ids], owner_row[ids] = r, np.arange(len(ids))
    send_rows, send_counts = [], []
    for q in range(world):
        need = slot_ids(dst, grid, p, world, q, batch)
        rows = owner_row[need[owner_rank[need] == rank]]
        send_rows.append(rows)
        send_counts.append(len(rows))
    need = slot_ids(dst, grid, p, world, rank, batch)
    src_of = owner_rank[need]
    recv_counts = np.bincount(src_of, minlength=world).tolist()
    # received rows arrive grouped by source rank, each group in the order of `need`
    order = np.argsort(src_of, kind="stable")
    place = np.empty(len(need), dtype=np.int64)
    place[order] = np.arange(len(need))
    return np.concatenate(send_rows).astype(np.int64), send_counts, recv_counts, place


@lru_cache(maxsize=None)
def local_gather(src: str, dst: str, grid: tuple[int, int, int], p: int, world: int, rank: int, batch: int) -> np.ndarray:
    """Rows of a whole (or, on one process, any) source layout that make the local `dst` rows."""
    src_ids = slot_ids(src, grid, p, world, rank, batch)  # "full" is the whole sequence on every rank
    where = np.empty(batch * grid[0] * grid[1] * grid[2], dtype=np.int64)
    where[src_ids] = np.arange(len(src_ids))
    return where[slot_ids(dst, grid, p, world, rank, batch)]


def shard_rows(src: str, grid: tuple[int, int, int], p: int, world: int, batch: int) -> int:
    """Rows every rank contributes to the final all-gather: the largest shard (smaller ones pad)."""
    return max(len(slot_ids(src, grid, p, world, r, batch)) for r in range(world))


@lru_cache(maxsize=None)
def gather_order(src: str, grid: tuple[int, int, int], p: int, world: int, batch: int) -> np.ndarray:
    """For every row of the full natural layout, its position in the all-gathered shards of `src`
    (each shard padded at its end to `shard_rows`)."""
    rows = shard_rows(src, grid, p, world, batch)
    where = np.empty(batch * grid[0] * grid[1] * grid[2], dtype=np.int64)
    for r in range(world):
        ids = slot_ids(src, grid, p, world, r, batch)
        where[ids] = r * rows + np.arange(len(ids))
    return where


def token_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, tuple]:
    """A token tensor as rows [lead * N, R] in (lead, token) order: `lead` is the size of dim 0 (1
    when the tokens are on dim 0 themselves), R the dims after the token dim, flattened."""
    dim = dim % x.dim()
    moved = x.unsqueeze(0) if dim == 0 else x.movedim(dim, 1)
    return moved.reshape(moved.shape[0] * moved.shape[1], -1), moved.shape[0], tuple(moved.shape[2:])


def from_rows(rows: torch.Tensor, dim: int, lead: int, rest: tuple, ndim: int) -> torch.Tensor:
    """Inverse of `token_rows` (the token count may differ: a layout change between ranks)."""
    dim = dim % ndim
    if dim == 0:
        return rows.reshape(-1, *rest)
    return rows.reshape(lead, -1, *rest).movedim(1, dim)


def gather_rows(x: torch.Tensor, dim: int, index_of: Callable[[int], np.ndarray], key: tuple) -> torch.Tensor:
    """One gather along the token dim: the rows `index_of(lead)` picks, shaped back."""
    rows, lead, rest = token_rows(x, dim)
    out = rows.index_select(0, as_index(index_of(lead), x.device, key + (lead,)))
    return from_rows(out, dim, lead, rest, x.dim())


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def as_index(array: np.ndarray, device: torch.device, key: tuple) -> torch.Tensor:
    """A device copy of an index array, cached per routing and device when running for real
    (under tracing it becomes a graph constant instead, and nothing fake is cached)."""
    tracing = torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None
    if tracing:
        return torch.as_tensor(array, dtype=torch.long, device=device)
    k = (key, str(device))
    if k not in _DEVICE_CACHE:
        _DEVICE_CACHE[k] = torch.as_tensor(array, dtype=torch.long, device=device)
    return _DEVICE_CACHE[k]
