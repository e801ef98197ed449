"""Where the video tokens sit in a tensor: the algebra the analysis pass propagates through a graph.

A tensor's layout is, per dim, the list of *factors* that dim is the product of (outer to inner):
  * ``tok``   - a run of video tokens;
  * ``other`` - anything else (batch, channels, heads, frames of an unrelated stream, ...);
  * ``joint`` - a whole joined sequence: text tokens around one segment holding all video tokens
                (CogVideoX: text then video; HunyuanVideo: video then text).
Invariant: reading the ``tok`` factors in the tensor's row-major order enumerates the tokens in
frame-major order, i = (t*H + y)*W + x. That is what reshape and permute must preserve, and all that
Skiparse needs: at an attention call the sequence dim must be exactly one ``tok`` (or ``joint``)
factor and no other dim may hold tokens.

Why factors and not "which consecutive dims": diffusers' CogVideoX embeds frames folded into the
batch (Conv2d on [B*F, C, H, W]), so right after the patch embedding dim 0 is (batch x frames) and
the frames and the rows are separated by the channel dim until a transpose brings them together.

Sizes are ints: `passes/static_shapes.py` runs first and leaves no symbolic size behind.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

import torch.fx as fx

TOK, OTHER, JOINT = "tok", "other", "joint"


def size_quotient(a: int, b: int) -> int | None:
    """a / b when b divides a exactly, else None."""
    return a // b if b and a % b == 0 else None


@dataclass(frozen=True)
class Factor:
    kind: str  # TOK | OTHER | JOINT
    size: int


Dim = tuple[Factor, ...]
Layout = tuple[Dim, ...]


def normalize_dim(factors: Sequence[Factor]) -> Dim:
    """Drop size-1 factors and merge neighbours of the same kind (tok with tok, other with other)."""
    out: list[Factor] = []
    for f in factors:
        if f.size == 1:
            continue
        if out and f.kind == out[-1].kind and f.kind != JOINT:
            out[-1] = Factor(f.kind, out[-1].size * f.size)
        else:
            out.append(f)
    return tuple(out)


def other_dim(size: int) -> Dim:
    return normalize_dim([Factor(OTHER, size)])


def holds_tokens(dim: Dim) -> bool:
    return any(f.kind != OTHER for f in dim)


@dataclass(frozen=True)
class Segment:
    """Where the video tokens sit inside a joined sequence of `length` tokens."""

    offset: int
    length: int


@dataclass(frozen=True)
class TokenAxis:
    """The token layout of one tensor, the grid (T, H, W) and where the tokens came from.

    `origin` is the patch-embedding node. `segment` is set when a dim is a joined sequence.
    """

    layout: Layout
    grid: tuple[int, int, int]
    origin: fx.Node
    segment: Segment | None = None

    def with_layout(self, layout: Sequence[Sequence[Factor]], segment: Segment | None | str = "keep") -> "TokenAxis | None":
        """The same tokens in a new layout; None when no dim holds tokens any more."""
        norm = tuple(normalize_dim(d) for d in layout)
        if not any(holds_tokens(d) for d in norm):
            return None
        seg = self.segment if segment == "keep" else segment
        if not any(f.kind == JOINT for d in norm for f in d):
            seg = None
        return replace(self, layout=norm, segment=seg)

    @property
    def token_dims(self) -> tuple[int, ...]:
        """The dims that hold tokens (alone, or with other factors, or joined with text)."""
        return tuple(i for i, d in enumerate(self.layout) if holds_tokens(d))

    @property
    def dims(self) -> tuple[int, ...]:
        """The consecutive dims that hold the video tokens and nothing else, frame-major; () when the
        tokens share a dim with other factors, are split apart, or are joined with text."""
        dims = self.token_dims
        if self.segment is not None or any(b - a != 1 for a, b in zip(dims, dims[1:])):
            return ()
        if any(f.kind != TOK for d in dims for f in self.layout[d]):
            return ()
        return dims

    def seq_dim(self) -> int | None:
        """The dim that holds every token and nothing else (video, or the joined sequence), if any."""
        dims = self.token_dims
        if len(dims) == 1 and len(self.layout[dims[0]]) == 1:
            return dims[0]
        return None

    @property
    def is_joint(self) -> bool:
        return self.segment is not None

    def same_tokens(self, other: "TokenAxis") -> bool:
        return self.origin is other.origin and self.segment == other.segment


def regroup(layout: Layout, out_shape: Sequence[int]) -> Layout | None:
    """The layout after a reshape to `out_shape`, or None when it cuts a factor in a way that mixes
    tokens with other dims (or splits a joined sequence)."""
    queue = deque(normalize_dim([f for dim in layout for f in dim]))
    out: list[Dim] = []
    for size in out_shape:
        need, group = size, []
        while need != 1:
            if not queue:
                return None
            f = queue.popleft()
            rest = size_quotient(need, f.size)
            if rest is not None:
                group.append(f)
                need = rest
                continue
            inner = size_quotient(f.size, need)
            if inner is None or f.kind == JOINT:
                return None
            group.append(Factor(f.kind, need))
            queue.appendleft(Factor(f.kind, inner))
            need = 1
        out.append(normalize_dim(group))
    return tuple(out) if not queue else None


def permute(layout: Layout, order: Sequence[int]) -> Layout | None:
    """The layout after `permute(order)`, or None when it reorders the token-holding dims."""
    token_dims = [o for o in order if holds_tokens(layout[o])]
    if token_dims != sorted(token_dims):
        return None
    return tuple(layout[o] for o in order)


def slice_joint(axis: TokenAxis, dim: int, start: int, stop: int) -> tuple[TokenAxis | None, str | None]:
    """Keep [start, stop) of the joined dim `dim`: the video segment alone gives the video tokens,
    a range around it a smaller joined sequence, a range outside it text only (None).
    Returns (axis, reason it cannot be followed)."""
    seg = axis.segment
    v0, v1 = seg.offset, seg.offset + _video_len(axis)
    layout = list(axis.layout)
    if stop <= v0 or start >= v1:
        layout[dim] = other_dim(stop - start)
        return axis.with_layout(layout, segment=None), None
    if start <= v0 and stop >= v1:
        if (start, stop) == (v0, v1):
            layout[dim] = (Factor(TOK, v1 - v0),)
            return axis.with_layout(layout, segment=None), None
        layout[dim] = (Factor(JOINT, stop - start),)
        return axis.with_layout(layout, segment=Segment(v0 - start, stop - start)), None
    return None, f"the range [{start}, {stop}) cuts through the video tokens at [{v0}, {v1})"


def _video_len(axis: TokenAxis) -> int:
    t, h, w = axis.grid
    return int(t * h * w)
