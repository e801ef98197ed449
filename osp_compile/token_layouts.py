"""Token layouts of the hidden state and the routing between them, on one rank or S ranks.

A token tensor has its batch on dim 0 and the T*H*W video tokens on one dim. Its *layout* says
which tokens a rank holds, in which order:

- ``full``    every token, natural (frame-major) order, on every rank (replicated);
- ``natural`` natural order, rank r holds tokens [r*N/S, (r+1)*N/S) (Ulysses' sequence shards);
- ``token`` / ``group``  Skiparse-folded: the P*P subsequences of the padded grid in the batch
  (order (p, q, b)), rank r holding subsequences [r*P*P/S, (r+1)*P*P/S) (SSP).
With S = 1, ``natural`` is ``full``. Every change of layout is a routing of rows (one row = one
token of one sample); it is computed here once from the two index maps, never from data. Padded
slots (id -1) are never sent: receivers fill them with zeros, so a switch moves real tokens only.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .errors import OSPConfigError
from .skiparse_layout import layout_index

LAYOUTS = ("full", "natural", "token", "group")
FOLDED = ("token", "group")


def check_world(grid: tuple[int, int, int], p: int, world: int, heads: int | None = None, where: str = "",
                ssp: bool = True) -> None:
    """The arithmetic SSP (whole subsequences per rank) and Ulysses (token and head shards) need,
    as errors that say how to fix it."""
    t, h, w = grid
    if ssp and (p * p) % world:
        raise OSPConfigError(
            f"SSP with {world} ranks needs the world size to divide P*P = {p * p}{where}: each rank holds whole "
            f"subsequences. Use a world size in {[d for d in range(1, p * p + 1) if (p * p) % d == 0]}, or a larger P."
        )
    if (t * h * w) % world:
        raise OSPConfigError(
            f"{t * h * w} tokens (grid {grid}) do not split evenly over {world} ranks{where} for the full-attention "
            f"(Ulysses) shards: use a world size that divides T*H*W."
        )
    if heads is not None and heads % world:
        raise OSPConfigError(
            f"Ulysses attention scatters heads over the ranks, but {heads} heads do not divide by world size "
            f"{world}{where}: use a world size that divides the head count."
        )


def local_tokens(layout: str, grid: tuple[int, int, int], p: int, world: int) -> int:
    """Tokens on one rank per batch row of the layout."""
    t, h, w = grid
    if layout == "full":
        return t * h * w
    if layout == "natural":
        return t * h * w // world
    return layout_index(grid, p, layout).shape[1]


def batch_multiplier(layout: str, p: int, world: int) -> int:
    """How many batch rows a rank holds per sample (the folded subsequences it owns)."""
    return p * p // world if layout in FOLDED else 1


@lru_cache(maxsize=None)
def slot_ids(layout: str, grid: tuple[int, int, int], p: int, world: int, rank: int, batch: int) -> np.ndarray:
    """Global row id (b * N + token) of every local row, -1 for padding; rows in local memory order."""
    t, h, w = grid
    n = t * h * w
    if layout == "full":
        tok = np.arange(n)[None, :].repeat(batch, 0)
        return (np.arange(batch)[:, None] * n + tok).reshape(-1)
    if layout == "natural":
        chunk = n // world
        tok = np.arange(rank * chunk, (rank + 1) * chunk)[None, :].repeat(batch, 0)
        return (np.arange(batch)[:, None] * n + tok).reshape(-1)
    idx = layout_index(grid, p, layout)  # [P*P, L], real tokens first
    per = p * p // world
    mine = idx[rank * per:(rank + 1) * per]  # [per, L]
    ids = mine[:, None, :] + (np.arange(batch)[None, :, None] * n)  # [per, B, L]
    ids = np.where(mine[:, None, :] >= 0, ids, -1)
    return ids.reshape(-1)


@lru_cache(maxsize=None)
def routing(src: str, dst: str, grid: tuple[int, int, int], p: int, world: int, rank: int, batch: int):
    """All-to-all routing from `src` to `dst` on `rank`: rows to send (grouped by destination),
    split sizes, and for every destination row its index into [received rows, one zero row]."""
    src_ids = [slot_ids(src, grid, p, world, r, batch) for r in range(world)]
    owner_rank, owner_row = {}, {}
    for r, ids in enumerate(src_ids):
        for i, g in enumerate(ids):
            if g >= 0:
                owner_rank[g], owner_row[g] = r, i
    send_rows, send_counts = [], []
    for q in range(world):
        need = slot_ids(dst, grid, p, world, q, batch)
        rows = [owner_row[g] for g in need if g >= 0 and owner_rank[g] == rank]
        send_rows.extend(rows)
        send_counts.append(len(rows))
    need = slot_ids(dst, grid, p, world, rank, batch)
    recv_counts = [0] * world
    positions: list[list[int]] = [[] for _ in range(world)]
    for j, g in enumerate(need):
        if g >= 0:
            positions[owner_rank[g]].append(j)
            recv_counts[owner_rank[g]] += 1
    total = sum(recv_counts)
    gather = np.full(len(need), total, dtype=np.int64)
    offset = 0
    for r in range(world):
        gather[positions[r]] = np.arange(offset, offset + recv_counts[r])
        offset += recv_counts[r]
    return np.asarray(send_rows, dtype=np.int64), send_counts, recv_counts, replicate_padding(gather, need, dst, local_tokens(dst, grid, p, world))


@lru_cache(maxsize=None)
def local_gather(src: str, dst: str, grid: tuple[int, int, int], p: int, world: int, rank: int, batch: int) -> np.ndarray:
    """Rows of a whole (or, on one process, any) source layout that make the local `dst` rows."""
    src_ids = slot_ids(src, grid, p, world, rank, batch)  # "full" is the whole sequence on every rank
    where = {g: i for i, g in enumerate(src_ids) if g >= 0}
    need = slot_ids(dst, grid, p, world, rank, batch)
    index = np.asarray([where[g] if g >= 0 else len(src_ids) for g in need], dtype=np.int64)
    return replicate_padding(index, need, dst, local_tokens(dst, grid, p, world))


def replicate_padding(index: np.ndarray, ids: np.ndarray, layout: str, length: int) -> np.ndarray:
    """Padded slots of a folded layout copy the first real token of their own subsequence.

    Every per-token op then maps a padded row to exactly the output of that real row (attention
    too: same subsequence, same keys, same RoPE position), so padding never changes a max-type
    statistic such as the per-tensor scale of a HiF8 linear, and never holds NaN or garbage.
    Slots run (subsequence, sample, position) with real tokens first, so the first real one of a
    (subsequence, sample) row is its position 0.
    """
    if layout not in FOLDED:
        return index
    rows = index.reshape(-1, length).copy()
    pad = ids.reshape(-1, length) < 0
    rows[pad] = np.broadcast_to(rows[:, :1], rows.shape)[pad]
    return rows.reshape(-1)


@lru_cache(maxsize=None)
def gather_order(src: str, grid: tuple[int, int, int], p: int, world: int, batch: int) -> np.ndarray:
    """For every row of the full natural layout, its position in the concatenated shards of `src`."""
    shards = np.concatenate([slot_ids(src, grid, p, world, r, batch) for r in range(world)])
    where = np.empty(batch * grid[0] * grid[1] * grid[2], dtype=np.int64)
    valid = shards >= 0
    where[shards[valid]] = np.nonzero(valid)[0]
    return where


def token_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, tuple]:
    """[B0, ..., N, ...] (tokens at `dim`) -> rows [B0 * N, R] in (batch, token) order, and R's shape."""
    moved = x.movedim(dim, 1)
    return moved.reshape(moved.shape[0] * moved.shape[1], -1), tuple(moved.shape[2:])


def from_rows(rows: torch.Tensor, dim: int, batch_rows: int, rest: tuple, ndim: int) -> torch.Tensor:
    return rows.reshape(batch_rows, -1, *rest).movedim(1, dim % ndim)


def with_zero_row(rows: torch.Tensor) -> torch.Tensor:
    """Rows plus one zero row at the end: what a slot with no source reads (never a folded pad,
    which copies a real token; see `replicate_padding`)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])], dim=0)


def gather_rows(x: torch.Tensor, dim: int, index: np.ndarray, key: tuple, out_batch: int) -> torch.Tensor:
    """The rows of `x` (plus a zero row) picked by `index`, shaped back with `out_batch` batch rows."""
    rows, rest = token_rows(x, dim)
    out = with_zero_row(rows).index_select(0, as_index(index, x.device, key))
    return from_rows(out, dim, out_batch, rest, x.dim())


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
