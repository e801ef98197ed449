"""`OSPConfig`: what the compiler is asked to do, and the hybrid full/sparse layout it implies.

The field names are a public contract (issues fix them); everything that derives from them, such as
which attention site is full, token-wise or group-wise, is computed here and nowhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from .errors import OSPConfigError

SITE_LAYOUTS = ("full", "token", "group")
NAMED_LAYOUTS = ("dual_end", "uniform", "all_sparse", "dense")
TARGETS = ("auto", "cpu", "cuda", "npu")
QUANT_MODES = ("hif8", "hif8-infer")
SP_MODES = ("ssp", "ulysses")
UNSUPPORTED_POLICIES = ("error", "skip")


@dataclass
class OSPConfig:
    """Options of one conversion.

    sparse_ratio: P, the per-axis sparse ratio; P*P subsequences per frame grid.
    layout: a named hybrid layout (``dual_end``, ``uniform``, ``all_sparse``, ``dense``) or one entry
        (``full``/``token``/``group``) per video self-attention site, in call order.
    num_full_blocks: F, how many sites stay full for the named layouts ``dual_end`` and ``uniform``.
    grid: (T, H, W) token grid; overrides what the analysis infers from the patch embedding.
    target: ``auto`` (the device of the inputs), ``cpu``, ``cuda`` or ``npu``.
    on_unsupported: ``error`` raises when a site cannot be proven convertible; ``skip`` leaves it
        dense and says so in the report.
    quant: None, ``hif8`` (quantization-aware training linears) or ``hif8-infer`` (HiF8 weights).
    quant_exclude: parameter-name patterns (fnmatch) of linears to keep in high precision; None
        keeps the default (patch embedding, timestep/text embedding MLPs, output head, and every
        linear fed one row per sample: adaLN modulation). A list replaces all of it.
    fp8_fast_accum: ``hif8-infer`` on CUDA FP8 tensor cores: accumulate with Hopper's fast FP8
        mode (cuBLASLt's ``FAST_ACCUM``, ``_scaled_mm(use_fast_accum=True)`` in torch, as torchao's
        float8 inference does). About 10% faster per GEMM; rel. error vs the QAT forward ~2e-3 instead of ~1e-4 (the HiF8
        quantization itself is ~4e-2). Other targets ignore it.
    fuse_permutations: move the Skiparse rearrangement onto the hidden state (one permutation per
        pattern switch) instead of rearranging q, k, v and the output at every sparse site.
    fuse_linears: fold neighbours into linears where the result is the same computation: a GELU into
        the GEMM that feeds it (``osp::linear_gelu``; cuBLASLt's epilogue on CUDA), or in a HiF8
        inference model into the next linear's activation quantization (``osp::gelu_hif8_linear``;
        on CUDA the GELU output is never written; its float32 GELU can round to the neighbouring
        bfloat16 value where PyTorch's does not), and a packed sparse site's output projection into
        the site, per length class, so that the classes' outputs are never concatenated
        (``osp::folded_attention_linear``). False keeps the model's own calls.
    fuse_norm_rope: a q or k projection's RMSNorm and interleaved rotary embedding as one op
        (``osp::rms_norm_rope``; one Triton pass on CUDA in inference, where a compiler's fused
        kernel gathers each element's rotation partner). Its float32 arithmetic may contract
        differently, so a bfloat16 element can land on the neighbouring value. False keeps the calls.
    sequence_parallel: None, ``ssp`` (Sparse Sequence Parallelism) or ``ulysses`` (the baseline);
        needs torch.distributed initialised. sp_group: the process group (None = the world).
    lora_rank, lora_alpha, lora_targets: LoRA adapters added as a pass (rank 0: none); targets are
        fnmatch patterns of linear weight names, None = attention q/k/v/o; alpha None = rank.
    """

    sparse_ratio: int = 2
    layout: str | list[str] = "dual_end"
    num_full_blocks: int = 8
    grid: tuple[int, int, int] | None = None
    target: str = "auto"
    on_unsupported: str = "error"
    fuse_permutations: bool = True
    fuse_linears: bool = True
    fuse_norm_rope: bool = True
    sequence_parallel: str | None = None
    sp_group: object | None = None
    quant: str | None = None
    quant_exclude: list[str] | None = None
    fp8_fast_accum: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layout, tuple):
            self.layout = list(self.layout)
        self.validate()

    def validate(self) -> None:
        """Check what can be checked without the model; `resolve_layout` checks the rest."""
        p = self.sparse_ratio
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise OSPConfigError(f"sparse_ratio must be an integer >= 1, got {p!r}.")
        if isinstance(self.layout, str):
            if self.layout not in NAMED_LAYOUTS:
                raise OSPConfigError(
                    f"unknown layout {self.layout!r}: use one of {', '.join(NAMED_LAYOUTS)}, or a list "
                    f"with one of {SITE_LAYOUTS} per video self-attention site."
                )
        elif isinstance(self.layout, list):
            for i, entry in enumerate(self.layout):
                if entry not in SITE_LAYOUTS:
                    raise OSPConfigError(
                        f"layout[{i}] = {entry!r} is not a site layout: each entry must be one of "
                        f"{', '.join(SITE_LAYOUTS)}."
                    )
        else:
            raise OSPConfigError(f"layout must be a string or a list of strings, got {type(self.layout).__name__}.")
        f = self.num_full_blocks
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise OSPConfigError(f"num_full_blocks must be an integer >= 0, got {f!r}.")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in grid):
                raise OSPConfigError(f"grid must be three positive integers (T, H, W), got {self.grid!r}.")
            self.grid = grid  # type: ignore[assignment]
        if self.target not in TARGETS:
            raise OSPConfigError(f"unknown target {self.target!r}: use one of {', '.join(TARGETS)}.")
        if self.on_unsupported not in UNSUPPORTED_POLICIES:
            raise OSPConfigError(
                f"on_unsupported must be one of {', '.join(UNSUPPORTED_POLICIES)}, got {self.on_unsupported!r}."
            )

        if self.sequence_parallel is not None and self.sequence_parallel not in SP_MODES:
            raise OSPConfigError(
                f"unknown sequence_parallel {self.sequence_parallel!r}: use None or one of {', '.join(SP_MODES)}.")
        if self.quant is not None and self.quant not in QUANT_MODES:
            raise OSPConfigError(f"unknown quant {self.quant!r}: use None or one of {', '.join(QUANT_MODES)}.")
        if self.fp8_fast_accum and self.quant != "hif8-infer":
            raise OSPConfigError(f"fp8_fast_accum=True applies to quant='hif8-infer' (FP8 inference GEMMs), "
                                 f"but quant is {self.quant!r}: set quant='hif8-infer' or drop fp8_fast_accum.")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise OSPConfigError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}.")
        a = self.lora_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0):
            raise OSPConfigError(f"lora_alpha must be None (= lora_rank) or a number > 0, got {a!r}.")
        for name in ("fuse_permutations", "fuse_linears", "fuse_norm_rope", "fp8_fast_accum"):
            if not isinstance(getattr(self, name), bool):
                raise OSPConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("quant_exclude", "lora_targets"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
                raise OSPConfigError(f"{name} must be None or a list of fnmatch patterns of weight names, e.g. "
                                     f"['head*'], got {patterns!r}.")
            setattr(self, name, list(patterns))

    def replace(self, **changes) -> "OSPConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: dict | None) -> "OSPConfig":
        """Build from a torch.compile ``options`` dict, ignoring the keys that are not config fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (options or {}).items() if k in names})

    def resolve_layout(self, num_sites: int) -> list[str]:
        """The layout of each of `num_sites` video self-attention sites, in call order."""
        return resolve_layout(self.layout, num_sites, self.num_full_blocks)


def _alternating(n: int) -> list[str]:
    return ["token" if i % 2 == 0 else "group" for i in range(n)]


def resolve_layout(layout: str | Sequence[str], num_sites: int, num_full_blocks: int) -> list[str]:
    """Expand a named layout to one entry per site.

    dual_end: the first F/2 and last F/2 sites full (an odd F gives the extra one to the front),
    the sites between alternate token, group, token, ... starting with token.
    uniform: F full sites spread evenly (site round((i + 0.5) * N / F) - rounded down), the others
    alternating token/group in order.
    """
    n = num_sites
    if not isinstance(layout, str):
        entries = list(layout)
        if len(entries) != n:
            raise OSPConfigError(
                f"layout lists {len(entries)} entries but the model has {n} video self-attention sites: "
                f"give exactly one of {SITE_LAYOUTS} per site, in call order."
            )
        return entries
    if layout == "dense":
        return ["full"] * n
    if layout == "all_sparse":
        return _alternating(n)
    f = num_full_blocks
    if f > n:
        raise OSPConfigError(
            f"num_full_blocks={f} is larger than the number of video self-attention sites ({n}): "
            f"use num_full_blocks <= {n}, or layout='dense'."
        )
    if layout == "dual_end":
        front = (f + 1) // 2
        back = f - front
        sparse = _alternating(n - f)
        return ["full"] * front + sparse + ["full"] * back
    if layout == "uniform":
        full = {min(n - 1, int((i + 0.5) * n / f)) for i in range(f)} if f else set()
        sparse = iter(_alternating(n - len(full)))
        return ["full" if i in full else next(sparse) for i in range(n)]
    raise OSPConfigError(f"unknown layout {layout!r}")
