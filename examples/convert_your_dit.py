"""Convert your own video DiT: a walk-through on a model defined right here.

`MyVideoDiT` below is written the way someone else might write a DiT - nothing in it knows about
osp-compile:
  * its own names (`tokenizer`, `layers`, `mixer`, `to_qkv`, ...);
  * a per-frame Conv2d patchifier: frames are folded into the batch, as in CogVideoX;
  * joint attention: the caption tokens are prepended to the video tokens and attend with them;
  * attention spelled out as matmul -> softmax -> matmul on [batch, heads, tokens, dim].
osp-compile finds the token grid from the Conv2d, follows the video tokens through the concat with
the caption, rewrites every matmul-softmax-matmul chain to one attention call and makes the sparse
sites Skiparse-2D joint attention (a video query sees every caption token and its own subsequence).

Run it:
    python examples/convert_your_dit.py --html my_dit.html
or inspect it from the command line (from the repository root):
    osp-compile inspect --model examples.convert_your_dit:build --num-full-blocks 2 --html my_dit.html
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from osp_compile import OSPConfig, convert
from osp_compile.visualize.page import write_report


class Mixer(nn.Module):
    """Joint self-attention over [caption | video] tokens, written with plain matmuls."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.to_qkv = nn.Linear(width, 3 * width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.to_out((weights @ v).transpose(1, 2).reshape(b, n, c))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pre_mix, self.pre_mlp = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mixer = Mixer(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.pre_mix(x))
        return x + self.mlp(self.pre_mlp(x))


class MyVideoDiT(nn.Module):
    """video [B, C, F, H, W] and caption [B, L, text_dim] -> a prediction shaped like the video."""

    def __init__(self, channels: int = 4, width: int = 32, heads: int = 2, depth: int = 4, text_dim: int = 16):
        super().__init__()
        self.tokenizer = nn.Conv2d(channels, width, kernel_size=2, stride=2)  # one frame at a time
        self.caption_in = nn.Linear(text_dim, width)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(depth))
        self.to_pixels = nn.Linear(width, channels * 4)

    def forward(self, video: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # frames into the batch
        tokens = self.tokenizer(frames).unflatten(0, (b, f))  # [B, F, width, h/2, w/2]
        tokens = tokens.flatten(3).transpose(2, 3).flatten(1, 2)  # [B, F*h/2*w/2, width], frame-major
        text = self.caption_in(caption)
        x = torch.cat([text, tokens], dim=1)  # caption first, then the video
        for layer in self.layers:
            x = layer(x)
        out = self.to_pixels(x[:, text.shape[1]:])  # the video tokens
        out = out.reshape(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(b, c, f, h, w)


def build(seed: int = 0) -> tuple[nn.Module, tuple, dict]:
    """The model and example inputs: a token grid (2, 8, 8) and 3 caption tokens.
    Also the entry point of `osp-compile inspect --model examples.convert_your_dit:build`."""
    torch.manual_seed(seed)
    model = MyVideoDiT()
    video, caption = torch.randn(1, 4, 2, 16, 16), torch.randn(1, 3, 16)
    return model, (video, caption), {}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", default=None, help="write the inspection page here")
    parser.add_argument("--out-dir", default=None, help="write its pictures as SVG files here")
    args = parser.parse_args(argv)

    # 1. convert: the first and last layer stay full attention, the two between are token-/group-wise
    model, inputs, kwargs = build()
    config = OSPConfig(sparse_ratio=2, layout="dual_end", num_full_blocks=2)
    converted = convert(model, inputs, kwargs, config)

    # 2. inspect: what the passes found and did (the same tables as `osp-compile inspect`)
    report = converted.osp_report
    print(report)
    if args.html or args.out_dir:
        write_report(report, config, args.html, args.out_dir, title="MyVideoDiT, converted")
        print(f"\nwrote {args.html or args.out_dir}")

    # 3. train one step: the converted module shares the model's parameters, so the optimizer
    #    updates the original weights (state_dict keys are the original's too)
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    video, caption = inputs
    target = torch.randn_like(video)
    loss = F.mse_loss(converted(video, caption), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = F.mse_loss(converted(video, caption), target)
    print(f"\none AdamW step on the converted module: loss {loss.item():.4f} -> {after.item():.4f}")
    return {"report": report, "loss_before": loss.item(), "loss_after": after.item()}


if __name__ == "__main__":
    main()
