"""Dropping the float weights of a HiF8 inference model (``OSPConfig(quant="hif8-infer")``).

`convert` returns a module that shares the original model's parameters, and the pass keeps the
HiF8 codes in a session store beside them (``inference.py``), so a converted hif8-infer model
holds both the float weights and the codes: no memory is saved.  `release_float_weights` swaps
each quantized ``nn.Linear`` for a `HiF8Linear` holding the store's codes and scale (the same
tensors, not copies) as buffers ``weight`` and ``weight_scale``, and the original bias parameter.

Why a module swap and not freeing the parameters' storage in place: Dynamo guards a parameter's
shape, stride and dtype, not its storage, so a storage resized to 0 would keep the compiled graphs
running without a recompile; but anything that later reads the tensor (``.to()``, ``state_dict()``
and a save, an eager call of the model, the user's own code) would read freed memory (a segfault
on CPU, garbage on a GPU) instead of failing.  After the swap:

* the float weights are freed as soon as nothing else holds them (an optimizer, a variable);
* the next call captures each graph once more (the modules changed, so Dynamo's guards fail; no
  further recompiles): the new graph reads the codes from the modules, through the same
  ``osp::hif8_linear`` op and kernels, so the output is the same, bit for bit;
* ``state_dict()`` (of the converted and of the original model, which share these modules)
  carries ``<linear>.weight`` (uint8 codes) and ``<linear>.weight_scale``, the `hif8_state_dict`
  format; ``load_state_dict`` writes them in place, so the store and the compiled graphs see
  them; a float ``weight`` is reported as an error (copying it into the codes would cast it);
* code that needs a float weight gets a uint8 tensor, which float ops refuse; the model itself
  is now the HiF8 model (called eagerly, it runs ``osp::hif8_linear`` too).

Only weights of plain ``nn.Linear`` modules are released: a weight used by a module's own code
(``x @ W``, ``addmm``, an ``nn.Linear`` subclass) has no forward that can be replaced, and a weight
shared with another parameter name would stay alive; those keep their float tensors, and the
returned table says why.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .inference import hif8_linear, weight_store

RELEASED = "released"


class HiF8Linear(nn.Module):
    """An ``nn.Linear`` whose weight exists only as HiF8 codes (uint8 [out, in], buffer ``weight``)
    and their float32 scale (buffer ``weight_scale``): ``osp::hif8_linear(x, weight, bias, weight_scale)``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hif8_linear(x, self.weight, self.bias, self.weight_scale)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves the scale, but a dtype cast (``.half()``) leaves it float32: a
        rounded scale would change every dequantized weight."""
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse a float ``weight`` (``copy_`` would cast it into the uint8 codes): reported, as
        ``load_state_dict`` reports a shape mismatch, and nothing of this module is loaded."""
        codes = state_dict.get(prefix + "weight")
        if codes is not None and codes.dtype != torch.uint8:
            error_msgs.append(
                f"{prefix}weight is {codes.dtype}, but this linear's float weight was released "
                f"(osp_compile.hif8.release_float_weights): load HiF8 codes (uint8, with '{prefix}weight_scale', "
                f"as state_dict() or hif8_state_dict() give them), or load the float weights into the model "
                f"before converting it"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, HiF8"


def _why_kept(fqn: str, module: nn.Module, leaf: str, names: list[str]) -> str | None:
    if type(module) is not nn.Linear or leaf != "weight":
        return "kept: not the weight of a plain nn.Linear (its module's own code reads it)"
    others = [n for n in names if n != fqn]
    return f"kept: the tensor is also the parameter {', '.join(others)}" if others else None


def release_float_weights(converted: nn.Module) -> dict[str, str]:
    """Drop the float weights of the HiF8-quantized linears of a ``quant="hif8-infer"`` conversion
    (the module docstring says what changes).  Returns ``{weight name: "released" or why kept}``.

    Call it after the first call (or `convert`, which makes one), so that the store holds every
    quantized weight.  Models with LoRA adapters are refused: the adapters find their linears by
    parameter name, which a released linear no longer has."""
    config = getattr(converted, "osp_config", None)
    if config is not None and config.lora_rank:
        raise ValueError("release_float_weights: LoRA adapters attach to linears by parameter name; merge the "
                         "adapters and convert again without LoRA first")
    store = weight_store(converted)
    names: dict[int, list[str]] = {}
    for name, p in converted.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    table = {}
    for fqn in store.fqns:
        path, _, leaf = fqn.rpartition(".")
        module = converted.get_submodule(path)
        if isinstance(module, HiF8Linear):
            table[fqn] = RELEASED
            continue
        why = _why_kept(fqn, module, leaf, names.get(id(getattr(module, leaf, None)), []))
        if why is None:
            codes, scale = store.entry(fqn)
            parent, _, child = path.rpartition(".")
            setattr(converted.get_submodule(parent), child, HiF8Linear(codes, scale, module.bias))
        table[fqn] = why or RELEASED
    return table
