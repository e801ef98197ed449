"""A reward curve as a PNG: with matplotlib when it is installed, else drawn by hand.

matplotlib is not a dependency of osp-compile; the fallback writes a plain PNG (zlib + numpy):
the per-iteration values in light blue, their running mean in dark blue, on axes with a grid line
at each quarter. It has no text, so the caller prints the numbers it shows.
"""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save_curve_png(path: str, values: Sequence[float], title: str = "mean reward", smooth: int = 10) -> str:
    """Plot `values` against iteration into `path`; returns which renderer drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(path, _draw(values, running_mean(values, smooth)))
        return "builtin"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(values, color="#9ecae1", label="per iteration")
    ax.plot(running_mean(values, smooth), color="#08519c", label=f"running mean ({smooth})")
    ax.set_xlabel("iteration")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _draw(raw: Sequence[float], smooth: Sequence[float], width: int = 640, height: int = 360,
          margin: int = 30) -> np.ndarray:
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    lo, hi = min(raw), max(raw)
    span = (hi - lo) or 1.0
    n = max(len(raw) - 1, 1)

    def to_px(i: float, v: float) -> tuple[float, float]:
        return (margin + i / n * (width - 2 * margin),
                height - margin - (v - lo) / span * (height - 2 * margin))

    for q in range(5):  # grid
        y = int(round(height - margin - q / 4 * (height - 2 * margin)))
        img[y, margin:width - margin] = (225, 225, 225)
    img[height - margin, margin:width - margin] = 0  # axes
    img[margin:height - margin + 1, margin] = 0
    for series, colour in ((raw, (158, 202, 225)), (smooth, (8, 81, 156))):
        points = [to_px(i, v) for i, v in enumerate(series)]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
            steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for s in np.linspace(0.0, 1.0, steps + 1):
                x, y = int(round(x0 + s * (x1 - x0))), int(round(y0 + s * (y1 - y0)))
                img[max(y - 1, 0):y + 1, max(x - 1, 0):x + 1] = colour
    return img


def _write_png(path: str, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT (filter 0 per row), IEND."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))
