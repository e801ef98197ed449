"""`osp_report`: what every pass did, per attention site and per graph, as data and as text tables."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

#: Attention kinds that get an entry of the layout (full/token/group): video self-attention, and joint
#: attention over text and video joined in one sequence (CogVideoX, HunyuanVideo).
LAYOUT_KINDS = ("video_self", "joint")


@dataclass
class PassReport:
    """What one pass did to one graph: a one-line summary and any rows worth a table."""

    name: str
    summary: str
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SiteRow:
    """One attention call of the model, as the passes left it."""

    where: str
    kind: str
    index: int | None
    layout: str
    batch: int
    heads: int
    tokens: int
    kv_tokens: int
    head_dim: int
    grid: tuple | None
    subsequence_len: int | None
    flops_before: int
    flops_after: int
    decision: str
    text_tokens: int = 0  # joint attention: the text tokens joined with the video ones


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def human_flops(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def flops_change(before: float, after: float) -> str:
    """How the attention FLOPs changed, said the right way round: a small grid can cost more sparse
    than dense (the fold pads H and W; joint attention repeats the text keys beside every subsequence)."""
    if not after or not before:
        return "n/a"
    if after <= before:
        return f"{before / after:.2f}x fewer"
    return (f"{after / before:.2f}x more: at this size the fold's padding (and at joint sites the text keys beside "
            f"every subsequence) outweighs the sparsity")


@dataclass
class GraphRecord:
    code: str
    passes: list[PassReport]
    module: fx.GraphModule | None = field(default=None, repr=False, compare=False)  # the final graph (export)
    dataflow: tuple | None = field(default=None, repr=False, compare=False)  # block graphs before/after the passes


class OSPReport:
    """Collected over every graph of one session; `str(report)` prints the tables."""

    def __init__(self) -> None:
        self.sites: dict[tuple, SiteRow] = {}
        self.graphs: list[GraphRecord] = []
        self.layout_changes: dict | None = None  # token_layout pass: permutations before/after, bytes
        self.communication: dict | None = None  # comm_accounting pass: collectives per forward

    # -- recording -------------------------------------------------------------------------------
    def record_site(self, key: tuple, row: SiteRow) -> None:
        self.sites[key] = row

    def add_graph(self, gm: fx.GraphModule, passes: list[PassReport], dataflow: tuple | None = None) -> None:
        """Keep a graph's code, what each pass did, the final module and (`osp_compile.visualize`) its
        block-level dataflow before and after the passes."""
        self.graphs.append(GraphRecord(gm.code, passes, gm, dataflow))

    # -- reading ---------------------------------------------------------------------------------
    @property
    def site_rows(self) -> list[SiteRow]:
        return list(self.sites.values())

    @property
    def video_sites(self) -> list[SiteRow]:
        return sorted((s for s in self.sites.values() if s.kind in LAYOUT_KINDS), key=lambda s: s.index)

    @property
    def layout(self) -> list[str]:
        return [s.layout for s in self.video_sites]

    def attention_flops(self) -> tuple[int, int]:
        rows = self.site_rows
        return sum(r.flops_before for r in rows), sum(r.flops_after for r in rows)

    def sites_table(self) -> str:
        return format_table(self.site_table_rows())

    def site_table_rows(self) -> list[dict[str, Any]]:
        """One dict per attention call, the columns of the sites table (text, HTML)."""
        joint = any(s.text_tokens for s in self.site_rows)
        rows = []
        for s in self.site_rows:
            rows.append({
                "site": "-" if s.index is None else s.index,
                "kind": s.kind,
                "layout": s.layout,
                "tokens": s.tokens,
                **({"text": s.text_tokens or "-"} if joint else {}),
                "kv": s.kv_tokens,
                "subseq": s.subsequence_len or "-",
                "attn FLOPs before": human_flops(s.flops_before),
                "after": human_flops(s.flops_after),
                "where": s.where,
            })
        return rows

    def summary(self) -> str:
        before, after = self.attention_flops()
        n = len(self.video_sites)
        joint = sum(1 for s in self.video_sites if s.kind == "joint")
        sparse = sum(1 for s in self.video_sites if s.layout in ("token", "group"))
        ratio = flops_change(before, after)
        of_which = f" (of which {joint} joint text+video)" if joint else ""
        return (
            f"{len(self.sites)} attention call(s), {n} video self-attention site(s){of_which}, {sparse} made sparse; "
            f"attention FLOPs {human_flops(before)} -> {human_flops(after)} ({ratio})"
        )

    def passes_text(self) -> str:
        lines = []
        for i, g in enumerate(self.graphs):
            for p in g.passes:
                lines.append(f"graph {i} · {p.name}: {p.summary}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "sites": [asdict(s) for s in self.site_rows],
            "graphs": [{"passes": [asdict(p) for p in g.passes]} for g in self.graphs],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        return f"{self.summary()}\n\n{self.sites_table()}\n\n{self.passes_text()}"

    __repr__ = __str__
