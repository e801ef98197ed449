"""The (op, target) -> kernel table."""
from __future__ import annotations

from typing import Callable

TARGET_KINDS = ("cpu", "cuda", "npu")

_KERNELS: dict[tuple[str, str], Callable] = {}


def register_kernel(op_name: str, target: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` is the kernel of ``osp::<op_name>`` on `target` (same arguments as the op)."""
    if target not in TARGET_KINDS:
        raise ValueError(f"unknown target {target!r}: use one of {TARGET_KINDS}")

    def wrap(fn: Callable) -> Callable:
        _KERNELS[(op_name, target)] = fn
        return fn

    return wrap


def kernel_for(op_name: str, target: str) -> Callable | None:
    return _KERNELS.get((op_name, target))


def registered_kernels() -> dict[tuple[str, str], Callable]:
    return dict(_KERNELS)
