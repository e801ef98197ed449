"""Attention FLOPs per site, before and after the passes, as horizontal bars."""
from __future__ import annotations

from osp_compile.report import OSPReport, flops_change, human_flops

from .svg import Svg, text_width

LAYOUT_COLOURS = {"full": "#7f7f7f", "token": "#4e79a7", "group": "#f28e2b", "-": "#bab0ac"}


def draw_flops(report: OSPReport) -> str:
    """One pair of bars per attention call (dense before, as rewritten after), and the totals."""
    rows = report.site_rows
    before, after = report.attention_flops()
    scale_max = max([r.flops_before for r in rows] + [r.flops_after for r in rows] + [1])
    labels = [r.kind if r.index is None else f"{r.index} {r.kind} {r.layout}" for r in rows]
    left = max([text_width(t, 11) for t in labels] + [60]) + 16
    bar_w, row_h = 360.0, 26.0
    top = 58.0
    height = top + row_h * len(rows) + 16
    width = left + bar_w + 150
    ratio = flops_change(before, after)
    title = f"Attention FLOPs per forward: {human_flops(before)} -> {human_flops(after)} ({ratio})"
    svg = Svg(max(width, text_width(title, 14) + 20), height, title)
    svg.rect(0, 0, svg.width, height, fill="white")
    svg.text(10, 20, title, size=14, font_weight="bold")
    svg.rect(10, 32, 12, 8, fill="#d9d9d9")
    svg.text(26, 40, "before (dense)", size=11)
    x = 26 + text_width("before (dense)", 11) + 16
    for layout, colour in LAYOUT_COLOURS.items():
        svg.rect(x, 32, 12, 8, fill=colour)
        svg.text(x + 16, 40, f"after: {layout}" if layout != "-" else "after: not a video site", size=11)
        x += text_width(f"after: {layout}", 11) + 34
    for i, (r, label) in enumerate(zip(rows, labels)):
        y = top + row_h * i
        svg.text(left - 8, y + 15, label, size=11, anchor="end")
        svg.rect(left, y + 2, bar_w * r.flops_before / scale_max, 9, fill="#d9d9d9")
        svg.rect(left, y + 12, bar_w * r.flops_after / scale_max, 9, fill=LAYOUT_COLOURS.get(r.layout, "#bab0ac"))
        svg.tooltip(f"{r.where}: {human_flops(r.flops_before)} -> {human_flops(r.flops_after)}")
        svg.text(left + bar_w * max(r.flops_before, r.flops_after) / scale_max + 6, y + 15,
                 f"{human_flops(r.flops_before)} -> {human_flops(r.flops_after)}", size=10, fill="#444")
    return str(svg)
