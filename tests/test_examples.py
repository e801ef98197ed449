"""examples/convert_your_dit.py runs end to end: converts a DiT defined in the example, prints the
report, writes the page and trains one step on the converted module."""
import importlib.util
import pathlib

import torch

from osp_compile.oracle import masked_oracle, rel_err

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "convert_your_dit.py"


def _load():
    spec = importlib.util.spec_from_file_location("convert_your_dit", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_converts_inspects_and_trains(tmp_path, capsys):
    example = _load()
    page = tmp_path / "my_dit.html"
    result = example.main(["--html", str(page)])
    out = capsys.readouterr().out
    report = result["report"]
    assert report.layout == ["full", "token", "group", "full"]
    assert {s.kind for s in report.video_sites} == {"joint"}  # caption + video in one attention
    assert "4 attention chain(s) rewritten to SDPA" in out  # the matmul-softmax chains
    assert page.exists() and "<svg" in page.read_text()
    assert result["loss_after"] != result["loss_before"]  # the step moved the shared weights


def test_example_model_matches_the_oracle():
    """The example's own attention (a matmul chain) equals SDPA, so the oracle can run it densely."""
    example = _load()
    model, (video, caption), _ = example.build()
    from osp_compile import OSPConfig, convert

    converted = convert(model, (video, caption), config=OSPConfig(layout="all_sparse"))

    def sdpa_forward(self, x):  # the same Mixer, its chain spelled as SDPA for the patched oracle
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))

    original = example.Mixer.forward
    example.Mixer.forward = sdpa_forward
    try:
        with torch.no_grad(), masked_oracle(converted.osp_report.layout, (2, 8, 8), 2, text_len=3, video_offset=3):
            ref = model(video, caption)
    finally:
        example.Mixer.forward = original
    with torch.no_grad():
        assert rel_err(converted(video, caption), ref) <= 1e-5


def test_example_model_is_a_cli_model(monkeypatch, capsys):
    from osp_compile.cli import main

    monkeypatch.chdir(EXAMPLE.parents[1])  # module:callable resolves from the current directory
    assert main(["inspect", "--model", "examples.convert_your_dit:build", "--num-full-blocks", "2", "--no-code"]) == 0
    out = capsys.readouterr().out
    assert "joint" in out and "2 made sparse" in out
