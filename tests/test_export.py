"""`osp-compile export`: standalone modules per target that compute what convert() computes.

cpu: runs here and matches convert() in float32. npu: byte-compiles, every emitted torch_npu call
binds to the documented signature, and it runs here against the torch_npu EMULATION
(tests/npu_standin), matching convert(); it has never run on Ascend hardware. cuda: see
test_lowering_flash.py and scripts/gpu_export_check.py (a real GPU).
"""
import ast
import importlib.util
import inspect
import py_compile

import pytest
import torch
import torch.nn as nn

from osp_compile import OSPConfig, convert
from osp_compile.cli import main
from osp_compile.export import ExportError, export_model
from osp_compile.models import load as load_model
from osp_compile.oracle import rel_err
from test_lowering import LAYOUT, npu_emulation, tiny  # noqa: F401  (npu_emulation: a fixture)

ALLOWED_IMPORTS = {"__future__", "os", "torch", "numpy", "typing", "math", "functools", "safetensors"}


def import_export(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported_roots(text: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    return roots


def test_cli_cpu_export_matches_convert(tmp_path, capsys):
    out = tmp_path / "tiny_cpu"
    assert main(["export", "--model", "tiny", "--layers", "2", "--layout", ",".join(LAYOUT), "--target", "cpu",
                 "--out", str(out)]) == 0
    assert "PyTorch SDPA" in capsys.readouterr().out  # the kernel table
    text = (out / "model.py").read_text()
    assert imported_roots(text) <= ALLOWED_IMPORTS and "osp_compile" not in text
    model, args, kwargs = load_model("tiny", layers=2)
    with torch.no_grad():
        expected = convert(model, args, kwargs, OSPConfig(layout=LAYOUT))(*args, **kwargs)
        net = import_export(str(out / "model.py"), "osp_export_cpu").load(str(out), "cpu")
        got = net(*args, **kwargs)
    assert rel_err(got, expected) <= 1e-6
    wider = torch.cat([args[0], args[0]])  # batch 2: the export is specialised to batch 1
    with pytest.raises(ValueError, match=r"input x: this export is specialised to shape \(1, 4, 3, 12, 20\) "
                                         r"torch.float32, got \(2, 4, 3, 12, 20\) torch.float32"):
        net(wider, *args[1:], **kwargs)
    with pytest.raises(ValueError, match=r"got \(1, 4, 3, 12, 20\) torch.bfloat16"):
        net(args[0].bfloat16(), *args[1:], **kwargs)


def test_npu_export_compiles_keeps_the_documented_signature_and_matches(npu_emulation, tmp_path):
    model, args, kwargs = tiny()
    result = export_model(model, args, kwargs, OSPConfig(layout=LAYOUT), "npu", str(tmp_path))
    py_compile.compile(result.module_path, doraise=True)
    text = open(result.module_path).read()
    assert imported_roots(text) <= ALLOWED_IMPORTS | {"torch_npu"} and "osp_compile" not in text

    calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch_npu"]
    assert {c.func.attr for c in calls} == {"npu_fusion_attention"}
    for call in calls:  # binds to the documented parameter list (the emulation's), layout BSND
        documented = inspect.signature(getattr(npu_emulation, call.func.attr))
        bound = documented.bind(*call.args, **{k.arg: k.value for k in call.keywords})
        assert ast.literal_eval(bound.arguments["input_layout"]) == "BSND"

    net = import_export(result.module_path, "osp_export_npu").load(str(tmp_path), "cpu")
    with torch.no_grad():
        got = net(*args, **kwargs)
        assert npu_emulation.CALLS and {c["input_layout"] for c in npu_emulation.CALLS} == {"BSND"}
        expected = convert(model, args, kwargs, OSPConfig(layout=LAYOUT, target="cpu"))(*args, **kwargs)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("name", ["diffusers:CogVideoX", "diffusers:HunyuanVideo"])
def test_npu_export_of_diffusers_joint_attention_models(name, npu_emulation, tmp_path):
    """Joint text+video attention, a text key mask, tuple inputs, forward behind a *args wrapper."""
    pytest.importorskip("diffusers")
    model, args, kwargs = load_model(name)
    result = export_model(model, args, kwargs, OSPConfig(layout="all_sparse"), "npu", str(tmp_path))
    net = import_export(result.module_path, f"osp_export_{name[10:]}").load(str(tmp_path), "cpu")
    with torch.no_grad():
        got = net(*args, **kwargs)[0]  # called exactly like the model
        expected = convert(model, args, kwargs, OSPConfig(layout="all_sparse"))(*args, **kwargs)[0]
    assert npu_emulation.CALLS and rel_err(got, expected) <= 1e-5


def test_cuda_export_without_flash_attn_is_plain_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)  # not installed: PyTorch SDPA
    model, args, kwargs = tiny()
    result = export_model(model, args, kwargs, OSPConfig(layout="all_sparse"), "cuda", str(tmp_path))
    assert imported_roots(open(result.module_path).read()) <= ALLOWED_IMPORTS
    with torch.no_grad():
        got = import_export(result.module_path, "osp_export_cuda").load(str(tmp_path), "cpu")(*args, **kwargs)
        expected = convert(model, args, kwargs, OSPConfig(layout="all_sparse"))(*args, **kwargs)
    assert rel_err(got, expected) <= 1e-6


class Broken(nn.Module):
    """A DiT-like model with a graph break between its two attention blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv3d(3, 16, (1, 2, 2), (1, 2, 2))
        self.qkv = nn.Linear(16, 48)

    def attend(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)

    def forward(self, video):
        x = self.attend(self.embed(video).flatten(2).transpose(1, 2))
        torch._dynamo.graph_break()
        return self.attend(x)


def test_export_names_the_graph_break(tmp_path):
    with pytest.raises(ExportError, match=r"single-graph models only.*graph break.*test_export\.py:\d+"):
        export_model(Broken(), (torch.randn(1, 3, 2, 8, 8),), {}, OSPConfig(layout="dense"), "cpu", str(tmp_path))


def test_npu_export_needs_no_torch_npu(tmp_path, monkeypatch, capsys):
    """The export captures on meta (kernels' fake implementations): it writes the NPU module on a
    machine that has no torch_npu, as the README's command promises."""
    import sys

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert main(["export", "--model", "tiny", "--layers", "2", "--target", "npu", "--out", str(tmp_path)]) == 0
    assert "npu_fusion_attention" in (tmp_path / "model.py").read_text()


def test_a_triton_kernel_is_not_exported_and_the_table_says_so(tmp_path, monkeypatch):
    """The export writes torch and the target's library: where lowering chose a Triton kernel (here
    the q/k RMSNorm + RoPE, as on a GPU machine), the module gets the portable op and says so."""
    from osp_compile.hif8 import triton_kernels

    monkeypatch.setattr(triton_kernels, "cuda_unavailable_reason", lambda: None)
    model, args, kwargs = tiny()
    result = export_model(model, args, kwargs, OSPConfig(layout="all_sparse"), "cuda", str(tmp_path))
    text = open(result.module_path).read()
    assert "def rms_norm_rope(" in text and "triton" not in text
    rows = [r for r in result.kernels if r["op"] == "osp::rms_norm_rope"]
    assert rows and all(r["kernel"] == "composite (portable torch)" and "Triton RMSNorm + RoPE" in r["refused"]
                        and "not exported" in r["refused"] for r in rows)
    with torch.no_grad():
        got = import_export(result.module_path, "osp_export_cuda_rope").load(str(tmp_path), "cpu")(*args, **kwargs)
        expected = convert(model, args, kwargs, OSPConfig(layout="all_sparse"))(*args, **kwargs)
    assert rel_err(got, expected) <= 1e-6


def test_lora_export_is_refused_before_conversion(tmp_path):
    model, args, kwargs = tiny()
    with pytest.raises(ExportError, match="lora_rank=2: exporting LoRA adapters is not supported yet"):
        export_model(model, args, kwargs, OSPConfig(layout="all_sparse", lora_rank=2), "cpu", str(tmp_path))
