"""Lowering: map the target-neutral ops that passes insert to a kernel per target.

Passes never hold device code. A kernel is registered for an (op, target) pair; the lowering pass
(`passes/lowering.py`, run last) swaps each op node for the kernel of the config's target, runs an
osp attention composite with its attention on the target's kernel (`composites.py`), or keeps the
op's portable composite implementation. A kernel must compute what the op computes.

Kernels per target: ``cpu`` none (PyTorch's SDPA, the composites as written); ``cuda`` flash-attn
where installed (`cuda.py`), else PyTorch's SDPA picks flash / cuDNN / memory-efficient; ``npu``
torch_npu.npu_fusion_attention (`npu.py`, never run on Ascend hardware). HiF8 kernels: `hif8_*.py`.
Collectives need no kernel: the sequence-parallel ops are built on torch.distributed functional
collectives, which run on the process group's backend (NCCL, HCCL, gloo); a collective that ever
needs a device-specific call registers it here like any other op, under its osp op name.
"""
from .registry import TARGET_KINDS, Kernel, kernel_for, kernels_for, register_kernel, registered_kernels

# node / graph metadata the lowering pass writes and the export reads
SOURCE_KEY = "osp_source"  # placeholder: the Dynamo source it stands for ("L['x']", a parameter path)
KERNEL_KEY = "osp_kernel"  # lowered node: its `Kernel`
TARGET_KEY = "osp_target"  # GraphModule.meta: the target the graph was lowered for

__all__ = ["TARGET_KINDS", "Kernel", "kernel_for", "kernels_for", "register_kernel", "registered_kernels",
           "SOURCE_KEY", "KERNEL_KEY", "TARGET_KEY"]
