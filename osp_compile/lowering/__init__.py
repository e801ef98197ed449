"""Lowering: map the target-neutral ``osp::`` ops that passes insert to a kernel per target.

Passes never hold device code. A kernel is registered for an (op, target) pair; the lowering pass
(run last) swaps each op node for the kernel of the config's target, or keeps the op's portable
composite implementation when none is registered. A kernel must compute what the op computes.
"""
from .registry import TARGET_KINDS, kernel_for, register_kernel, registered_kernels

__all__ = ["TARGET_KINDS", "kernel_for", "register_kernel", "registered_kernels"]
