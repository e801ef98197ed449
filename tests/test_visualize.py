"""`osp-compile inspect --html/--out-dir`: the pictures are valid SVG holding the expected labels, the
page is self-contained, and marks are generic over osp:: op names."""
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

from osp_compile.cli import main
from osp_compile.errors import OSPConfigError
from osp_compile.ops import skiparse_attention
from osp_compile.visualize.dataflow import block_graph, category, draw_dataflow
from osp_compile.visualize.tokens import draw_tokens, subsequence_map

SVG = "{http://www.w3.org/2000/svg}"


def _texts(svg: str) -> str:
    root = ET.fromstring(svg)  # parses, or the test fails
    assert root.tag == f"{SVG}svg"
    return " | ".join(t.text or "" for t in root.iter(f"{SVG}text"))


def test_inspect_writes_the_page_and_the_svgs(tmp_path, capsys):
    pytest.importorskip("diffusers")
    page, out = tmp_path / "report.html", tmp_path / "svgs"
    assert main(["inspect", "--model", "diffusers:CogVideoX", "--layers", "3", "--num-full-blocks", "1", "--no-code",
                 "--html", str(page), "--out-dir", str(out), "--world-size", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    files = {p.name: p.read_text() for p in out.iterdir()}
    assert set(files) == {"flops.svg", "dataflow_g0_before.svg", "dataflow_g0_after.svg", "tokens_token.svg",
                          "tokens_group.svg", "ranks_token.svg", "ranks_group.svg"}
    texts = {name: _texts(svg) for name, svg in files.items()}
    assert "Attention FLOPs per forward" in texts["flops.svg"] and "1 joint token" in texts["flops.svg"]
    before, after = texts["dataflow_g0_before.svg"], texts["dataflow_g0_after.svg"]
    assert "transformer_blocks.0" in before and "patch_embed" in before and "dense attention" in before
    assert "skiparse_joint_attention[token]" in after and "skiparse_joint_attention[group]" in after
    assert "skiparse_joint_attention" not in before
    assert "token-wise, P=2, by subsequence" in texts["tokens_token.svg"]
    assert "hatched: padding (5 x 6 real tokens per frame)" in texts["tokens_group.svg"]
    assert "rank 1: subsequences 2..3" in texts["ranks_group.svg"]

    html = page.read_text()
    assert html.count("<svg") == len(files)  # every picture inline
    assert "<link" not in html and "<script" not in html and "src=" not in html  # self-contained
    for word in ("Attention sites", "joint", "n/a", "Block-level dataflow", "SSP: subsequences by rank"):
        assert word in html


def test_world_size_must_divide_the_subsequences():
    with pytest.raises(OSPConfigError, match="divides P\\*P = 4"):
        draw_tokens((2, 5, 6), 2, "token", world=3)


def test_subsequence_map_is_the_pattern_formula():
    p = 2
    for pattern, sid in (("token", lambda y, x: (y % p) * p + x % p),
                         ("group", lambda y, x: ((y // p) % p) * p + (x // p) % p)):
        cells = subsequence_map(5, 6, p, pattern)
        assert len(cells) == 8 and len(cells[0]) == 8  # padded to multiples of P*P
        assert all(cells[y][x] == sid(y, x) for y in range(8) for x in range(8))


@pytest.mark.parametrize("op,expected", [
    ("ring_all_to_all", "communication"), ("skiparse_relayout", "rearrangement"), ("hif8_qat_linear", "HiF8 linear"),
    ("skiparse_joint_attention", "sparse attention"), ("folded_attention", "sparse attention"),
    ("a_pass_added_tomorrow", "osp op"), ("dense attention", "dense attention"),
])
def test_marks_are_generic_over_op_names(op, expected):
    assert category(op)[0] == expected


class TwoBlocks(nn.Module):
    """An osp op called by the model itself, between two blocks: drawn as a node of its own."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        x = self.blocks[0](x)
        q = x.view(1, 1, 16, 8)
        x = skiparse_attention(q, q, q, 1, 4, 4, 2, "token").view(16, 8)
        return self.blocks[1](x)


def test_osp_ops_outside_blocks_are_nodes_between_them():
    graphs = []
    torch.compile(TwoBlocks(), backend=lambda gm, _: graphs.append(block_graph(gm)) or gm.forward)(torch.randn(16, 8))
    g = graphs[0]
    op = next(n for n, d in g.nodes(data=True) if d["kind"] == "op")
    assert g.nodes[op]["label"] == "skiparse_attention[token]"
    assert list(g.predecessors(op)) == ["blocks.0"] and list(g.successors(op)) == ["blocks.1"]
    assert "skiparse_attention[token]" in _texts(draw_dataflow(g, "t"))
