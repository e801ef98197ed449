"""Lowering per target: which kernel every attention / osp op node gets, that lowering never changes
what the model computes (outputs and gradients), and that the kernels stay opaque, traceable ops.

The NPU kernel runs here through an EMULATION of torch_npu (tests/npu_standin), never the real
library: these tests check our side of the documented contract, not Ascend hardware.
"""
import os
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from osp_compile import OSPConfig, convert
from osp_compile.lowering import KERNEL_KEY
from osp_compile.lowering.composites import on_attention_kernel
from osp_compile.lowering.npu import npu_refusal, npu_sdpa
from osp_compile.oracle import rel_err
from osp_compile.report import OSPReport
from osp_compile.pipeline import PassContext, SiteRegistry, run_passes
from passes.lowering import lowerable_op, resolve_target
from reference_model import PRESETS, build_model, make_inputs

STANDIN = os.path.join(os.path.dirname(__file__), "npu_standin")
LAYOUT = ["token", "full"]  # a Skiparse site and a dense one; grid (3, 6, 10) needs padding


@pytest.fixture
def npu_emulation(monkeypatch):
    """The torch_npu EMULATION importable for one test only."""
    monkeypatch.syspath_prepend(STANDIN)
    sys.modules.pop("torch_npu", None)
    import torch_npu

    assert torch_npu.EMULATION
    torch_npu.CALLS.clear()
    yield torch_npu
    sys.modules.pop("torch_npu", None)


def tiny(layers=2, dtype=torch.float32):
    model = build_model("tiny", num_layers=layers, seed=11, dtype=dtype)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(3, 12, 20), seed=12, dtype=dtype)
    return model, args, kwargs


def lowering_rows(converted):
    (graph,) = converted.osp_report.graphs
    return next(p for p in graph.passes if p.name == "lowering")


def _graph_with_input(device):
    g = fx.Graph()
    x = g.placeholder("x")
    with FakeTensorMode():
        x.meta["example_value"] = torch.empty(2, device=device)
    g.output(x)
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("meta", "cpu"), ("cuda", "cuda")])
def test_auto_target_is_the_device_of_the_inputs(device, expected):
    assert resolve_target(_graph_with_input(device), "auto")[0] == expected
    assert resolve_target(_graph_with_input(device), "npu") == ("npu", "OSPConfig.target")


def _grads(model, x, out, weight):
    model.zero_grad()
    x.grad = None
    (out * weight).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


def test_report_and_npu_lowering_keeps_outputs_and_gradients(npu_emulation):
    model, args, kwargs = tiny()
    cpu = convert(model, args, kwargs, OSPConfig(layout=LAYOUT))
    npu = convert(model, args, kwargs, OSPConfig(layout=LAYOUT, target="npu"))
    for converted in (cpu, npu):  # the report lists every attention / osp op node with its kernel
        gm = converted.osp_report.graphs[0].module
        ops = {n.name for n in gm.graph.nodes if lowerable_op(n) is not None or KERNEL_KEY in n.meta}
        assert {r["node"] for r in lowering_rows(converted).rows} == ops
    report = lowering_rows(cpu)
    assert report.summary.startswith("target cpu (auto: inputs on cpu)")
    assert all(r["kernel"] in ("PyTorch SDPA", "composite (portable torch)") for r in report.rows)
    rows = lowering_rows(npu).rows
    attention = [r for r in rows if "attention" in r["op"]]
    assert attention and all("npu_fusion_attention" in r["kernel"] for r in attention)

    x = args[0].clone().requires_grad_(True)
    out_cpu = cpu(x, **kwargs)
    weight = torch.randn_like(out_cpu)
    g_cpu = _grads(model, x, out_cpu, weight)
    npu_emulation.CALLS.clear()
    out_npu = npu(x, **kwargs)
    g_npu = _grads(model, x, out_npu, weight)
    assert rel_err(out_npu, out_cpu) <= 1e-5
    assert all(rel_err(a, b) <= 1e-4 for a, b in zip(g_npu, g_cpu))

    calls = npu_emulation.CALLS  # forward only: the backward is SDPA's
    assert len(calls) >= len(attention)  # a composite may split its attention into several calls
    assert {c["input_layout"] for c in calls} == {"BSND"} and {c["head_num"] for c in calls} == {4}
    assert {c["scale"] for c in calls} == {16 ** -0.5}  # SDPA's default, passed explicitly (the NPU's is 1.0)


def test_skiparse_composite_on_npu_kernel_equals_the_op(npu_emulation):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3 * 5 * 7, 8) for _ in range(3))  # (5, 7) pads to (8, 8): unequal padding
    for pattern in ("token", "group"):
        ref = torch.ops.osp.skiparse_attention(q, k, v, 3, 5, 7, 2, pattern)
        out = on_attention_kernel("skiparse_attention", npu_sdpa)(q, k, v, 3, 5, 7, 2, pattern)
        assert rel_err(out, ref) <= 1e-6
    masks = [c["atten_mask"] for c in npu_emulation.CALLS]
    assert len(masks) == 2 and all(m.dtype == torch.bool and m.shape == (8, 1, 48, 48) for m in masks)  # B1SS
    assert all(m.any() and not m.all(-1).any() for m in masks)  # padded keys masked out (True), never a row


def test_joint_attention_composite_on_npu_kernel_equals_the_op(npu_emulation):
    import osp_compile.joint_attention  # noqa: F401  (defines osp::skiparse_joint_attention)

    torch.manual_seed(0)
    text, video = 6, 3 * 5 * 7
    q, k, v = (torch.randn(2, 4, text + video, 8) for _ in range(3))
    key_mask = torch.ones(2, 1, 1, text + video, dtype=torch.bool)
    key_mask[1, ..., :2] = False  # text padding of the second sample
    args = (key_mask, 3, 5, 7, 2, "group", text)
    ref = torch.ops.osp.skiparse_joint_attention(q, k, v, *args)
    assert rel_err(on_attention_kernel("skiparse_joint_attention", npu_sdpa)(q, k, v, *args), ref) <= 1e-6
    assert npu_emulation.CALLS


def test_npu_kernel_grouped_query_attention(npu_emulation):
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    ref = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    assert rel_err(npu_sdpa(q, k, k, enable_gqa=True), ref) <= 1e-6
    assert npu_emulation.CALLS[0]["head_num"] == 4 and npu_emulation.CALLS[0]["key"].shape[2] == 2


def test_npu_kernel_falls_back_where_it_cannot_run(npu_emulation):
    q = torch.randn(1, 2, 6, 8)
    additive = torch.zeros(1, 1, 6, 6)
    assert npu_refusal(q, q, q, additive, 0.0, False) == "an additive (float) mask"
    assert npu_refusal(q, q, q, None, 0.0, True) == "causal attention"
    assert npu_refusal(q, q, q, None, 0.1, False).startswith("dropout")
    assert npu_refusal(q.double(), q, q, None, 0.0, False) is not None
    # shapes SDPA takes and the BSND kernel does not: 3-d, batch-broadcast keys, a value head dim of its own
    q3, k1, v16 = torch.randn(2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 16)
    assert npu_refusal(q3, q3, q3, None, 0.0, False).startswith("q/k/v of 3/3/3 dims")
    q2 = torch.randn(2, 2, 6, 8)
    assert npu_refusal(q2, k1, k1, None, 0.0, False).startswith("batch sizes 2/1/1 differ")
    assert npu_refusal(q, q, v16, None, 0.0, False).startswith("key (1, 2, 6, 8) / value (1, 2, 6, 16)")
    for args, kwargs in (((q, q, q), {"attn_mask": additive}), ((q, q, q), {"is_causal": True}), ((q3, q3, q3), {}),
                         ((q2, k1, k1), {}), ((q, q, v16), {})):
        assert torch.equal(npu_sdpa(*args, **kwargs), F.scaled_dot_product_attention(*args, **kwargs))
    assert not npu_emulation.CALLS


def _block(x, w, shift, scale):
    """Norm, modulation, projection, attention, gate: what Inductor should fuse around the kernel."""
    h = F.layer_norm(x, (x.shape[-1],)) * (1 + scale) + shift
    q = (h @ w).view(2, 8, 2, 16).transpose(1, 2)
    keep = torch.arange(8) < 6  # a key-padding mask, as Skiparse builds one
    out = npu_sdpa(q, q, q, attn_mask=keep.view(1, 1, 1, 8))
    return x + out.transpose(1, 2).reshape(2, 8, 32).sigmoid()


def _block_inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 8, 32), (32, 32), (32,), (32,))]


def test_opaque_kernel_no_graph_break_and_aot_gradients(npu_emulation):
    explained = torch._dynamo.explain(_block)(*_block_inputs())
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    inputs = _block_inputs()
    _block(*inputs).square().sum().backward()
    expected = [t.grad for t in inputs]
    inputs = _block_inputs()
    torch.compile(_block, backend="aot_eager", fullgraph=True)(*inputs).square().sum().backward()
    assert all(rel_err(t.grad, e) <= 1e-5 for t, e in zip(inputs, expected))


def test_inductor_fuses_around_the_opaque_kernel(npu_emulation):
    from torch._inductor.utils import run_and_get_code

    inputs = [t.detach() for t in _block_inputs()]
    out, code = run_and_get_code(torch.compile(_block, fullgraph=True), *inputs)
    code = "\n".join(code)
    assert "torch.ops.osp_npu.fusion_attention.default" in code  # the kernel: one opaque call
    assert code.count("cpp_fused") >= 2  # norm + modulation, and the gate + residual: C++ kernels
    assert rel_err(out, _block(*inputs)) <= 1e-5


def test_whole_model_under_aot_is_one_graph_with_opaque_kernels(npu_emulation):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model, args, kwargs = tiny(layers=1)
    config = OSPConfig(layout="all_sparse", target="npu")
    forward_graphs = []

    def record(graph, _):
        forward_graphs.append(graph)
        return make_boxed_func(graph.forward)

    def backend(gm, example_inputs):  # the osp pipeline, then AOTAutograd (Inductor's front end)
        gm = run_passes(gm, PassContext(config, SiteRegistry(config), OSPReport()))
        return aot_autograd(fw_compiler=record)(gm, example_inputs)

    torch._dynamo.utils.counters.clear()
    x = args[0].clone().requires_grad_(True)
    out = torch.compile(model, backend=backend)(x, **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    (forward,) = forward_graphs
    opaque = [n for n in forward.graph.nodes if "osp_npu" in str(n.target)]
    assert len(opaque) >= 2  # the Skiparse site and the cross-attention, on the opaque kernel
    ref_x = args[0].clone().requires_grad_(True)
    ref = convert(model, args, kwargs, OSPConfig(layout="all_sparse", target="cpu"))(ref_x, **kwargs)
    assert rel_err(out, ref) <= 1e-5
    out.sum().backward()
    ref.sum().backward()
    assert rel_err(x.grad, ref_x.grad) <= 1e-4
