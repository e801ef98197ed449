"""The (op, target) -> kernel table.

Several kernels may serve one (op, target) pair; they are tried in registration order and the first
whose `check` passes for a node is used (e.g. flash-attn where its dtypes allow, else PyTorch's SDPA).
Kernel modules register themselves on import: `load_kernel_modules()` imports every module of this
package, so a new file (e.g. ``hif8_linear_cuda.py``) only has to call `register_kernel`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

TARGET_KINDS = ("cpu", "cuda", "npu")

Check = Callable[[fx.Node], "str | None"]
Expand = Callable[[fx.GraphModule, fx.Node, dict], fx.Node]


@dataclass(frozen=True)
class Kernel:
    """One kernel of ``osp::<op>`` (or of an aten op such as ``scaled_dot_product_attention``).

    fn: what the lowered node calls, with the same arguments as the op.
    name: how the report names it.
    check: `check(node)` is None when the kernel can run that node, else the reason it cannot.
    imports: import statements the kernel needs where it runs, beyond what its own code imports
        (e.g. ``import torch_npu`` for a kernel that is an op of that library); an export writes
        them at the top of the module.
    expand: for a kernel that is several nodes, not one call: ``expand(gm, node, shared)`` writes
        them in place of `node` (and erases it), returning the node that gives the op's result.
        ``shared`` is one dict per lowering run, where expansions keep nodes that later nodes of
        the same graph may reuse (e.g. one activation quantization read by several linears).
    """

    fn: Callable
    name: str
    check: Check | None = None
    imports: tuple[str, ...] = ()
    expand: Expand | None = None

    def refuses(self, node: fx.Node) -> str | None:
        return self.check(node) if self.check is not None else None


_KERNELS: dict[tuple[str, str], list[Kernel]] = {}


def register_kernel(op_name: str, target: str, *, name: str | None = None, check: Check | None = None,
                    imports: tuple[str, ...] = (), expand: Expand | None = None) -> Callable[[Callable], Callable]:
    """Decorator: `fn` is a kernel of ``osp::<op_name>`` on `target` (same arguments as the op;
    with `expand`, the call the expansion ends in)."""
    if target not in TARGET_KINDS:
        raise ValueError(f"unknown target {target!r}: use one of {TARGET_KINDS}")

    def wrap(fn: Callable) -> Callable:
        kernel = Kernel(fn, name or getattr(fn, "__name__", str(fn)), check, tuple(imports), expand)
        _KERNELS.setdefault((op_name, target), []).append(kernel)
        return fn

    return wrap


def kernels_for(op_name: str, target: str) -> list[Kernel]:
    """The kernels of (op, target), in the order they are tried."""
    load_kernel_modules()
    return list(_KERNELS.get((op_name, target), ()))


def kernel_for(op_name: str, target: str) -> Callable | None:
    """The first registered kernel function of (op, target), or None."""
    kernels = kernels_for(op_name, target)
    return kernels[0].fn if kernels else None


def registered_kernels() -> dict[tuple[str, str], list[Kernel]]:
    load_kernel_modules()
    return {key: list(value) for key, value in _KERNELS.items()}


_LOADED = False


def load_kernel_modules() -> None:
    """Import every module of `osp_compile.lowering` once, so that their registrations run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # first, so that a kernel module that asks for kernels while importing does not recurse
    try:
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__package__}.{info.name}")
    except BaseException:
        _LOADED = False
        raise
