"""Communication accounting: the collectives one forward runs, and the bytes each rank sends.

Read from the rewritten graph: the token-layout pass marks every relayout and Ulysses call with
what it moves (`node.meta`), and this module turns that into collectives using the same routing
tables the kernels use (`token_layouts.routing`), so the numbers are the ones the run sends:
an all-to-all sends real tokens only (a packed layout has no padding), the final all-gather sends
equal shards (the largest rank's rows; smaller shards are padded to it), and a rank's own share
never leaves it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .token_layouts import routing, shard_rows


@dataclass
class Collective:
    kind: str  # "all_to_all" | "all_gather"
    site: int | None
    what: str
    bytes_per_rank: list[int] = field(default_factory=list)  # bytes rank r sends to other ranks

    @property
    def mean_bytes(self) -> float:
        return sum(self.bytes_per_rank) / max(1, len(self.bytes_per_rank))


def _row_bytes(shape: tuple, itemsize: int, tokens: int) -> int:
    return math.prod(shape) // (shape[0] * tokens) * itemsize


def relayout_collective(src: str, dst: str, shape: tuple, itemsize: int, grid, p: int, world: int,
                        site: int | None) -> Collective | None:
    """The collective behind a relayout between two layouts (None when no rank sends anything)."""
    if world <= 1 or src == "full":
        return None  # a local permutation or a local slice
    tokens = grid[0] * grid[1] * grid[2]
    batch, row = shape[0], _row_bytes(shape, itemsize, tokens)
    if dst == "full":  # an all-gather moves equal shards: the largest shard's rows, padding included
        per_rank = [shard_rows(src, grid, p, world, batch) * row * (world - 1)] * world
        return Collective("all_gather", site, f"{src} -> full", per_rank)
    per_rank = []
    for r in range(world):
        _, send_counts, _, _ = routing(src, dst, grid, p, world, r, batch)
        per_rank.append((sum(send_counts) - send_counts[r]) * row)
    return Collective("all_to_all", site, f"{src} -> {dst}", per_rank)


def ulysses_collectives(shape: tuple, itemsize: int, world: int, site: int | None) -> list[Collective]:
    """Four all-to-alls of one Ulysses attention (q, k, v in; output out), each [B, h, N/S, D]."""
    local = math.prod(shape) // world * itemsize
    sent = local * (world - 1) // world
    return [Collective("all_to_all", site, f"ulysses {t}", [sent] * world) for t in ("q", "k", "v", "out")]


def account(gm, grid, p: int, world: int) -> list[Collective]:
    """Every collective of one forward of a rewritten graph, in graph order."""
    out: list[Collective] = []
    for n in gm.graph.nodes:
        info = n.meta.get("osp_relayout")
        if info is not None:
            c = relayout_collective(info["src"], info["dst"], info["shape"], info["itemsize"], grid, p, world, info.get("site"))
            if c is not None:
                out.append(c)
        info = n.meta.get("osp_ulysses")
        if info is not None:
            out.extend(ulysses_collectives(info["shape"], info["itemsize"], world, info.get("site")))
    return out


def summarize(collectives: list[Collective]) -> dict:
    kinds: dict[str, int] = {}
    by_site: dict[str, float] = {}
    for c in collectives:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
        key = "-" if c.site is None else str(c.site)
        by_site[key] = by_site.get(key, 0.0) + c.mean_bytes
    return {
        "collectives": kinds,
        "bytes_per_rank_mean": sum(c.mean_bytes for c in collectives),
        "bytes_per_rank_max": max((sum(col) for col in zip(*[c.bytes_per_rank for c in collectives])), default=0),
        "bytes_by_site": by_site,
        "list": [{"kind": c.kind, "site": c.site, "what": c.what, "bytes_per_rank": c.bytes_per_rank} for c in collectives],
    }
