"""The Python implementations of the ``osp::`` composite ops, and the same code on a target's attention.

The osp ops the passes insert are CompositeImplicitAutograd: plain torch (pad / reshape / permute
layouts), and for the attention ops `F.scaled_dot_product_attention` calls around it. Lowering them
to a target must not copy that code per target (it would drift), so `on_attention_kernel` returns
the op's own function with `F` rebound, in a copy of its globals, to a namespace whose
`scaled_dot_product_attention` is the target's kernel: the fold / unfold / masking stays the op
author's code, only the dense attention inside changes. An export prints the same functions (with
those calls renamed to the kernel), so it needs this table for the ops that keep their composite too.
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable

import torch.nn.functional as F

COMPOSITES = {
    "skiparse_attention": "osp_compile.ops:_skiparse_attention",
    "folded_attention": "osp_compile.ops:_folded_attention",
    "folded_attention_linear": "osp_compile.ops:_folded_attention_linear",
    "folded_attention_classes": "osp_compile.ops:_folded_attention_classes",
    "linear_gelu": "osp_compile.ops:_linear_gelu",
    "rms_norm_rope": "osp_compile.ops:_rms_norm_rope",
    "gelu_hif8_linear": "osp_compile.hif8.inference:_gelu_hif8_linear",
    "skiparse_relayout": "osp_compile.ops:_skiparse_relayout",
    "skiparse_joint_attention": "osp_compile.joint_attention:_skiparse_joint_attention",
}
"""osp op name -> 'module:function' implementing it (imported only when a graph holds the op)."""


def composite_function(op_name: str) -> Callable | None:
    """The function implementing ``osp::<op_name>``, or None if the op is not listed."""
    spec = COMPOSITES.get(op_name)
    if spec is None:
        return None
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _global_and_attribute_names(code: types.CodeType) -> set[str]:
    """Names a code object reads, with those of the code nested in it (comprehensions, inner functions:
    separate code objects before Python 3.12, sharing the function's globals)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_and_attribute_names(const)
    return names


def calls_attention(fn: Callable) -> bool:
    """Whether `fn` calls ``F.scaled_dot_product_attention`` itself (the seam `on_attention_kernel` uses)."""
    return {"F", "scaled_dot_product_attention"} <= _global_and_attribute_names(fn.__code__)


class FunctionalWithAttention:
    """`torch.nn.functional` with `scaled_dot_product_attention` replaced by a kernel."""

    def __init__(self, kernel: Callable) -> None:
        self.scaled_dot_product_attention = kernel

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)


@functools.cache
def on_attention_kernel(op_name: str, kernel: Callable) -> Callable:
    """``osp::<op_name>``'s function, its ``F.scaled_dot_product_attention`` calls running `kernel`."""
    fn = composite_function(op_name)
    if fn is None or not calls_attention(fn):
        raise KeyError(f"osp::{op_name} has no composite function calling F.scaled_dot_product_attention "
                       f"listed in {__name__}.COMPOSITES")
    scope = dict(fn.__globals__)
    scope["F"] = FunctionalWithAttention(kernel)
    lowered = types.FunctionType(fn.__code__, scope, f"{op_name}_on_{kernel.__name__}", fn.__defaults__,
                                 fn.__closure__)
    lowered.__kwdefaults__ = fn.__kwdefaults__
    lowered.__doc__ = f"osp::{op_name} with its attention on `{kernel.__name__}` ({fn.__module__}.{fn.__name__})."
    lowered.__module__ = __name__
    return lowered
