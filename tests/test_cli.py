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
    path = tmp_path / "new" / "report.json"  # its folder is made
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


def test_what_cannot_be_done_is_one_line_and_status_2(capsys, monkeypatch):
    assert main(["inspect", "--resolution", "1080p"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("osp-compile inspect: error: unknown resolution '1080p'") and "Traceback" not in err
    assert main(["demo", "--sparse-ratio", "0"]) == 2
    assert "sparse_ratio must be an integer >= 1" in capsys.readouterr().err
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--preset", "tiny"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    monkeypatch.setenv("OSP_COMPILE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="unknown resolution"):
        main(["inspect", "--resolution", "1080p"])


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(None: 8, at most half the sites) (default: 4)" in out and "(default: 8" not in out
