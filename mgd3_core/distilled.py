"""Distilled image sets on disk, and their lineage.

Layout of one set (one method, IPC and generation seed) under the storage root::

    <set>/images/<class_id>/<mode>.png   ImageFolder root: torchvision.datasets.ImageFolder(<set>/images)
    <set>/latents/<class_id>.h5          the set's latents (ipc, C, h, w)
    <set>/manifest/<class_id>.csv        one lineage row per image

A class is written atomically: its PNGs are staged outside the ImageFolder root
and renamed into place in one step, and the manifest (the completion marker) is
written last. A class without a manifest is incomplete, whatever else exists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

MANIFEST_COLUMNS = [
    "file", "set", "method", "ipc", "gen_seed", "class_id", "class_name", "class_label",
    "mode_index", "mode_count", "seed", "lambda", "t_stop", "cfg_scale", "steps", "sampler",
    "dist_to_mode", "dist_to_nearest_other_mode", "source_item", "backbone_fingerprint",
    "config", "sha256",
]


class DistilledSetError(ValueError):
    """A distilled set that is missing, incomplete or inconsistent."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) float -> uint8 (N, C, H, W)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) with C in {1, 3} -> PNG bytes (deterministic: no metadata)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a uint8 (C, H, W) image with C in (1, 3), got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[0], "L") if image.shape[0] == 1 else Image.fromarray(image.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: str | Path) -> np.ndarray:
    """PNG -> uint8 (C, H, W)."""
    with Image.open(path) as im:
        a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


@dataclass(frozen=True)
class DistilledClass:
    """One class of one distilled set, as written."""

    set_dir: Path
    class_id: str
    files: list[Path]
    manifest: Path
    content_hash: str


def set_dir(root: Path, method: str, ipc: int, gen_seed: int) -> Path:
    return Path(root) / method / f"ipc{ipc}" / f"seed{gen_seed}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_distilled_class(
    set_root: Path,
    class_id: str,
    images: np.ndarray,
    latents: np.ndarray | None,
    rows: list[dict],
) -> DistilledClass:
    """Write one class of a distilled set atomically.

    images: uint8 (k, C, H, W); latents: (k, C, h, w) or None; rows: k lineage
    dicts (MANIFEST_COLUMNS; ``file`` and ``sha256`` are filled in here).
    """
    set_root = Path(set_root)
    if len(images) != len(rows) or (latents is not None and len(latents) != len(images)):
        raise DistilledSetError(
            f"class {class_id!r}: {len(images)} images, {len(rows)} manifest rows and "
            f"{None if latents is None else len(latents)} latents must all match"
        )
    manifest = set_root / "manifest" / f"{class_id}.csv"
    final_dir = set_root / "images" / class_id
    staging_root = set_root / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"{class_id}."))
    try:
        h = hashlib.sha256()
        files = []
        for i, (img, row) in enumerate(zip(images, rows)):
            data = png_bytes(img)
            name = f"{i}.png"
            (stage / name).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            row.update(file=name, sha256=digest)
            h.update(digest.encode())
            files.append(final_dir / name)
        # The manifest goes first so a crash below leaves the class visibly incomplete.
        manifest.unlink(missing_ok=True)
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        if final_dir.exists():
            old = staging_root / f"{class_id}.old.{os.getpid()}"
            os.replace(final_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(stage, final_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if latents is not None:
        lat_path = set_root / "latents" / f"{class_id}.h5"
        lat_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lat_path.with_name(f".{lat_path.name}.{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("latents", data=np.asarray(latents, dtype=np.float32))
            f.create_dataset("mode_index", data=np.asarray([r["mode_index"] for r in rows], dtype=np.int64))
        os.replace(tmp, lat_path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in MANIFEST_COLUMNS})
    _atomic_write_bytes(manifest, buf.getvalue().encode())
    return DistilledClass(set_root, class_id, files, manifest, h.hexdigest()[:16])


def read_manifest(set_root: Path, class_id: str) -> list[dict]:
    path = Path(set_root) / "manifest" / f"{class_id}.csv"
    if not path.is_file():
        raise DistilledSetError(
            f"{path}: no manifest, so class {class_id!r} of this set is incomplete; re-materialize it"
        )
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_distilled_class(set_root: Path, class_id: str) -> tuple[np.ndarray, list[dict]]:
    """The images uint8 (k, C, H, W) of one complete class, checked against its manifest."""
    rows = read_manifest(set_root, class_id)
    images = []
    for row in rows:
        p = Path(set_root) / "images" / class_id / row["file"]
        if not p.is_file():
            raise DistilledSetError(f"{p}: listed in the manifest but missing; re-materialize the class")
        images.append(read_png(p))
    return np.stack(images) if images else np.zeros((0,), np.uint8), rows


def lineage_of(png: str | Path) -> dict:
    """Which class, mode, seed, settings and backbone produced this PNG?

    ``png`` is a file inside a distilled set (``<set>/images/<class>/<i>.png``).
    The answer is its manifest row, with ``verified`` telling whether the file's
    bytes still match the hash recorded when it was written.
    """
    png = Path(png).resolve()
    if png.parent.parent.name != "images":
        raise DistilledSetError(f"{png} is not inside a distilled set (<set>/images/<class>/<i>.png)")
    class_id, set_root = png.parent.name, png.parent.parent.parent
    for row in read_manifest(set_root, class_id):
        if row["file"] == png.name:
            row = dict(row)
            row["verified"] = hashlib.sha256(png.read_bytes()).hexdigest() == row["sha256"]
            return row
    raise DistilledSetError(f"{png}: no row for this file in {set_root / 'manifest' / (class_id + '.csv')}")
