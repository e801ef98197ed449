"""One frame's tokens coloured by Skiparse subsequence (token-wise or group-wise), or by SSP rank.

The colours come from `skiparse_layout.fold_index` - the fold the compiled model runs - applied to
the padded frame, so the picture shows what the rewrite does, padding included: padded cells
(bottom rows, right columns) belong to a subsequence but are masked as keys and dropped at the end;
they are drawn faded and hatched. Under SSP with S ranks, rank r holds subsequences
[r*P*P/S, (r+1)*P*P/S).
"""
from __future__ import annotations

from osp_compile.errors import OSPConfigError
from osp_compile.skiparse_layout import fold_index, padded_extent

from .svg import Svg, text_width

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#d62728")
PATTERN_TEXT = {"token": "token-wise: sid = (y mod P, x mod P)",
                "group": "group-wise: sid = (floor(y/P) mod P, floor(x/P) mod P)"}


def subsequence_map(h: int, w: int, p: int, pattern: str) -> list[list[int]]:
    """sid (row p*P + q of the fold) of every cell of one padded frame [Hp][Wp]."""
    hp, wp = padded_extent(h, p), padded_extent(w, p)
    slots = fold_index((1, hp, wp), p, pattern)
    sid = [0] * (hp * wp)
    for s, row in enumerate(slots.tolist()):
        for token in row:
            sid[token] = s
    return [sid[y * wp:(y + 1) * wp] for y in range(hp)]


def check_world_size(p: int, world: int) -> None:
    if world < 1 or (p * p) % world:
        raise OSPConfigError(f"--world-size {world}: SSP needs a world size that divides P*P = {p * p} (each rank "
                             f"holds whole subsequences); use one of {[d for d in range(1, p * p + 1) if (p * p) % d == 0]}.")


def draw_tokens(grid: tuple[int, int, int], p: int, pattern: str, world: int = 1) -> str:
    """SVG of frame 0: cells coloured by subsequence (world == 1) or by the SSP rank that holds them."""
    check_world_size(p, world)
    _, h, w = grid
    sids = subsequence_map(h, w, p, pattern)
    hp, wp = len(sids), len(sids[0])
    per_rank = p * p // world
    by_rank = world > 1
    cell = max(6.0, min(30.0, 560.0 / max(hp, wp)))
    left, top = 34.0, 74.0
    legend = ([f"rank {r}: subsequences {r * per_rank}..{(r + 1) * per_rank - 1}" for r in range(world)] if by_rank
              else [f"{s} = ({s // p}, {s % p})" for s in range(p * p)])
    what = f"by SSP rank, S={world}" if by_rank else "by subsequence"
    title = f"{pattern}-wise, P={p}, {what}"
    notes = [PATTERN_TEXT[pattern], f"frame 0 of grid (T, H, W) = {tuple(grid)}, padded to {hp} x {wp}"]
    legend_w = max(text_width(t, 11) for t in legend) + 26
    width = max(left + wp * cell + 24 + legend_w, *(text_width(t, 11) + 20 for t in notes))
    height = max(top + hp * cell + 30, top + 16 * len(legend) + 20)
    svg = Svg(width, height, title)
    svg.rect(0, 0, width, height, fill="white")
    svg.text(10, 18, title, size=14, font_weight="bold")
    for i, note in enumerate(notes):
        svg.text(10, 34 + 13 * i, note, size=11, fill="#444")
    hatch = svg.hatch("#999")
    for y in range(hp):
        for x in range(wp):
            s = sids[y][x]
            colour = PALETTE[(s // per_rank if by_rank else s) % len(PALETTE)]
            padded = y >= h or x >= w
            cx, cy = left + x * cell, top + y * cell
            svg.rect(cx, cy, cell, cell, fill=colour, stroke="white", stroke_width=1, opacity=0.35 if padded else 1)
            if padded:
                svg.rect(cx, cy, cell, cell, fill=hatch, opacity=0.6)
            if cell >= 16:
                svg.text(cx + cell / 2, cy + cell / 2 + 4, str(s // per_rank if by_rank else s), size=min(11, cell / 2),
                         anchor="middle", fill="white" if not padded else "#333")
    svg.text(left + wp * cell / 2, top - 6, "x (column) ->", size=10, anchor="middle", fill="#666")
    svg.text(12, top + hp * cell / 2, "y", size=10, fill="#666")
    if hp > h or wp > w:
        svg.text(left, top + hp * cell + 18, f"hatched: padding ({h} x {w} real tokens per frame)", size=10, fill="#666")
    lx = left + wp * cell + 24
    for i, label in enumerate(legend):
        svg.rect(lx, top + 16 * i, 12, 12, fill=PALETTE[i % len(PALETTE)], rx=2)
        svg.text(lx + 18, top + 16 * i + 10, label, size=11)
    return str(svg)
