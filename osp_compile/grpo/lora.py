"""Working with the LoRA adapters that `passes.lora.lora_pass` added to a converted model.

The adapters are not parameters of the model (the original's state_dict keys stay unchanged);
they live in the session's `LoRAAdapters` store. Every helper takes the model (what `convert()`
returned, or a ``torch.compile(backend="osp")`` module together with its ``options`` dict) or the
store itself. The store is created when the model is first captured: after `convert()`, or after
the first call of a ``torch.compile``-d model.

Saved adapters use PEFT-style names, ``blocks.0.self_attn.q.lora_A.weight``, in safetensors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from passes.lora import LoRAAdapters

AdapterSource = nn.Module | LoRAAdapters


def find_adapters(model: AdapterSource, options: dict | None = None) -> LoRAAdapters | None:
    """The model's LoRA store, or None when it has none (lora_rank 0)."""
    if isinstance(model, LoRAAdapters):
        return model
    if options is not None:
        from osp_compile.backend import state_for

        state = state_for(options)
    else:
        state = getattr(model, "osp_state", None)
    return None if state is None else state.get("lora")


def lora_adapters(model: AdapterSource, options: dict | None = None) -> LoRAAdapters:
    """The model's LoRA store; raises when there is none, saying how to get one."""
    store = find_adapters(model, options)
    if store is None:
        raise ValueError(
            "this model has no LoRA adapters: convert it with OSPConfig(lora_rank=r > 0) (or compile it with "
            "backend='osp', options={'lora_rank': r, ...}, run it once and pass the same options dict here)."
        )
    return store


@contextlib.contextmanager
def adapters_disabled(model: AdapterSource, options: dict | None = None) -> Iterator[LoRAAdapters]:
    """Run the base model (the GRPO reference) inside the block; no recompilation either way."""
    store = lora_adapters(model, options)
    was_on = store.enabled
    store.set_enabled(False)
    try:
        yield store
    finally:
        store.set_enabled(was_on)


def _saved_name(fqn: str, which: str) -> str:
    return f"{fqn.removesuffix('.weight')}.lora_{which}.weight"


def save_adapters(model: AdapterSource, path: str, options: dict | None = None) -> None:
    """Write the adapters (and their rank and alpha) to a safetensors file."""
    store = lora_adapters(model, options)
    tensors = {}
    for fqn, a, b in store.items():
        tensors[_saved_name(fqn, "A")] = a.detach().cpu().contiguous()
        tensors[_saved_name(fqn, "B")] = b.detach().cpu().contiguous()
    save_file(tensors, path, metadata={"format": "osp-lora", "rank": str(store.rank), "alpha": repr(store.alpha)})


def load_adapters(model: AdapterSource, path: str, options: dict | None = None) -> None:
    """Load adapters saved by `save_adapters` into the model's store (same targets, rank and alpha)."""
    store = lora_adapters(model, options)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if int(meta.get("rank", store.rank)) != store.rank or float(meta.get("alpha", store.alpha)) != store.alpha:
        raise ValueError(
            f"{path} holds rank {meta.get('rank')} / alpha {meta.get('alpha')} adapters; this model's are "
            f"rank {store.rank} / alpha {store.alpha:g}"
        )
    tensors = load_file(path)
    expected = {_saved_name(fqn, w) for fqn, _, _ in store.items() for w in "AB"}
    if set(tensors) != expected:
        raise ValueError(
            f"{path} does not match this model's adapters: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}"
        )
    with torch.no_grad():
        for fqn, a, b in store.items():
            a.copy_(tensors[_saved_name(fqn, "A")])
            b.copy_(tensors[_saved_name(fqn, "B")])


def merge_adapters(model: nn.Module, options: dict | None = None) -> None:
    """Fold scaling * B @ A into each adapted base weight, in place, then zero B.

    The outputs stay the same (up to rounding); adapters on or off now both give the merged
    model, and training may go on from there with fresh (zero) adapters.
    """
    store = lora_adapters(model, options)
    base = getattr(model, "_orig_mod", model)  # a torch.compile-d module wraps the original
    with torch.no_grad():
        for key, fqn in store.fqns.items():
            weight = base.get_parameter(fqn)
            weight.add_(store.delta_weight(key).to(weight.dtype))
            store.lora_B[key].zero_()
