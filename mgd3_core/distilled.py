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

from . import storage
from .files import atomic_output, atomic_write
from .images import png_bytes, read_png

MANIFEST_COLUMNS = [
    "file", "set", "method", "ipc", "gen_seed", "class_id", "class_name", "class_label",
    "mode_index", "mode_count", "seed", "lambda", "t_stop", "cfg_scale", "cfg_channels", "steps", "sampler",
    "dist_to_mode", "dist_to_nearest_other_mode", "source_item", "backbone_fingerprint",
    "config", "sha256",
]
# Text-to-image backbones only: a set written with a prompt gets these columns too (after the
# others), so the manifests of class-conditional backbones keep exactly MANIFEST_COLUMNS.
PROMPT_COLUMNS = ["prompt", "negative_prompt"]


# Method variants only (``config_methods``): the base method a variant runs and the mode finder
# whose modes it used (``config_methods.finder_key``); the six base methods' manifests keep
# exactly MANIFEST_COLUMNS.
VARIANT_COLUMNS = ["method_kind", "mode_finder"]


def manifest_columns(rows: list[dict]) -> list[str]:
    """MANIFEST_COLUMNS, plus VARIANT_COLUMNS for a variant's rows and PROMPT_COLUMNS when the rows
    carry a prompt."""
    return (MANIFEST_COLUMNS + (VARIANT_COLUMNS if any("method_kind" in r for r in rows) else [])
            + (PROMPT_COLUMNS if any("prompt" in r for r in rows) else []))


class DistilledSetError(ValueError):
    """A distilled set that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class DistilledClass:
    """One class of one distilled set, as written."""

    set_dir: Path
    class_id: str
    files: list[Path]
    manifest: Path
    content_hash: str


def write_distilled_class(
    set_root: Path,
    class_id: str,
    images: np.ndarray,
    latents: np.ndarray | None,
    rows: list[dict],
) -> DistilledClass:
    """Write one class of a distilled set atomically.

    images: uint8 (k, C, H, W); latents: (k, C, h, w) or None; rows: k lineage
    dicts (``manifest_columns``; ``file`` and ``sha256`` are filled in here).
    """
    set_root = Path(set_root)
    if len(images) != len(rows) or (latents is not None and len(latents) != len(images)):
        raise DistilledSetError(
            f"class {class_id!r}: {len(images)} images, {len(rows)} manifest rows and "
            f"{None if latents is None else len(latents)} latents must all match"
        )
    manifest = storage.set_manifest_file(set_root, class_id)
    final_dir = storage.set_images_dir(set_root, class_id)
    staging_root = storage.set_staging_dir(set_root)
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
        with atomic_output(storage.set_latents_file(set_root, class_id)) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("latents", data=np.asarray(latents, dtype=np.float32))
            f.create_dataset("mode_index", data=np.asarray([r["mode_index"] for r in rows], dtype=np.int64))
    buf = io.StringIO()
    columns = manifest_columns(rows)
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    atomic_write(manifest, buf.getvalue().encode())
    return DistilledClass(set_root, class_id, files, manifest, h.hexdigest()[:16])


def read_manifest(set_root: Path, class_id: str) -> list[dict]:
    path = storage.set_manifest_file(set_root, class_id)
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
        p = storage.set_images_dir(set_root, class_id) / row["file"]
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
    set_root, class_id = storage.set_of_png(png)
    for row in read_manifest(set_root, class_id):
        if row["file"] == png.name:
            row = dict(row)
            row["verified"] = hashlib.sha256(png.read_bytes()).hexdigest() == row["sha256"]
            return row
    raise DistilledSetError(f"{png}: no row for this file in {storage.set_manifest_file(set_root, class_id)}")
