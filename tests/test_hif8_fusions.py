"""The HiF8 inference fusions of ``OSPConfig(quant="hif8-infer", fuse_linears=True)``.

GELU folded into a HiF8 linear's activation quantization (``osp::gelu_hif8_linear``): the pass,
the op's composite against the unfused conversion (outputs and gradients), the Triton passes with
a GELU prologue against a float64 GELU (interpreted on CPU, compiled on CUDA), the
sequence-parallel scale, and the kernels lowering picks per target.

The activation's absmax as graph ops (``passes/hif8_absmax.py``): one max per activation, the
same outputs, and every kernel taking the given max (``amax``) as the whole tensor's.

A packed sparse site's HiF8 output projection applied per length class with one max over the
classes (``passes/attention_projection.py``): the same bits as the projection of the concatenation."""
import pytest
import torch
import torch.nn.functional as F

from osp_compile import OSPConfig, convert
from osp_compile.hif8 import fp8, inference, triton_kernels
from osp_compile.lowering import hif8_kernels
from osp_compile.lowering.registry import kernels_for
from osp_compile.oracle import rel_err
from reference_model import PRESETS, build_model, make_inputs
from osp_compile.hif8 import triton_gemm
from test_hif8_infer import _linear_case, install_fake_torch_npu
from test_hif8_ssp import PEER_AMAX, _with_peer, peer  # noqa: F401  (peer: the emulated SP group fixture)
from test_linear_fusions import LATENT as TWO_CLASS_LATENT, _rows
from markers import as_if_triton_on_cuda, needs_cuda, needs_interp


LATENT = (2, 8, 16)


def output_and_input_grad(converted, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A converted model's output and the gradient of its first input (which requires grad)."""
    out = converted(*args, **kwargs)
    out.square().mean().backward()
    return out.detach(), args[0].grad


def _convert(fuse: bool):
    model = build_model("tiny", num_layers=2, seed=3)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=LATENT, seed=4)
    x = args[0].clone().requires_grad_(True)
    converted = convert(model, (x, *args[1:]), kwargs, OSPConfig(num_full_blocks=0, quant="hif8-infer", fuse_linears=fuse))
    return model, converted, (x, *args[1:]), kwargs


def test_pass_fuses_each_ffn_and_equals_the_unfused_conversion_with_gradients():
    """CPU runs the op's composite (F.gelu, then the HiF8 reference): the same computation as the
    unfused graph, so outputs and input gradients (straight-through, then GELU's derivative) match."""
    outs = {}
    for fuse in (False, True):
        model, converted, args, kwargs = _convert(fuse)
        rows = _rows(converted.osp_report, "gelu_hif8_linear")  # the planned graph's (a call may capture again)
        if fuse:
            assert [r["weight"] for r in rows] == [f"blocks.{i}.ffn.2.weight" for i in range(2)]
            assert {r["approximate"] for r in rows} == {"tanh"}
            lowered = [r for r in _rows(converted.osp_report, "lowering") if r["op"] == "osp::gelu_hif8_linear"]
            assert [r["kernel"] for r in lowered] == ["GELU + HiF8 reference"] * 2
        else:
            assert rows == []
        outs[fuse] = output_and_input_grad(converted, args, kwargs)
    assert rel_err(outs[True][0], outs[False][0]) <= 1e-6
    assert rel_err(outs[True][1], outs[False][1]) <= 1e-6 and outs[True][1].abs().sum() > 0


def test_gelu_read_elsewhere_is_left_alone():
    """A GELU output that another node also reads must be written: no fusion."""
    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            h = F.gelu(self.up(x), approximate="tanh")
            return self.down(h) + h[..., :32]

    from osp_compile.backend import osp_backend, report_for

    options = {"quant": "hif8-infer", "quant_exclude": [], "layout": "dense"}
    torch._dynamo.reset()
    torch.compile(FFN(), backend=osp_backend, options=options)(torch.randn(2, 5, 32))
    report = report_for(options)
    assert len(_rows(report, "hif8_linear")) == 2 and _rows(report, "gelu_hif8_linear") == []


class _DropoutFFN(torch.nn.Module):
    """diffusers' FeedForward: up, GELU, dropout, down (each a real nn.Dropout, as diffusers builds them)."""

    def __init__(self, p: float):
        super().__init__()
        self.up, self.drop, self.down = torch.nn.Linear(32, 64), torch.nn.Dropout(p), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down(self.drop(F.gelu(self.up(x), approximate="tanh")))


@pytest.mark.parametrize("p, training, removed", [(0.1, False, True), (0.0, True, True), (0.1, True, False)])
def test_a_dropout_that_drops_nothing_goes_and_the_gelu_then_fuses(p, training, removed):
    """A dropout between the GELU and the HiF8 linear (diffusers' FeedForward) hid the pair from
    gelu_hif8_linear. At inference, or at p = 0, the identity_dropout pass removes it and the pair
    fuses, with the unfused module's output (CPU: the op's composite); a dropout that drops stays."""
    from osp_compile.backend import osp_backend, report_for

    torch.manual_seed(0)
    module, x = _DropoutFFN(p).train(training), torch.randn(2, 5, 32)
    options = {"quant": "hif8-infer", "quant_exclude": [], "layout": "dense"}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=osp_backend, options=options)(x)
    report = report_for(options)
    dropped = _rows(report, "identity_dropout")
    assert len(dropped) == removed and len(_rows(report, "gelu_hif8_linear")) == removed
    if removed:
        plain = {**options, "fuse_linears": False}
        torch._dynamo.reset()
        with torch.no_grad():
            want = torch.compile(module, backend=osp_backend, options=plain)(x)
            got = torch.compile(module, backend=osp_backend, options=options)(x)
        assert rel_err(got, want) <= 1e-6


def test_diffusers_cogvideox_ffn_gelu_fuses_with_its_hif8_linear():
    """The model where the dropout was found: every block's GELU now reaches its HiF8 linear."""
    pytest.importorskip("diffusers")
    from osp_compile.models import load_example

    ex = load_example("diffusers:CogVideoX", layers=2)
    converted = convert(ex.model, ex.args, ex.kwargs, OSPConfig(num_full_blocks=0, quant="hif8-infer"))
    assert [r["weight"] for r in _rows(converted.osp_report, "gelu_hif8_linear")] == [
        f"transformer_blocks.{i}.ff.net.2.weight" for i in range(2)]


def _gelu_case(dtype, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))).to(dtype)
    x[:4] = torch.tensor([0.0, -12.0, 12.0, -0.1]).to(dtype)
    return x


def _float64_gelu_quantized(x, approximate):
    """The reference: GELU in float64, rounded once to x's dtype, then the HiF8 activation quantization."""
    return fp8.quantize_act_e4m3_reference(F.gelu(x.double(), approximate=approximate).to(x.dtype), 15.0)


def _check_gelu_quantization(got, got_dq, want, want_dq):
    """Same scale bit for bit (the max element's GELU is exact); an element may differ where the
    float32 GELU rounded to the neighbouring value of x's dtype and the HiF8 rounding followed."""
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got_dq, want_dq)
    differ = got.float() != want.float()
    assert differ.float().mean() <= 2e-3
    assert ((got.float() - want.float()).abs()[differ] <= want.float().abs()[differ] / 4 + 2 ** -9).all()


@needs_interp
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_prologue_interpreted_against_float64_gelu(approximate, dtype):
    from osp_compile.hif8.triton_fp8 import absmax_triton, quantize_act_e4m3_triton

    x = _gelu_case(dtype)
    want, want_dq = _float64_gelu_quantized(x, approximate)
    _check_gelu_quantization(*quantize_act_e4m3_triton(x, 15.0, gelu=approximate), want, want_dq)
    assert torch.equal(absmax_triton(x, approximate), F.gelu(x.double(), approximate=approximate).to(dtype).abs().amax().float())
    with pytest.raises(ValueError, match="approximate"):
        quantize_act_e4m3_triton(x, 15.0, gelu="sigmoid")
    for gelu in (None, approximate):  # an empty shard's max is 0
        assert float(absmax_triton(x[:0], gelu)) == 0.0


def test_fp8_linear_with_gelu_equals_the_reference_composition():
    """CPU (emulated FP8 path): ``fp8_linear(x, gelu=a)`` is ``hif8_linear(F.gelu(x, a))``, and the
    reuse of a quantized activation never hands the plain quantization to a GELU call."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(40, 64, generator=g), torch.randn(32, 64, generator=g) / 8, torch.randn(32, generator=g)
    codes, scale = inference.quantize_weight(w)
    weight = fp8.transcode_weight(codes, scale)
    plain = fp8.fp8_linear(x, weight, b)
    fused = fp8.fp8_linear(x, weight, b, gelu="tanh")  # same x right after: must not reuse `plain`'s
    assert rel_err(fused, inference.hif8_linear_reference(F.gelu(x, approximate="tanh"), codes, b, scale)) <= 1e-6
    assert rel_err(plain, inference.hif8_linear_reference(x, codes, b, scale)) <= 1e-6


def test_gelu_prologue_scales_over_the_group(peer):
    """Under sequence parallelism the scale is the group's max of the GELU output (the all-reduce
    emulated: the other rank's shard has max |GELU| = PEER_AMAX)."""
    x = _gelu_case(torch.float32, n=64 * 8).reshape(64, 8)
    got, got_dq = fp8._activation_e4m3(x, False, peer, "tanh")
    want, want_dq = fp8.quantize_act_e4m3_reference(x, 15.0, torch.tensor(PEER_AMAX), gelu="tanh")
    assert torch.equal(got.float(), want.float()) and torch.equal(got_dq, want_dq)
    assert not torch.equal(got_dq, fp8._activation_e4m3(x, False, "", "tanh")[1])


def test_kernels_per_target():
    names = {t: [k.name for k in kernels_for("gelu_hif8_linear", t)] for t in ("cpu", "cuda", "npu")}
    assert names["cpu"] == ["GELU + HiF8 reference"]
    assert [("fast accumulation" in n) for n in names["cuda"]] == [True, False, True, False]
    assert [("shared" in n) for n in names["cuda"]] == [True, True, False, False]  # the expansions first
    assert "npu_quant_matmul" in names["npu"][0]


def test_npu_kernel_applies_the_gelu_then_the_documented_calls(monkeypatch):
    calls = install_fake_torch_npu(monkeypatch)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 5, 64, generator=g), torch.randn(32, 64, generator=g) / 8
    codes, scale = inference.quantize_weight(w)
    got = hif8_kernels.gelu_hif8_linear_npu(x, codes, None, scale, "", "tanh")
    assert calls == ["npu_dtype_cast", "npu_quant_matmul"] and got.shape == (6, 5, 32)
    want = inference.hif8_linear_reference(F.gelu(x, approximate="tanh"), codes, None, scale)
    assert rel_err(got, want) <= 1e-6


@needs_cuda
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_prologue_on_cuda_against_float64_gelu(approximate):
    from osp_compile.hif8.triton_fp8 import quantize_act_e4m3_triton

    x = _gelu_case(torch.bfloat16, n=1 << 20, seed=5)
    want, want_dq = _float64_gelu_quantized(x, approximate)
    got, got_dq = quantize_act_e4m3_triton(x.cuda(), 15.0, gelu=approximate)
    _check_gelu_quantization(got.cpu(), got_dq.cpu(), want, want_dq)


@needs_cuda
def test_cuda_kernel_and_its_backward_against_the_composite():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(300, 512, generator=g) * 2).to(torch.bfloat16)
    w, b = torch.randn(256, 512, generator=g) / 16, torch.randn(256, generator=g).to(torch.bfloat16)
    codes, scale = inference.quantize_weight(w)
    xc = x.cuda().requires_grad_(True)
    got = hif8_kernels.gelu_hif8_linear_cuda(xc, codes.cuda(), b.cuda(), scale.cuda(), "", "tanh")
    xr = x.float().requires_grad_(True)
    want = inference.gelu_hif8_linear(xr, codes, b.float(), scale, "", "tanh")
    assert rel_err(got.detach().float().cpu(), want.detach()) <= 2e-2
    got.float().sum().backward()
    want.sum().backward()
    assert rel_err(xc.grad.float().cpu(), xr.grad) <= 2e-2


# ------------------------------------------------------------------- the absmax in the graph

def test_absmax_pass_one_max_per_activation_and_the_same_outputs():
    """q, k and v share their input's max; every HiF8 linear gets one, except the reader of an
    attention's output (cross-attention here: the sparse self-attention sites write theirs in a
    concatenation); outputs and input gradients are those of the unfused conversion bit for bit
    (the same max, computed elsewhere)."""
    outs = {}
    for fuse in (False, True):
        model, converted, args, kwargs = _convert(fuse)
        rows = _rows(converted.osp_report, "hif8_absmax")
        if fuse:
            readers = [r["readers"].split(", ") for r in rows]
            assert [len(r) for r in readers[:3]] == [3, 1, 1]  # self-attention q/k/v, its output, cross q
            left = [r for r in rows if r["max"] != "in the graph"]
            assert [r["max"].startswith("the op's own: written by attention") for r in left] == [True] * 2  # cross o
            hif8 = [n for n in converted.osp_report.graphs[0].module.graph.nodes
                    if n.target is torch.ops.osp.hif8_linear.default]
            assert len(hif8) == sum(map(len, readers))
            assert sum(n.kwargs.get("amax") is None for n in hif8) == 2
        else:
            assert rows == []
        outs[fuse] = output_and_input_grad(converted, args, kwargs)
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])


def _kernels_with_amax(monkeypatch):
    install_fake_torch_npu(monkeypatch)
    kernels = {"reference": torch.ops.osp.hif8_linear.default, "npu": hif8_kernels.hif8_linear_npu,
               "fp8 (emulated here)": lambda x, c, b, s, g="", amax=None: fp8.fp8_linear(
                   x, fp8.transcode_weight(c, s), b, reuse_activation=False, group=g, amax=amax)}
    if triton_kernels.triton_available("cpu"):
        kernels["triton decode gemm"] = triton_gemm.hif8_linear_triton
    return kernels


def test_every_kernel_takes_the_given_amax_as_the_whole_tensors(peer, monkeypatch):
    """With ``amax`` given, x's rows are quantized as within a tensor whose max is that (x followed
    by rows reaching it); alone and under a group the given max is this rank's, all-reduced."""
    x, _, b, codes, scale = _linear_case(seed=23)
    own = x.abs().amax()
    for name, linear in _kernels_with_amax(monkeypatch).items():
        want = linear(_with_peer(x), codes, b, scale, "")[: len(x)]
        assert rel_err(linear(x, codes, b, scale, "", torch.tensor(PEER_AMAX)), want) <= 1e-6, name
        assert rel_err(linear(x, codes, b, scale, ""), want) > 1e-3, name
        assert rel_err(linear(x, codes, b, scale, peer, own), want) <= 1e-6, name


@needs_interp
def test_linears_reading_one_activation_share_one_quantization_node(monkeypatch):
    """The CUDA FP8 path, run on this CPU (``torch._scaled_mm`` has a CPU kernel here). For
    inference, lowering writes each HiF8 linear as a quantization node and a GEMM node, and the
    linears that read one tensor share the quantization (q, k and v; the text's k and v of every
    block): a step quantizes each activation once, with no run-time cache. The outputs are those
    of the one-op-per-linear kernel that graphs under autograd keep (its run-time reuse hits
    within a block only, so it quantizes the text once per block)."""
    as_if_triton_on_cuda(monkeypatch)
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    calls = []
    real = fp8.quantize_act_e4m3
    monkeypatch.setattr(fp8, "quantize_act_e4m3", lambda x, *a: calls.append(x.shape) or real(x, *a))
    model = build_model("tiny", num_layers=2, seed=3)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=LATENT, seed=4)
    config = OSPConfig(num_full_blocks=0, quant="hif8-infer", target="cuda")
    outs, counts = {}, {}
    for grad in (False, True):  # convert captures without grad; called with grad, the model is captured again
        converted = convert(model, args, kwargs, config)
        calls.clear()
        with torch.set_grad_enabled(grad):
            outs[grad] = converted(*args, **kwargs)[0].detach()
        counts[grad] = len(calls)
        lowering = next(p for p in converted.osp_report.graphs[-1].passes if p.name == "lowering")
        kernels = {r["kernel"] for r in lowering.rows if "hif8" in r["op"]}
        assert all(("shared HiF8 quantization" in k) != grad and "FP8 tensor cores" in k for k in kernels), kernels
    first = {p.name: p.rows for p in converted.osp_report.graphs[0].passes}
    activations = len(first["hif8_absmax"]) + len(first["gelu_hif8_linear"])
    assert activations == 13  # per block: q/k/v input, o, cross q, cross o, FFN1, FFN2; the text (cross k/v) once
    assert counts == {False: activations, True: activations + 1}
    assert torch.equal(outs[False], outs[True])


def test_the_fp8_expansion_is_refused_with_its_reason(monkeypatch):
    """Where the two-node FP8 form cannot run, lowering says why and keeps one op per linear."""
    from osp_compile.convert import plan

    model = build_model("tiny", num_layers=1, seed=3)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=LATENT, seed=4)
    with torch.no_grad():  # planned for CUDA, inputs on this CPU: no FP8 tensor cores (or no CUDA at all)
        rows = _rows(plan(model, args, kwargs, OSPConfig(num_full_blocks=0, quant="hif8-infer", target="cuda")), "lowering")
    hif8 = [r for r in rows if "hif8" in r["op"]]
    assert hif8 and all("shared HiF8 quantization" not in r["kernel"] for r in hif8)
    assert all("CUDA" in r["refused"] or "no FP8 tensor cores for inputs on cpu" in r["refused"] for r in hif8)
    with torch.no_grad():  # on cpu the node keeps the op itself, and its inputs their example values
        gm = convert(model, args, kwargs, OSPConfig(num_full_blocks=0, quant="hif8-infer", target="cpu")).osp_report.graphs[0].module
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.osp.hif8_linear.default)
    as_if_triton_on_cuda(monkeypatch)
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: False)
    assert "no FP8 tensor cores" in hif8_kernels.fp8_expansion_refusal(node)
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    with torch.no_grad():
        assert hif8_kernels.fp8_expansion_refusal(node) is None
    assert "autograd" in hif8_kernels.fp8_expansion_refusal(node)  # the bias is a parameter that requires grad


def test_absmax_pass_leaves_an_empty_activation_to_the_op():
    """torch's max over no element is an error; the op's own max of an empty x is 0."""
    import torch.fx as fx

    from passes.hif8_absmax import hif8_absmax_pass

    _, _, b, codes, scale = _linear_case(seed=24)

    class Lin(torch.nn.Module):
        def forward(self, x, codes, b, scale):
            return torch.ops.osp.hif8_linear.default(x, codes, b, scale)

    gm = fx.symbolic_trace(Lin())
    empty = torch.empty(0, codes.shape[1])
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), (empty, codes, b, scale)):
        node.meta["example_value"] = value
    gm, report = hif8_absmax_pass(gm, None)
    assert [r["max"] for r in report.rows] == ["the op's own: the activation is empty"]
    assert gm(empty, codes, b, scale).shape == (0, codes.shape[0])


# ------------------------------------------------------------------- the output projection per length class

def test_hif8_projection_per_class_equals_the_concatenation_with_gradients():
    """Grid (3, 7, 10): every sparse site has two or more length classes. Each class is quantized
    with the max of all of them (one node, handed to every class's linear), so outputs and input
    gradients are those of the unfused conversion bit for bit; a scale per class would differ."""
    model = build_model("tiny", num_layers=4, seed=1)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=TWO_CLASS_LATENT, seed=2)
    outs = {}
    for fuse in (False, True):
        x = args[0].clone().requires_grad_(True)
        converted = convert(model, (x, *args[1:]), kwargs,
                            OSPConfig(num_full_blocks=2, quant="hif8-infer", fuse_linears=fuse))
        if fuse:
            rows = _rows(converted.osp_report, "attention_projection")
            assert [r["decision"].split(" (")[0] for r in rows] == ["projected per length class"] * 2
            graph = converted.osp_report.graphs[0].module.graph
            classes = graph.find_nodes(op="call_function", target=torch.ops.osp.folded_attention_classes.default)
            assert len(classes) == 2
            for node in classes:
                linears = [u for part in node.users for u in part.users if u.target is torch.ops.osp.hif8_linear.default]
                assert len(linears) == len(node.users) >= 2
                assert len({u.kwargs["amax"] for u in linears}) == 1
        outs[fuse] = output_and_input_grad(converted, (x, *args[1:]), kwargs)
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1]) and outs[True][1].abs().sum() > 0


def test_hif8_projection_left_alone_where_a_site_has_one_class():
    """Grid (2, 4, 8): one length class per site, so there is no concatenation to save."""
    _, converted, _, _ = _convert(True)
    rows = _rows(converted.osp_report, "attention_projection")
    assert [r["decision"] for r in rows] == ["kept: one length class (no concatenation to save)"] * 2
