"""``release_float_weights``: a converted ``quant="hif8-infer"`` model stops holding the float weights
of its quantized linears, gives the same output (one recapture, then none), and its state_dict
carries the HiF8 codes and scales instead."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from osp_compile import OSPConfig, convert
from osp_compile.hif8 import HiF8Linear, hif8_state_dict, inference, release_float_weights
from reference_model import PRESETS, build_model, make_inputs
from test_hif8_infer import LATENT
from test_hif8_qat import MixedForms, block_linears

CONFIG = OSPConfig(num_full_blocks=0, quant="hif8-infer")


def _converted(model, args, kwargs):
    torch._dynamo.reset()
    return convert(model, args, kwargs, CONFIG)


@pytest.fixture(scope="module")
def released():
    """(model, args, kwargs, converted, output before, the quantized weights' names and weak refs, table)."""
    model = build_model("tiny", num_layers=2, seed=1)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=LATENT, seed=2)
    converted = _converted(model, args, kwargs)
    with torch.no_grad():
        before = converted(*args, **kwargs)
    names = [f"{n}.weight" for n in block_linears(model)]
    refs = [weakref.ref(model.get_parameter(n)) for n in names]
    table = release_float_weights(converted)
    gc.collect()
    return model, args, kwargs, converted, before, names, refs, table


def test_float_weights_are_freed_and_the_output_is_unchanged(released):
    model, args, kwargs, converted, before, names, refs, table = released
    assert table == dict.fromkeys(names, "released")
    assert refs and all(r() is None for r in refs)  # nothing holds the float tensors any more
    graphs = len(converted.osp_report.graphs)
    with torch.no_grad():
        after = converted(*args, **kwargs)  # the modules changed: captured once more
        again = converted(*args, **kwargs)
    assert torch.equal(after, before) and torch.equal(again, before)
    assert len(converted.osp_report.graphs) == graphs + 1
    assert isinstance(model.blocks[0].self_attn.q, HiF8Linear)  # the original model is the HiF8 model now
    assert release_float_weights(converted) == table  # idempotent


def test_state_dict_carries_codes_and_scales(released):
    model, args, kwargs, converted, before, _, _, table = released
    sd = converted.state_dict()
    codes = hif8_state_dict(converted)
    assert set(codes) <= set(sd) and set(sd) == set(model.state_dict())
    for fqn in table:
        assert sd[fqn].dtype == torch.uint8 and torch.equal(sd[fqn], codes[fqn])
        assert sd[fqn + "_scale"].dtype == torch.float32 and torch.equal(sd[fqn + "_scale"], codes[fqn + "_scale"])

    # a blank model, released, then loaded with that state dict, is the same model
    blank = copy.deepcopy(build_model("tiny", num_layers=2, seed=7))
    other = _converted(blank, args, kwargs)
    release_float_weights(other)
    other.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other(*args, **kwargs), before)
    with pytest.raises(RuntimeError, match="float32, but this linear's float weight was released"):
        other.load_state_dict(build_model("tiny", num_layers=2, seed=1).state_dict())


def test_weights_without_a_linear_module_are_kept_and_said_so():
    torch.manual_seed(4)
    model, x = MixedForms(), torch.randn(3, 5, 16)
    converted = _converted(model, (x,), {})
    with torch.no_grad():
        before = converted(x)
    table = release_float_weights(converted)
    assert table["proj.weight"] == "released"
    assert set(table) == {"proj.weight", "w_mm", "w_addmm"}  # head* excluded; w_scaled is computed
    assert all(table[k].startswith("kept: not the weight of a plain nn.Linear") for k in ("w_mm", "w_addmm"))
    with torch.no_grad():
        assert torch.equal(converted(x), before)


def test_hif8_linear_keeps_its_scale_float32_under_a_cast():
    codes, scale = inference.quantize_weight(torch.randn(8, 16))
    lin = HiF8Linear(codes, scale, nn.Parameter(torch.randn(8))).half()
    assert lin.weight.dtype == torch.uint8 and lin.weight_scale.dtype == torch.float32
    assert lin.weight_scale is scale and lin.bias.dtype == torch.float16


def test_lora_models_are_refused():
    torch.manual_seed(5)
    model, x = MixedForms(), torch.randn(3, 5, 16)
    torch._dynamo.reset()
    converted = convert(model, (x,), config=OSPConfig(quant="hif8-infer", lora_rank=2, lora_targets=["head.weight"]))
    with pytest.raises(ValueError, match="LoRA"):
        release_float_weights(converted)
