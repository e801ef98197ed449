"""The model matrix: convert() and the `osp` backend, forward and backward, on the reference model and
diffusers' Wan, CogVideoX and HunyuanVideo (tiny configs, no download), dual_end and all_sparse, on a
token grid (2, 5, 6) that needs padding for P=2 - each against the masked dense oracle.

CogVideoX and HunyuanVideo attend over text and video joined in one sequence (text first / video
first, Hunyuan with a text-padding key mask); the oracle masks that sequence from the formula
(`oracle.joint_skiparse_mask`), with the geometry taken from how the model was built
(`models.load_example`), not from the compiler's analysis.
"""
import pytest
import torch

from osp_compile import OSPConfig, convert
from osp_compile.backend import report_for
from osp_compile.models import load_example
from osp_compile.oracle import masked_oracle, rel_err

pytest.importorskip("diffusers")

MODELS = ["tiny", "diffusers:Wan", "diffusers:CogVideoX", "diffusers:HunyuanVideo"]
LAYOUTS = {  # 3 sites each: both patterns, and a full site for dual_end
    "dual_end": dict(layout="dual_end", num_full_blocks=1),  # full, token, group
    "all_sparse": dict(layout="all_sparse"),  # token, group, token
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(fn, args, kwargs, weight=None):
    """Output, and with a weight the gradients of sum(out * weight) w.r.t. args[0] and every parameter."""
    x = args[0].clone().requires_grad_(weight is not None)
    out = _first(fn(x, *args[1:], **kwargs))
    if weight is None:
        return out.detach(), None
    (out * weight).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("how", ["convert", "backend"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", MODELS)
def test_matches_masked_oracle(name, layout, how):
    ex = load_example(name, layers=3, latent=(2, 10, 12))
    model, args, kwargs = ex.inputs
    options = dict(sparse_ratio=2, **LAYOUTS[layout])
    if how == "convert":
        fn = convert(model, args, kwargs, OSPConfig(**options))
    else:
        fn = torch.compile(model, backend="osp", options={**options, "inner": "eager"})
    expected = OSPConfig(**options).resolve_layout(3)

    weight = torch.randn_like(_first(model(*args, **kwargs)))
    model.zero_grad()
    out, gx = _run(fn, args, kwargs, weight)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with masked_oracle(expected, ex.grid, 2, ex.text_len, ex.video_offset):
        ref, ref_gx = _run(model, args, kwargs, weight)
    with torch.no_grad():
        dense = _first(model(*args, **kwargs))

    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, dense) > 1e-3  # the oracle is not trivially the dense model
    assert rel_err(gx, ref_gx) <= 1e-5
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        ref_g = model.get_parameter(n).grad
        if ref_g.norm() > 1e-6:
            assert rel_err(g, ref_g) <= 1e-4, n
        else:  # zero but for rounding (a key bias: softmax ignores a shift shared by all keys)
            assert (g - ref_g).norm() <= 1e-6, n
    if how == "convert":
        report = fn.osp_report
        assert report.layout == expected
        kinds = {s.kind for s in report.video_sites}
        assert kinds == ({"joint"} if ex.text_len else {"video_self"})
        if ex.text_len:
            assert all(s.text_tokens == ex.text_len for s in report.video_sites)


@pytest.mark.parametrize("name,dynamic", [(name, None) for name in MODELS] + [("tiny", True)])
def test_backend_at_successive_input_shapes(name, dynamic):
    """Dynamo recompiles a model called at a second shape with symbolic sizes (by default; always
    with dynamic=True). OSP's index maps are constants of the token grid, so each shape gets the
    graph of its own grid (`passes/static_shapes.py`): at every shape, output and input gradient
    equal the masked dense oracle at that shape's grid."""
    model = load_example(name, layers=2).model
    options = {"layout": "all_sparse", "inner": "eager"}
    compiled = torch.compile(model, backend="osp", options=options, dynamic=dynamic)
    for latent in [(2, 10, 12), (2, 12, 12), (3, 8, 16)]:
        ex = load_example(name, layers=2, latent=latent)
        args, kwargs = ex.args, ex.kwargs
        weight = torch.randn_like(_first(model(*args, **kwargs)))
        out, gx = _run(compiled, args, kwargs, weight)
        with masked_oracle(["token", "group"], ex.grid, 2, ex.text_len, ex.video_offset):
            ref, ref_gx = _run(model, args, kwargs, weight)
        assert rel_err(out, ref) <= 1e-5, latent
        assert rel_err(gx, ref_gx) <= 1e-5, latent
    summaries = [p.summary for g in report_for(options).graphs for p in g.passes if p.name == "static_shapes"]
    assert any("specialized" in s for s in summaries), summaries  # Dynamo did capture symbolic sizes
