"""The HDF5 latent store: one file per (dataset, VAE fingerprint, class).

Layout of a complete store (``<home>/latents/<dataset_key>/<vae_fp>/<class_id>.h5``):

- ``latents``: (N, C, h, w) float32 or float16, chunked along N: the VAE
  posterior mean times the scaling factor, one row per image;
- ``index``: (N,) UTF-8 item ids (``ImageSource.items`` order, minus any
  file that failed to decode);
- attributes: ``complete`` (True, the completion marker), ``format_version``,
  ``vae_fingerprint``, ``scaling_factor``, ``image_size``, ``encoder_mode``
  ("mean"), ``dataset_key``, ``class_id``, ``split``, ``n``, ``dtype``,
  ``batch_size``, ``chunk_size``, ``content_hash``, ``skipped_items`` (JSON)
  and any caller attributes.

Writing is crash-safe and resumable. The writer holds an exclusive ``flock``
on ``<store>.lock`` for the whole run, so two processes never write one file.
It fills ``<store>.partial`` one chunk of ``chunk_size`` rows at a time: every
HDF5 chunk is allocated when the file is created, so later writes touch raw
data only, never HDF5 metadata, and a ``kill -9`` cannot leave the file's
structure half-updated. After a chunk's rows are written the file is flushed
and fsynced, and only then is the chunk's flag in ``chunks_done`` set (and
flushed again). A rerun with the same parameters reopens the partial file and
encodes only chunks whose flag is unset; batches always start at chunk
boundaries, so a resumed store is bit-for-bit the store of an uninterrupted
run. A partial file that does not open, or was written with other parameters,
is deleted and the class starts over. Only a finished file gets
``complete = True`` and is atomically renamed to the store's name; a reader
never sees a partly written store under that name.

This module reads and validates stores; ``latent_writer.py`` writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
# Attributes written by this module; caller ``attrs`` may not change them.
RESERVED_ATTRS = {
    "complete", "format_version", "vae_fingerprint", "scaling_factor", "image_size", "encoder_mode",
    "dataset_key", "class_id", "split", "n", "dtype", "batch_size", "chunk_size", "content_hash",
    "skipped_items", "resume_key", "latent_shape",
}


class LatentStoreError(RuntimeError):
    """A latent store that is missing, incomplete, corrupt or from another VAE.

    The message names the file and the mismatch and says what to do.
    """


class LatentStoreLockedError(LatentStoreError):
    """Another process holds the writer lock of this store."""


@dataclass(frozen=True)
class LatentStoreInfo:
    """Summary of a complete store: what asset metadata and data versions need.

    shape: (N, C, h, w); content_hash: sha256 hex of dtype, shape, latent
    bytes and index (see :func:`content_hash`).
    """

    path: Path
    n: int
    shape: tuple[int, ...]
    dtype: str
    content_hash: str
    vae_fingerprint: str


@dataclass
class LatentStore:
    """A store read into memory: latents (N, C, h, w), index (N,) item ids, attrs."""

    path: Path
    latents: np.ndarray
    index: list[str]
    attrs: dict = field(default_factory=dict)
    info: LatentStoreInfo | None = None

    def select(self, ids: list[str]) -> np.ndarray:
        """Latents of the given item ids, in that order: (len(ids), C, h, w).

        E.g. ``store.select(source.items(cls, "fit"))`` for the training rows
        that exclude the validation subset.
        """
        pos = {item: i for i, item in enumerate(self.index)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise LatentStoreError(
                f"{self.path}: item id(s) {missing[:5]} are not in the store ({len(missing)} missing); "
                "they were skipped when encoding or the dataset changed: re-materialize the store"
            )
        return self.latents[[pos[i] for i in ids]]


# --------------------------------------------------------------------------- partial stores
def partial_path(path: Path) -> Path:
    """Where an unfinished store is written (never read as a store)."""
    return path.with_name(path.name + ".partial")


# --------------------------------------------------------------------------- hashing
def hash_header(shape: tuple[int, ...], dtype: str) -> "hashlib._Hash":
    h = hashlib.sha256()
    h.update(json.dumps({"dtype": dtype, "shape": list(shape)}).encode())
    return h


def hash_finish(h, index: list[str]) -> str:
    h.update(b"\0index\0")
    h.update("\n".join(index).encode("utf-8"))
    return h.hexdigest()


def content_hash(latents: np.ndarray, index: list[str]) -> str:
    """sha256 of (dtype, shape), the C-order latent bytes and the newline-joined index.

    Streaming over row blocks gives the same value (see ``iter_rows``).
    """
    h = hash_header(latents.shape, str(latents.dtype))
    h.update(np.ascontiguousarray(latents).tobytes())
    return hash_finish(h, index)


def iter_rows(ds: h5py.Dataset, rows: np.ndarray | None = None, block: int = 256) -> Iterator[np.ndarray]:
    """Blocks of ``ds`` (optionally only ``rows``, sorted), in order, bounded memory."""
    n = ds.shape[0]
    step = max(block, ds.chunks[0] if ds.chunks else block)
    for s in range(0, n, step):
        blk = ds[s:s + step]
        if rows is not None:
            sel = rows[(rows >= s) & (rows < s + step)] - s
            blk = blk[sel]
        yield blk


# --------------------------------------------------------------------------- reading
def _fail(path: Path, what: str) -> LatentStoreError:
    return LatentStoreError(f"{path}: {what}; delete the file and re-materialize the latent store")


def _open_checked(path: Path, expected_vae_fingerprint: str | None) -> h5py.File:
    """Open a store and check everything but the latent values; the caller closes it."""
    path = Path(path)
    if not path.is_file():
        if partial_path(path).exists():
            raise LatentStoreError(
                f"{path} does not exist, only its unfinished {partial_path(path).name}: encoding was "
                "interrupted; re-materialize the latent store to resume it"
            )
        raise LatentStoreError(f"{path} does not exist; materialize the latent store of this class first")
    try:
        f = h5py.File(path, "r", locking="best-effort")
    except Exception as e:  # noqa: BLE001 - h5py raises OSError and others for damaged files
        raise _fail(path, f"cannot be opened as HDF5, the file is truncated or corrupt ({e})") from None
    try:
        a = f.attrs
        complete = a.get("complete")
        if not (isinstance(complete, (bool, np.bool_)) and complete):
            raise _fail(path, "has no completion marker (complete = True): it was never finished")
        if a.get("format_version") != FORMAT_VERSION:
            raise _fail(path, f"has format_version {a.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        for name in ("latents", "index"):
            if name not in f:
                raise _fail(path, f"has no {name!r} dataset")
        lat, idx = f["latents"], f["index"]
        if lat.ndim != 4:
            raise _fail(path, f"latents have shape {lat.shape}, expected (N, C, h, w)")
        if idx.ndim != 1 or idx.shape[0] != lat.shape[0]:
            raise _fail(path, f"index has shape {idx.shape} but latents have N = {lat.shape[0]} rows")
        if a.get("n") != lat.shape[0]:
            raise _fail(path, f"attribute n = {a.get('n')} but latents have {lat.shape[0]} rows")
        if str(lat.dtype) not in DTYPES or str(lat.dtype) != a.get("dtype"):
            raise _fail(path, f"latents have dtype {lat.dtype}, attribute dtype = {a.get('dtype')!r}; "
                        f"expected one of {DTYPES}")
        fp = a.get("vae_fingerprint")
        if expected_vae_fingerprint is not None and fp != expected_vae_fingerprint:
            raise LatentStoreError(
                f"{path}: encoded with VAE fingerprint {fp!r}, but the current VAE has fingerprint "
                f"{expected_vae_fingerprint!r}; re-materialize the latent store with the current VAE"
            )
    except Exception:
        f.close()
        raise
    return f


def _check_values(path: Path, f: h5py.File, blocks: Iterator[np.ndarray], index: list[str]) -> str:
    """Finiteness and content hash over ``blocks``; returns the hash."""
    lat = f["latents"]
    h = hash_header(lat.shape, str(lat.dtype))
    at = 0
    for blk in blocks:
        if not np.isfinite(blk).all():
            row = at + int(np.flatnonzero(~np.isfinite(blk).reshape(len(blk), -1).all(axis=1))[0])
            raise _fail(path, f"latents contain NaN or infinity (first at row {row}, item {index[row]!r})")
        h.update(np.ascontiguousarray(blk).tobytes())
        at += len(blk)
    digest = hash_finish(h, index)
    if digest != f.attrs.get("content_hash"):
        raise _fail(path, "content hash does not match the one recorded at writing: the file was changed or damaged")
    return digest


def _read_index(f: h5py.File) -> list[str]:
    return [s for s in f["index"].asstr()[()]]


def _info(path: Path, f: h5py.File, digest: str) -> LatentStoreInfo:
    lat = f["latents"]
    return LatentStoreInfo(path=Path(path), n=lat.shape[0], shape=tuple(lat.shape), dtype=str(lat.dtype),
                           content_hash=digest, vae_fingerprint=str(f.attrs["vae_fingerprint"]))


def validate_latent_store(path: Path, expected_vae_fingerprint: str | None = None) -> LatentStoreInfo:
    """Check a store end to end without holding it in memory.

    Checks the completion marker, format version, shapes (latents N = index
    N = attribute n), dtype, VAE fingerprint (when given), finiteness and the
    recorded content hash. Raises LatentStoreError naming the file and the
    mismatch.
    """
    path = Path(path)
    f = _open_checked(path, expected_vae_fingerprint)
    try:
        index = _read_index(f)
        try:
            digest = _check_values(path, f, iter_rows(f["latents"]), index)
        except LatentStoreError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged chunks surface as OSError on read
            raise _fail(path, f"latent data cannot be read ({e})") from None
        return _info(path, f, digest)
    finally:
        f.close()


def read_latent_store(path: Path, *, expected_vae_fingerprint: str | None = None) -> LatentStore:
    """Read and validate a whole store (the checks of :func:`validate_latent_store`)."""
    path = Path(path)
    f = _open_checked(path, expected_vae_fingerprint)
    try:
        index = _read_index(f)
        try:
            latents = f["latents"][()]
        except Exception as e:  # noqa: BLE001
            raise _fail(path, f"latent data cannot be read ({e})") from None
        digest = _check_values(path, f, iter([latents]), index)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        return LatentStore(path=path, latents=latents, index=index, attrs=attrs, info=_info(path, f, digest))
    finally:
        f.close()
