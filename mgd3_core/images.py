"""Image conversions shared by the pipeline, the students, the report and the UI.

Images in the core are uint8 arrays ``(N, C, H, W)`` with C in {1, 3}; model
outputs are floats in [-1, 1] (a VAE decode).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def uint8_from_signed(images: torch.Tensor) -> torch.Tensor:
    """Float ``(N, C, H, W)`` in [-1, 1] (e.g. VAE decodes) -> uint8 on the CPU, rounded
    to the nearest level (what a PNG write stores)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """:func:`uint8_from_signed` as a numpy array (N, C, H, W)."""
    return uint8_from_signed(images).numpy()


def _check_chw(image: np.ndarray, what: str, ndim: int) -> None:
    if image.dtype != np.uint8 or image.ndim != ndim or image.shape[-3] not in (1, 3):
        shape = "(C, H, W)" if ndim == 3 else "(N, C, H, W)"
        raise ValueError(f"{what}: expected uint8 {shape} images with C in (1, 3), got {image.dtype} {image.shape}")


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 (C, H, W), C in {1, 3} -> a PIL image ("L" or "RGB")."""
    _check_chw(image, "to_pil", 3)
    return Image.fromarray(image[0], "L") if image.shape[0] == 1 else Image.fromarray(image.transpose(1, 2, 0), "RGB")


def png_bytes(image: np.ndarray | Image.Image, optimize: bool = False) -> bytes:
    """PNG bytes of a uint8 (C, H, W) array or a PIL image (deterministic: no metadata)."""
    pil = image if isinstance(image, Image.Image) else to_pil(np.asarray(image))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()


def read_png(path) -> np.ndarray:
    """PNG -> uint8 (C, H, W)."""
    with Image.open(path) as im:
        a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _resized(image: np.ndarray, cell: int) -> np.ndarray:
    """One (C, H, W) tile scaled so its longer side is ``cell`` px: nearest neighbour when
    enlarging (crisp pixels of small images), Lanczos when shrinking."""
    c, h, w = image.shape
    scale = cell / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    if (th, tw) == (h, w):
        return image
    tile = to_pil(image).resize((tw, th), Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    a = np.asarray(tile)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def image_grid(images, nrow: int = 10, padding: int = 2, pad_value: int = 255,
               cell: int | None = None) -> Image.Image:
    """Tile uint8 images ``(N, C, H, W)`` (C = 1 or 3) into a PIL image, ``nrow`` per row,
    ``padding`` px of ``pad_value`` around each; ``cell``: scale each tile to that many px
    on its longer side first (thumbnails)."""
    arr = np.asarray(images)
    _check_chw(arr, "image_grid", 4)
    if nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    if cell is not None and len(arr):
        arr = np.stack([_resized(a, cell) for a in arr])
    n, c, h, w = arr.shape
    if cell is not None and n == 0:
        h = w = cell
    cols = min(nrow, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        canvas[:, top:top + h, left:left + w] = arr[i]
    return Image.fromarray(canvas[0], "L") if c == 1 else Image.fromarray(canvas.transpose(1, 2, 0), "RGB")
