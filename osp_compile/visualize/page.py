"""The inspection page: one self-contained HTML file (inline CSS and SVG), and the same pictures as
SVG files.

Sections: summary, the sites table, attention FLOPs and communication before/after, the block-level
dataflow of every captured graph before and after the passes (what they inserted marked), and one
frame's tokens coloured by subsequence for both Skiparse patterns (and by rank for SSP).
"""
from __future__ import annotations

import html
from pathlib import Path

from osp_compile.config import OSPConfig
from osp_compile.report import OSPReport

from .charts import LAYOUT_COLOURS, draw_flops
from .dataflow import draw_dataflow
from .tokens import draw_tokens

_CSS = """
body { font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.pair { flex-wrap: nowrap; } .pair > .fig { flex: 0 1 auto; min-width: 0; } .pair svg { max-width: 100%; height: auto; }
.fig { border: 1px solid #e3e3e3; padding: 6px; background: white; overflow-x: auto; max-width: 100%; }
pre { font-size: 11px; background: #f7f7f7; padding: 8px; overflow-x: auto; }
.pill { display: inline-block; padding: 0 6px; border-radius: 8px; color: white; font-size: 11px; }
"""


def figures(report: OSPReport, config: OSPConfig, world_size: int = 1) -> dict[str, str]:
    """file name -> SVG of every picture of the page."""
    out: dict[str, str] = {"flops.svg": draw_flops(report)}
    for i, record in enumerate(report.graphs):
        if record.dataflow is None:
            continue
        before, after = record.dataflow
        out[f"dataflow_g{i}_before.svg"] = draw_dataflow(before, f"graph {i}: captured (before the passes)")
        out[f"dataflow_g{i}_after.svg"] = draw_dataflow(after, f"graph {i}: rewritten (after the passes)")
    grid = next((s.grid for s in report.video_sites if s.grid), None)
    if grid is not None:
        for pattern in ("token", "group"):
            out[f"tokens_{pattern}.svg"] = draw_tokens(grid, config.sparse_ratio, pattern)
            if world_size > 1:
                out[f"ranks_{pattern}.svg"] = draw_tokens(grid, config.sparse_ratio, pattern, world=world_size)
    return out


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no attention calls)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = []
    for r in rows:
        cells = []
        for c, v in r.items():
            text = html.escape(str(v))
            if c == "layout" and v in ("full", "token", "group"):
                text = f"<span class='pill' style='background:{LAYOUT_COLOURS[v]}'>{text}</span>"
            cls = " class='num'" if str(v)[:1].isdigit() else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _communication(report: OSPReport) -> str:
    """Rearrangements and collectives before/after, as the passes recorded them ("n/a" where none did)."""
    changes, comm = report.layout_changes, report.communication
    rows = [{
        "what": "token rearrangements per forward",
        "before": changes["before"] if changes else "n/a",
        "after": f"{changes['after']} ({changes['bytes'] / 1e6:.2f} MB moved)" if changes else "n/a",
    }, {
        "what": "collectives per forward (SP)",
        "before": comm.get("before", "n/a") if comm else "n/a",
        "after": (", ".join(f"{n} {k}" for k, n in comm["collectives"].items())
                  + f"; {comm['bytes_per_rank_mean'] / 1e6:.3f} MB sent per rank") if comm else "n/a",
    }]
    return _table(rows)


def build_html(report: OSPReport, config: OSPConfig, pictures: dict[str, str], title: str, world_size: int = 1) -> str:
    def fig(name: str) -> str:
        return f"<div class='fig'>{pictures[name]}</div>" if name in pictures else ""

    dataflow = []
    for i in range(len(report.graphs)):
        dataflow.append(f"<div class='row pair'>{fig(f'dataflow_g{i}_before.svg')}{fig(f'dataflow_g{i}_after.svg')}</div>")
    tokens = "".join(fig(f"tokens_{p}.svg") for p in ("token", "group"))
    ranks = "".join(fig(f"ranks_{p}.svg") for p in ("token", "group"))
    layout = config.layout if isinstance(config.layout, str) else ",".join(config.layout)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="sub">{html.escape(report.summary())}</div>
<div class="sub">P = {config.sparse_ratio} ({config.sparse_ratio ** 2} subsequences), layout {html.escape(layout)},
num_full_blocks {config.num_full_blocks}, SSP world size for the rank picture: {world_size}</div>
<h2>Attention sites</h2>
{_table(report.site_table_rows())}
<h2>Attention FLOPs and communication, before and after</h2>
<div class="row">{fig('flops.svg')}<div>{_communication(report)}</div></div>
<h2>Block-level dataflow, before and after</h2>
<div class="sub">Boxes are blocks (module paths up to their list index); the bold line is the main
stream from the first input. Marked: dense attention and every osp:: op the passes inserted, by kind.</div>
{''.join(dataflow) or '<p>(no graph recorded)</p>'}
<h2>Skiparse patterns of one frame</h2>
<div class="row">{tokens or '<p>(no video self-attention site: no grid)</p>'}</div>
{f'<h2>SSP: subsequences by rank</h2><div class="row">{ranks}</div>' if ranks else ''}
<h2>Passes</h2>
<pre>{html.escape(report.passes_text())}</pre>
</body></html>
"""


def write_report(report: OSPReport, config: OSPConfig, html_path: str | Path | None = None,
                 out_dir: str | Path | None = None, world_size: int = 1, title: str = "osp-compile inspect") -> dict[str, str]:
    """Write the HTML page and/or the SVG files; returns the pictures (file name -> SVG)."""
    pictures = figures(report, config, world_size)
    if html_path is not None:
        Path(html_path).write_text(build_html(report, config, pictures, title, world_size), encoding="utf-8")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, svg in pictures.items():
            (out / name).write_text(svg, encoding="utf-8")
    return pictures
