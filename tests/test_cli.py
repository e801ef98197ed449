"""The command line: readable help, inspect tables, the README's demo."""
import json
import subprocess
import sys

import pytest

from osp_compile.cli import build_parser, main


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("demo", "inspect"):
        assert verb in out


def test_inspect_tiny_prints_sites_and_code(capsys, tmp_path):
    path = tmp_path / "report.json"
    assert main(["inspect", "--model", "tiny", "--layers", "4", "--num-full-blocks", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "video_self" in out and "token" in out and "group" in out
    assert "torch.ops.osp." in out  # the rewritten graph's code (which osp ops depends on the passes run)
    data = json.loads(path.read_text())
    assert [s["layout"] for s in data["sites"] if s["kind"] == "video_self"] == ["full", "token", "group", "full"]


def test_inspect_explicit_layout_and_ratio(capsys):
    assert main(["inspect", "--model", "tiny", "--layers", "2", "--latent", "2,14,14", "--sparse-ratio", "3",
                 "--layout", "group,token", "--no-code"]) == 0
    out = capsys.readouterr().out
    assert "P=3" in out


def test_demo_runs_from_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "osp_compile.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "-> OK" in proc.stdout
