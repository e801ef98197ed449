"""The `osp` torch.compile backend: same outputs and gradients as convert(), Inductor and eager,
site numbering across graph breaks, attention spelled as a matmul chain."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from osp_compile.oracle import masked_oracle, rel_err
from osp_compile import OSPConfig, convert
from osp_compile.backend import report_for
from reference_model import PRESETS, build_model, make_inputs
from markers import needs_sm89


def _model_and_inputs(layers=4):
    model = build_model("tiny", num_layers=layers, seed=5)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(3, 12, 20), seed=6)
    return model, args, kwargs


def _grads(model, out, weight):
    model.zero_grad()
    (out * weight).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_backend_equals_convert(inner):
    model, args, kwargs = _model_and_inputs()
    cfg = OSPConfig(sparse_ratio=2, num_full_blocks=2)
    converted = convert(model, args, kwargs, cfg)
    options = {"sparse_ratio": 2, "num_full_blocks": 2, "inner": inner}
    compiled = torch.compile(model, backend="osp", options=options)  # by name: the pip entry point
    out_c = converted(*args, **kwargs)
    weight = torch.randn_like(out_c)
    g_c = _grads(model, out_c, weight)
    out_b = compiled(*args, **kwargs)
    g_b = _grads(model, out_b, weight)
    tol = 1e-5 if inner == "eager" else 1e-4
    assert rel_err(out_b, out_c) <= tol
    assert g_b.keys() == g_c.keys()
    for name in g_c:
        assert rel_err(g_b[name], g_c[name]) <= 10 * tol, name
    assert report_for(options).layout == converted.osp_report.layout == ["full", "token", "group", "full"]


class BrokenDiT(nn.Module):
    """A DiT with a graph break between blocks and attention written as matmul -> softmax -> matmul."""

    def __init__(self, dim=16, heads=2, layers=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv3d(3, dim, (1, 2, 2), (1, 2, 2))
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def attention(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v

    def forward(self, video):
        x = self.embed(video).flatten(2).transpose(1, 2)
        b, s, c = x.shape
        half = len(self.qkv) // 2
        x = self.blocks(x, range(half))
        torch._dynamo.graph_break()  # e.g. a print or a data-dependent branch between the halves
        return self.blocks(x, range(half, len(self.qkv)))

    def blocks(self, x, indices):
        b, s, c = x.shape
        for i in indices:
            q, k, v = self.qkv[i](x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            x = x + self.proj[i](self.attention(q, k, v).transpose(1, 2).reshape(b, s, c))
        return x


def test_graph_breaks_and_matmul_chain():
    torch.manual_seed(0)
    model = BrokenDiT()
    video = torch.randn(1, 3, 2, 12, 12)  # grid (2, 6, 6)
    cfg = OSPConfig(sparse_ratio=2, num_full_blocks=2)
    converted = convert(model, (video,), config=cfg)
    report = converted.osp_report
    assert report.layout == ["full", "token", "group", "full"]
    assert len({g.code for g in report.graphs}) >= 2
    assert any("matmul-softmax-matmul" in str(p.rows) for g in report.graphs for p in g.passes)

    # numerics against the masked oracle: the model's chain is rewritten to SDPA, so patch its attention
    def oracle_attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    model.attention = oracle_attention
    with torch.no_grad(), masked_oracle(report.layout, (2, 6, 6), 2):
        ref = model(video)
    del model.attention
    with torch.no_grad():
        out = converted(video)
    assert rel_err(out, ref) <= 1e-5

    # the backend numbers across the break too, given the total
    options = {"num_full_blocks": 2, "num_sites": 4, "inner": "eager"}
    torch.compile(model, backend="osp", options=options)(video)
    assert report_for(options).layout == ["full", "token", "group", "full"]


def test_backend_without_site_total_refuses_split_sites():
    model = BrokenDiT()
    options = {"num_full_blocks": 2, "inner": "eager"}
    with pytest.raises(Exception, match="graph breaks between attention sites"):
        torch.compile(model, backend="osp", options=options)(torch.randn(1, 3, 2, 12, 12))


def test_analysis_refuses_a_symbolic_graph_that_static_shapes_did_not_see():
    """Every pass after static_shapes works with int sizes: the analysis run alone on a graph
    captured with symbolic sizes stops with an error naming the node and the fix."""
    from osp_compile.errors import OSPAnalysisError
    from passes.analysis import analyse

    seen = {}

    def analysing(gm, example_inputs):
        with pytest.raises(OSPAnalysisError) as info:
            analyse(gm)
        seen["error"] = str(info.value)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x.view(x.shape[0], -1).softmax(-1), backend=analysing, dynamic=True)(torch.randn(2, 3, 4))
    assert "symbolic size" in seen["error"] and "static_shapes_pass" in seen["error"], seen


def test_report_of_a_compile_whose_graphs_dynamo_reused():
    """Dynamo tells backends apart by their options' contents: a second torch.compile of the model
    with equal options runs the first one's graphs, so its report is the first session's; options
    nothing was compiled with are refused."""
    from osp_compile.backend import osp_backend

    model, args, kwargs = _model_and_inputs(layers=2)
    torch._dynamo.reset()
    first, second = ({"num_full_blocks": 0, "inner": "eager"} for _ in range(2))
    with torch.no_grad():
        for options in (first, second):
            torch.compile(model, backend=osp_backend, options=options, dynamic=False)(*args, **kwargs)
    assert report_for(second) is report_for(first) and report_for(first).layout == ["token", "group"]
    with pytest.raises(KeyError, match="no osp backend session was compiled with these options"):
        report_for({"num_full_blocks": 1, "inner": "eager"})


@needs_sm89
@pytest.mark.parametrize("quant", [None, "hif8-infer"])
def test_cuda_graphs_record_the_osp_graph(quant):
    """``cudagraphs=True``: Inductor records the OSP graph (Skiparse sites, relayouts, the norm +
    RoPE kernel; with HiF8, nothing the step makes outlives it in the graph's pool: the E4M3
    weights are made at lowering and the quantization is a graph node) with no graph skipped,
    replays it, and the replay gives the outputs of the same graph run without CUDA graphs. With
    HiF8 a later ``load_hif8_state_dict`` reaches the recorded graph (its E4M3 buffers are
    written in place)."""
    from torch._dynamo.utils import counters

    from osp_compile.backend import osp_backend, state_for
    from osp_compile.hif8 import hif8_state_dict, inference, load_hif8_state_dict
    from test_hif8_infer import _lowered_hif8_kernels

    model = build_model("tiny", num_layers=2, seed=14).cuda().to(torch.bfloat16)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=(3, 12, 20), seed=15, dtype=torch.bfloat16, device="cuda")
    outs = {}
    for graphs in (False, True):
        options = {"num_full_blocks": 0, "quant": quant, "fp8_fast_accum": quant is not None, "cudagraphs": graphs}
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=osp_backend, options=options, dynamic=False)
        with torch.no_grad():
            for _ in range(3):  # warm-up, record, replay
                out = compiled(*args, **kwargs).clone()  # a replay writes over its outputs
        outs[graphs] = out
        if quant is not None:
            kernels = _lowered_hif8_kernels(report_for(options))
            assert kernels and all("shared HiF8 quantization" in k for k in kernels), kernels
        if graphs:
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        if graphs and quant is not None:
            store = inference.weight_store(state_for(options))
            state = hif8_state_dict(store)
            state[store.fqns[0]] = torch.zeros_like(state[store.fqns[0]])
            load_hif8_state_dict(store, state)
            with torch.no_grad():
                assert not torch.equal(compiled(*args, **kwargs), out)
    assert rel_err(outs[True].float(), outs[False].float()) <= 1e-2
