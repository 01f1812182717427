"""``dataset.kind: imagefolder``: one folder per class (``<root>/<class>/<image>``), ImageNette-style
``train`` / ``val`` trees; files are checked (size, format, readable) before they are listed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DatasetConfig
from .image_source import (
    DEFAULT_MAX_PIXELS,
    PREPROCESS_VERSION,
    ClassInfo,
    ClassListing,
    DatasetError,
    ImageSource,
    UnreadableImageError,
    class_list,
    display_path,
    rank_items,
    resize_center_crop,
    to_array,
)

log = logging.getLogger(__name__)


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
        try:
            st = path.stat()
        except OSError as e:  # a dangling or looping symbolic link, a permission error
            return f"cannot be read ({e.strerror})"
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

    A class's files are listed in one place, :meth:`_list_class`, lazily, when the
    class is first used (``listing``, ``items``): both splits are walked and each file
    is checked with :func:`check_image_file` (headers only, no pixel decoding).
    Unusable files are listed in ``skipped`` (and the class's listing) or, with
    ``strict``, raise DatasetError. Hidden entries (names starting with ".") are
    ignored and listed too. Symbolic links to folders are followed; a folder
    reached a second time (a link loop) is listed as skipped, not walked again.

    Opening the tree checks its class folders: every class needs a folder in both
    splits, and a folder of the test split without a training folder is an error
    (its images would silently leave the evaluation).
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
        available = self._class_folders_in(dirs["train"])
        self._classes = class_list(cfg, available, {}, str(dirs["train"]))
        in_test = self._class_folders_in(dirs["test"])
        if cfg.class_specs() is None:  # every folder is a class: one only in the test split is an error
            orphans = [name for name in in_test if name not in set(available)]
            if orphans:
                folder = dirs["test"] / orphans[0]
                more = f" (and {len(orphans) - 1} more: {orphans[1:6]})" if len(orphans) > 1 else ""
                raise DatasetError(
                    f"{display_path(folder)} has no training folder ({display_path(dirs['train'] / orphans[0])} "
                    f"does not exist){more}: its test images would be left out of the evaluation; add the "
                    f"class's training images, move the folder out of {display_path(dirs['test'])}, or list "
                    "the classes to use in dataset.classes"
                )
        for info in self._classes:
            if info.id not in in_test:
                raise DatasetError(
                    f"class {info.id!r} ({info.name}) has no folder {dirs['test'] / info.id}; every class needs "
                    "a folder in both dataset.train_dir and dataset.test_dir"
                )
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.root.name).strip("-.")[:32] or "images"
        ident = json.dumps(
            [str(self.root), cfg.train_dir, cfg.test_dir, cfg.split_seed, cfg.max_per_class],
        )
        digest = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        self.dataset_key = f"{slug}-{cfg.image_size}px-c{cfg.channels}-{digest}-v{PREPROCESS_VERSION}"

    def _class_folders_in(self, split_dir: Path) -> list[str]:
        """Names of the class folders of one split (sorted); other entries go to ``skipped``."""
        names = []
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                self.skipped.append((entry.path, "hidden entry ignored"))
            elif not entry.is_dir():
                self.skipped.append((entry.path, "not a class folder (only folders are classes)"))
            else:
                names.append(entry.name)
        return names

    def classes(self) -> list[ClassInfo]:
        return list(self._classes)

    def class_folders(self, class_id: str) -> dict[str, Path]:
        self.class_info(class_id)
        return {split: self._dirs[split] / class_id for split in ("train", "test")}

    def _base_items(self, info: ClassInfo, split: str) -> list[str]:
        return list(self.listing(info.id).items[split])

    def _list_class(self, info: ClassInfo) -> ClassListing:
        """The one listing of a class's files (both splits): what every stage reads, the
        content key included. Walks each class folder, checks every candidate file, keeps
        the usable ones (up to ``max_per_class``, chosen in seeded order) and lists the
        rest in ``skipped`` with the reason."""
        items, files, skipped = {}, {}, []
        for split in ("train", "test"):
            d = self._dirs[split] / info.id
            candidates, left_out = [], []
            seen: set[tuple[int, int]] = set()

            def unreadable(err: OSError) -> None:
                left_out.append((str(err.filename), f"cannot be listed ({err.strerror})"))

            # Linked folders are followed (a class may gather images from elsewhere); a folder
            # reached twice (a link loop, or two links to one folder) is listed once.
            for dirpath, dirnames, filenames in os.walk(d, followlinks=True, onerror=unreadable):
                try:
                    st = os.stat(dirpath)
                except OSError as e:  # removed while walking
                    unreadable(e)
                    dirnames[:] = []
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    left_out.append((dirpath, "folder already listed (a symbolic link loop)"))
                    dirnames[:] = []
                    continue
                seen.add((st.st_dev, st.st_ino))
                for name in sorted(dirnames):
                    if name.startswith("."):
                        left_out.append((os.path.join(dirpath, name), "hidden entry ignored"))
                dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    if name.startswith("."):
                        left_out.append((str(path), "hidden entry ignored"))
                    elif not _utf8(str(path)):
                        left_out.append((str(path), "file name is not valid UTF-8"))
                    else:
                        candidates.append(path.relative_to(d).as_posix())
            cap = self.cfg.max_per_class
            # With a cap, check files in seeded order and stop once enough are usable:
            # a bad file is replaced by the next one instead of shrinking the class.
            order = rank_items(self.cfg.split_seed, "cap", info.id, candidates) if cap else sorted(candidates)
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
            for path, reason in bad:
                log.warning("skipped %s: %s", display_path(path), reason)
            if not good:
                detail = (f"; skipped {len(bad)}: " + "; ".join(f"{display_path(p)}: {r}" for p, r in bad[:3])
                          if bad else "")
                raise DatasetError(
                    f"class {info.id!r} ({info.name}) has no usable image in {d}{detail}; add images "
                    "or remove the class from dataset.classes"
                )
            items[split] = tuple(sorted(good))
            files[split] = {rel: d / rel for rel in items[split]}
            skipped += left_out + bad
            self.skipped.extend(left_out + bad)
        return ClassListing(info.id, items, files, tuple(skipped))

    def _load(self, info: ClassInfo, split: str, ids: list[str]) -> np.ndarray:
        files = self.listing(info.id).files[split]
        return np.stack([self._decode(files[i], i) for i in ids])

    def _decode(self, path: Path, item_id: str) -> np.ndarray:
        mode = "L" if self.channels == 1 else "RGB"
        try:
            with _open_image(path, self.max_pixels) as im:
                # JPEG: decode directly at a reduced scale that still covers image_size.
                im.draft(mode, (self.image_size, self.image_size))
                im = ImageOps.exif_transpose(im)
                im.load()
                im = _convert(im, mode)
            return to_array(resize_center_crop(im, self.image_size), self.channels)
        except Exception as e:  # noqa: BLE001 - every decode failure is reported the same way
            reason = str(e) if isinstance(e, _Refused) else f"{type(e).__name__}: {e}"
            if not self.strict:
                self.skipped.append((str(path), f"undecodable: {reason}"))
            raise UnreadableImageError(path, item_id, reason) from None


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
