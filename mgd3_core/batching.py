"""Bounded memory: images streamed from disk in batches, batch sizes from a memory budget.

Two things grow with a dataset or its image size and must not decide whether a
run fits: the images of a split (ImageNette's training split is ~1.9 GB as
uint8 at 256 px, ImageNet-1K's ~250 GB) and the activations of a batch (a
ConvNet-6's first activation is 32 MiB per 256 px image, so a batch of 500 is
~17 GB). Hence:

- :class:`SplitImages`: one split of a dataset, all classes, as an indexable
  sequence that reads only the requested images from disk (uint8
  ``(B, C, H, W)``); nothing but the item ids and labels is kept.
- :func:`activation_bytes` measures, with one probe image, what a model's
  activations cost per image; :func:`batch_size_for` turns a memory budget
  (``evaluation.memory_budget_mb``) into a batch size. Larger images therefore
  get smaller batches, and the same budget fits a 32 px MNIST run and a 256 px
  ImageNet run.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

MIB = 1 << 20


class SplitImages:
    """All classes of one split, read lazily: ``len``, ``shape``, ``labels`` and ``x[idx]``.

    ``x[idx]`` (an int, a slice, or a sequence / array / tensor of positions)
    returns uint8 ``(B, C, H, W)`` as a tensor, decoded from the dataset files
    in the requested order. ``labels`` are class positions (``ClassInfo.index``),
    int64 ``(N,)``. Positions run class by class in the dataset's class order,
    items in ``source.items`` order.
    """

    def __init__(self, source, split: str):
        self.source = source
        self.split = split
        self.refs: list[tuple[str, str]] = []
        labels = []
        for info in source.classes():
            ids = source.items(info.id, split)
            self.refs += [(info.id, i) for i in ids]
            labels += [info.index] * len(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.shape = (len(self.refs), source.channels, source.image_size, source.image_size)
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return len(self.refs)

    def _positions(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            return np.arange(len(self))[idx]
        if isinstance(idx, (int, np.integer)):
            return np.asarray([idx])
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        pos = np.asarray(idx, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"positions out of range for a split of {len(self)} images")
        return pos % max(len(self), 1)

    def __getitem__(self, idx) -> torch.Tensor:
        pos = self._positions(idx)
        out = np.empty((len(pos), *self.shape[1:]), dtype=np.uint8)
        # One load call per class (the sources read one class at a time), results put back in order.
        by_class: dict[str, list[int]] = {}
        for j, p in enumerate(pos):
            by_class.setdefault(self.refs[p][0], []).append(j)
        for class_id, js in by_class.items():
            out[js] = self.source.load(class_id, self.split, [self.refs[pos[j]][1] for j in js])
        return torch.from_numpy(out)


def iter_batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive uint8 batches of an in-memory array/tensor or a :class:`SplitImages`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        yield torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch


def digest(*arrays, batch_size: int = 256) -> str:
    """sha256 of arrays (dtype, shape, then bytes), streaming a :class:`SplitImages` in batches.

    Equal to hashing the materialized arrays, so a run key does not depend on
    whether the images were in memory or on disk.
    """
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, SplitImages):
            h.update(f"uint8{a.shape}".encode())
            for batch in iter_batches(a, batch_size):
                h.update(batch.numpy().tobytes())
            continue
        a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- memory budget
_ACTIVATION_CACHE: dict[tuple, int] = {}


@torch.no_grad()
def activation_bytes(model: nn.Module, shape: Sequence[int], *, training: bool) -> int:
    """Bytes of activations one image of ``shape`` = (C, H, W) costs in ``model`` (float32).

    Measured with forward hooks on a probe batch of two images (on the CPU, once per
    model class and shape): training keeps every leaf module's output for the
    backward pass, so it is their sum (x2 for the gradients flowing back);
    inference holds about two consecutive outputs at a time, so it is the
    largest output x2 (x3 leaves room for the layer's input and workspace).
    """
    key = (type(model).__name__, sum(p.numel() for p in model.parameters()), tuple(shape), training)
    if key in _ACTIVATION_CACHE:
        return _ACTIVATION_CACHE[key]
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * 4 if torch.is_tensor(o) else 0))
             for m in model.modules() if not list(m.children())]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        # Two probe images: per-channel norms refuse a single value per channel (1x1 maps, batch 1).
        model(torch.zeros((2, *shape), dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = (2 * sum(sizes) if training else 3 * max(sizes, default=0)) // 2  # per image
    _ACTIVATION_CACHE[key] = max(int(total), 1)
    return _ACTIVATION_CACHE[key]


def batch_size_for(budget_mb: float, per_image_bytes: int, cap: int | None = None) -> int:
    """Images per batch whose activations fit ``budget_mb`` MiB: at least 1, at most ``cap``."""
    if budget_mb <= 0:
        raise ValueError(f"memory budget must be > 0 MiB, got {budget_mb} (evaluation.memory_budget_mb)")
    n = max(1, int(budget_mb * MIB // max(per_image_bytes, 1)))
    return min(n, cap) if cap is not None else n


def model_batch_size(model: nn.Module, shape: Sequence[int], budget_mb: float, *, training: bool,
                     cap: int | None = None) -> int:
    """:func:`batch_size_for` with the model's measured :func:`activation_bytes`."""
    return batch_size_for(budget_mb, activation_bytes(model, shape, training=training), cap)
