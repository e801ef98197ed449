"""A dense Wan2.1-style video Diffusion Transformer, written as plain PyTorch.

This is the model osp-compile starts from: the compiler traces it with torch.fx and
rewrites it (sparse attention, sequence parallelism, low-precision linears). So it is
deliberately written the way a user would write it, with no tricks inside:

* every attention is one dense ``F.scaled_dot_product_attention(q, k, v)`` call on
  tensors laid out [B, heads, S, head_dim] (no mask, no dropout);
* tokens are frame-major, token i = (t*H + y)*W + x on the (T, H, W) token grid, because
  the patch embedding is ``Conv3d -> flatten(2) -> transpose(1, 2)`` as in Wan2.1;
* the 3D RoPE uses real cos/sin arithmetic (not complex numbers) so that it runs in
  bfloat16 and under torch.compile, with float32 tables built in ``forward`` from the
  token grid read off the patch-embedding output.

Module and parameter names follow the Wan2.1 reference code (``patch_embedding``,
``blocks.N.self_attn.q``, ``head.modulation``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WanConfig",
    "WanDiT",
    "WanBlock",
    "SelfAttention",
    "CrossAttention",
    "RMSNorm",
    "Head",
    "sinusoidal_embedding",
    "rope_axis_dims",
    "rope_cos_sin",
    "apply_rope",
]


@dataclass(frozen=True, kw_only=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1 DiT. Frozen, so the shared presets cannot be mutated;
    derive variants with ``dataclasses.replace``."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    cross_attn_norm: bool = True
    qk_norm: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if self.num_layers < 0:
            raise ValueError(f"num_layers={self.num_layers} must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# ----------------------------------------------------------------------------- helpers


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Timestep embedding [B] -> [B, dim] in float32: cos half first, then sin half."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = torch.outer(t.float(), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan2.1 splits head_dim between the t, h and w RoPE axes (each part even)."""
    d = head_dim
    return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


def rope_cos_sin(
    grid: tuple[int, int, int],
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """float32 cos/sin tables [T*H*W, 1, head_dim] for frame-major tokens on `grid`.

    Pair (2i, 2i+1) of a head is rotated by angle pos_axis * theta^(-2j/part), where the
    first pairs belong to the t axis, then h, then w, and pos_axis is the token's original
    (t, y, x) grid coordinate. Both entries of a pair share the angle, hence the
    repeat_interleave.
    """
    T, H, W = grid
    angles = []
    for axis, (n, part) in enumerate(zip((T, H, W), rope_axis_dims(head_dim))):
        pos = torch.arange(n, dtype=torch.float32, device=device)
        inv_freq = theta ** (-torch.arange(0, part, 2, dtype=torch.float32, device=device) / part)
        axis_angles = torch.outer(pos, inv_freq)  # [n, part // 2]
        shape = [1, 1, 1, part // 2]
        shape[axis] = n
        angles.append(axis_angles.view(shape).expand(T, H, W, part // 2))
    angles = torch.cat(angles, dim=-1).reshape(T * H * W, 1, head_dim // 2)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, S, heads, head_dim] by the tables [S, 1, head_dim].

    Computed in float32 and cast back to x's dtype.
    """
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    return (xf * cos + rotated * sin).type_as(x)


class RMSNorm(nn.Module):
    """RMS normalisation with a learned scale, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


# ----------------------------------------------------------------------------- layers


class _Attention(nn.Module):
    """q, k, v, o projections and the q/k RMSNorm that self- and cross-attention share."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_Attention):
    """Multi-head self-attention over the video tokens with q/k RMSNorm and 3D RoPE."""

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        b, s = x.shape[0], x.shape[1]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, s, n * d)
        return self.o(out)


class CrossAttention(_Attention):
    """Multi-head attention from the video tokens (queries) to the text tokens; no RoPE."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, s = x.shape[0], x.shape[1]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(b, -1, n, d).transpose(1, 2)
        v = self.v(context).view(b, -1, n, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, s, n * d)
        return self.o(out)


class WanBlock(nn.Module):
    """One DiT block: adaLN-modulated self-attention, cross-attention to text, adaLN FFN."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (
            nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation + e0).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope_cos, rope_sin) * gate_msa
        x = x + self.cross_attn(self.norm3(x), context)
        x = x + self.ffn(self.norm2(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp
        return x


class Head(nn.Module):
    """Final adaLN-modulated projection of each token to its patch of output channels."""

    def __init__(self, dim: int, out_channels: int, patch_size: tuple[int, int, int], eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


# ----------------------------------------------------------------------------- model


class WanDiT(nn.Module):
    """Dense Wan2.1 text-to-video DiT predicting the flow-matching velocity.

    forward(x [B, in_channels, F, Hl, Wl], t [B] in [0, 1000], context [B, L, text_dim])
    -> [B, out_channels, F, Hl, Wl]. F, Hl, Wl must be multiples of the patch size.
    """

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg.dim, cfg.out_channels, cfg.patch_size, cfg.eps)

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        cfg = self.config

        # Patchify: [B, C, F, Hl, Wl] -> [B, dim, T, H, W] -> frame-major tokens [B, T*H*W, dim].
        x = self.patch_embedding(x)
        grid_t, grid_h, grid_w = x.shape[2], x.shape[3], x.shape[4]
        x = x.flatten(2).transpose(1, 2)
        rope_cos, rope_sin = rope_cos_sin((grid_t, grid_h, grid_w), cfg.head_dim, cfg.rope_theta, device=x.device)

        # Timestep conditioning: e for the head, e0 = six modulation vectors per block.
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(x.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))

        context = self.text_embedding(context)

        for block in self.blocks:
            x = block(x, e0, context, rope_cos, rope_sin)

        x = self.head(x, e)
        return self.unpatchify(x, (grid_t, grid_h, grid_w))

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, T*H*W, out_channels * pt*ph*pw] -> [B, out_channels, T*pt, H*ph, W*pw]."""
        grid_t, grid_h, grid_w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        b = x.shape[0]
        x = x.view(b, grid_t, grid_h, grid_w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, T, pt, H, ph, W, pw
        return x.reshape(b, c, grid_t * pt, grid_h * ph, grid_w * pw)
