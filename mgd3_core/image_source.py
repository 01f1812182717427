"""The dataset interface every source implements (``ImageSource``), its errors, class
lists, splits and the preprocessing shared by the sources (see ``data.py`` for the
sources, the split rules and ``open_dataset``)."""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DatasetConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "val", "fit")

# Bump when the pixels ``load`` returns for the same file and config change
# (resampling, padding, alpha handling...): it is part of ``dataset_key`` and
# so of every latent store path.
PREPROCESS_VERSION = 1

# PIL's own default limit (Image.MAX_IMAGE_PIXELS), restated so that another
# library changing the global cannot change which files this module accepts.
DEFAULT_MAX_PIXELS = 89_478_485



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
            f"{display_path(path)}: cannot be decoded ({reason}); fix or remove the file"
        )


@dataclass(frozen=True)
class ClassListing:
    """Which files one class has: the one listing every stage reads a class through.

    ``items``: the sorted item ids of each base split (``"train"``, ``"test"``);
    ``files``: for a source read from files, each item's file per split (empty for
    packaged or generated sources, whose content their ``dataset_key`` fixes);
    ``skipped``: ``(path, reason)`` of every entry under the class's folders that was
    left out. Computed once per source and class (:meth:`ImageSource.listing`): the
    content key hashes exactly ``files``, the encoder, the real-image sets, the
    students and the report read ``items``.
    """

    class_id: str
    items: dict[str, tuple[str, ...]]
    files: dict[str, dict[str, Path]]
    skipped: tuple[tuple[str, str], ...] = ()


def display_path(path) -> str:
    """A path as text that can always be written (UTF-8, JSON, a log line): bytes that are
    not valid UTF-8 in a file name are shown as ``\\xe9`` escapes instead of failing."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


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
    elif not _encodable(value):
        bad = "it is not valid UTF-8"
    elif len(value.encode("utf-8")) > 255:
        bad = "it is longer than 255 bytes"
    if bad:
        raise DatasetError(
            f"{what} {value!r} cannot be used as a file or folder name: {bad}; "
            "rename the folder or give the class a different name in dataset.classes"
        )
    return value


def _encodable(value: str) -> bool:
    """False for a name with bytes that are not UTF-8 (they arrive from the OS as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def rank_items(split_seed: int, salt: str, class_id: str, item_ids: list[str]) -> list[str]:
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


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
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


def to_array(im: Image.Image, channels: int) -> np.ndarray:
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
        self._listings: dict[str, ClassListing] = {}
        self._set_cache: dict[tuple[str, str], frozenset[str]] = {}

    # -- to implement
    @abstractmethod
    def classes(self) -> list[ClassInfo]:
        """Every class in order (``ClassInfo.index`` = position)."""

    @abstractmethod
    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        """Sorted item ids of a class in ``"train"`` or ``"test"`` (read through :meth:`listing`)."""

    def _list_class(self, info: ClassInfo) -> ClassListing:
        """The class's listing; sources read from files override this (and list files there only)."""
        return ClassListing(info.id, {s: tuple(sorted(self._base_items(info, s))) for s in ("train", "test")},
                            {"train": {}, "test": {}})

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

    def listing(self, class_id: str) -> ClassListing:
        """Which files the class has in each split and which were skipped, and why
        (:class:`ClassListing`); listed once per source, on first use."""
        info = self.class_info(class_id)
        if class_id not in self._listings:
            self._listings[class_id] = self._list_class(info)
        return self._listings[class_id]

    def items(self, class_id: str, split: str) -> list[str]:
        """Sorted item ids of one class in one split (see the module docstring)."""
        self.class_info(class_id)
        split = _check_split(split)
        key = (class_id, split)
        if key not in self._split_cache:
            if split in ("train", "test"):
                ids = list(self.listing(class_id).items[split])
            else:
                train = self.items(class_id, "train")
                n_val = validation_size(len(train), self.cfg.validation_fraction)
                val = set(rank_items(self.cfg.split_seed, "val", class_id, train)[:n_val])
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

    def class_folders(self, class_id: str) -> dict[str, Path]:
        """{split: folder} holding one class's image files ("train", "test"); empty when
        the content is fixed by ``dataset_key`` (a packaged or generated dataset)."""
        self.class_info(class_id)
        return {}

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


def class_list(cfg: DatasetConfig, available: list[str], names: dict[str, str], where: str) -> list[ClassInfo]:
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
