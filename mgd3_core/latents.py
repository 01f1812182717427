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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch

from mgd3_core.data import DatasetError, ImageSource, UnreadableImageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
# Attributes written by this module; caller ``attrs`` may not change them.
_RESERVED = {
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


# --------------------------------------------------------------------------- partial stores & locking
def partial_path(path: Path) -> Path:
    """Where an unfinished store is written (never read as a store)."""
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def writer_lock(path: Path, timeout: float | None = 0.0) -> Iterator[None]:
    """Hold the exclusive writer lock of store ``path`` (``<path>.lock``, ``flock``).

    timeout: 0 = fail at once, None = wait as long as it takes, > 0 = wait up
    to that many seconds. Raises LatentStoreLockedError naming the holder.
    The lock file is left in place: removing it would let a third process lock
    a fresh inode while the second still holds the old one.
    """
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise LatentStoreLockedError(
                        f"{path}: another process ({holder}) is writing this latent store "
                        f"(lock {lock} held{f' for over {timeout:g} s' if timeout else ''}); wait for it "
                        "to finish, or stop it first. Two writers must never share a store."
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# --------------------------------------------------------------------------- hashing
def _hash_header(shape: tuple[int, ...], dtype: str) -> "hashlib._Hash":
    h = hashlib.sha256()
    h.update(json.dumps({"dtype": dtype, "shape": list(shape)}).encode())
    return h


def _hash_finish(h, index: list[str]) -> str:
    h.update(b"\0index\0")
    h.update("\n".join(index).encode("utf-8"))
    return h.hexdigest()


def content_hash(latents: np.ndarray, index: list[str]) -> str:
    """sha256 of (dtype, shape), the C-order latent bytes and the newline-joined index.

    Streaming over row blocks gives the same value (see ``_iter_rows``).
    """
    h = _hash_header(latents.shape, str(latents.dtype))
    h.update(np.ascontiguousarray(latents).tobytes())
    return _hash_finish(h, index)


def _iter_rows(ds: h5py.Dataset, rows: np.ndarray | None = None, block: int = 256) -> Iterator[np.ndarray]:
    """Blocks of ``ds`` (optionally only ``rows``, sorted), in order, bounded memory."""
    n = ds.shape[0]
    step = max(block, ds.chunks[0] if ds.chunks else block)
    for s in range(0, n, step):
        blk = ds[s:s + step]
        if rows is not None:
            sel = rows[(rows >= s) & (rows < s + step)] - s
            blk = blk[sel]
        yield blk


# --------------------------------------------------------------------------- writing
def _to_attr(value):
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _fsync(f: h5py.File) -> None:
    f.flush()
    with contextlib.suppress(Exception):  # not every HDF5 driver exposes a descriptor
        os.fsync(f.id.get_vfd_handle())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_partial(partial: Path, resume_key: str) -> h5py.File | None:
    """The partial file of this exact run, open for writing, or None (after deleting
    any unusable one: corrupt, truncated or written with other parameters)."""
    if not partial.exists():
        return None
    try:
        f = h5py.File(partial, "r+", locking="best-effort")
    except Exception as e:  # noqa: BLE001 - any failure to open means: start over
        log.warning("%s: unreadable partial latent store (%s); starting this class over", partial, e)
        partial.unlink()
        return None
    try:
        ok = (
            f.attrs.get("resume_key") == resume_key
            and {"latents", "index", "chunks_done", "item_ok"} <= set(f.keys())
        )
        if ok:
            f["chunks_done"][()]  # the flags must be readable
            return f
        log.warning("%s: partial latent store from other parameters; starting this class over", partial)
    except Exception as e:  # noqa: BLE001
        log.warning("%s: damaged partial latent store (%s); starting this class over", partial, e)
    f.close()
    partial.unlink()
    return None


def _encode_batch(
    source: ImageSource, class_id: str, split: str, ids: list[str],
    encode: Callable[[torch.Tensor], torch.Tensor], dtype: str,
) -> tuple[np.ndarray | None, list[int], list[tuple[str, str]]]:
    """Encode one batch. Returns (latents of the good items, their positions in
    ``ids``, (id, reason) of items that failed to decode)."""
    try:
        images = source.load(class_id, split, ids)
        good = list(range(len(ids)))
        failed: list[tuple[str, str]] = []
    except UnreadableImageError:
        if source.strict:
            raise
        # Rare: a file passed the listing checks but does not decode. Load the
        # batch one image at a time so only that file is dropped.
        parts, good, failed = [], [], []
        for i, item in enumerate(ids):
            try:
                parts.append(source.load(class_id, split, [item]))
                good.append(i)
            except UnreadableImageError as e:
                failed.append((item, e.reason))
        if not parts:
            return None, [], failed
        images = np.concatenate(parts)
    x = torch.from_numpy(images).to(torch.float32).div_(127.5).sub_(1.0)  # uint8 -> [-1, 1]
    with torch.inference_mode():
        z = encode(x)
    z = z.detach().to("cpu", torch.float32).numpy().astype(dtype, copy=False)
    if z.shape[0] != len(good) or z.ndim != 4:
        raise ValueError(f"encoder returned shape {tuple(z.shape)} for a batch of {len(good)} images; expected (B, C, h, w)")
    if not np.isfinite(z).all():
        bad = [ids[good[i]] for i in np.flatnonzero(~np.isfinite(z).reshape(len(z), -1).all(axis=1))]
        raise ValueError(
            f"encoder produced non-finite latents for item(s) {bad[:5]} of class {class_id!r}"
            f"{' (float16 overflow? set encode.dtype: float32)' if dtype == 'float16' else ''}"
        )
    return z, good, failed


def encode_class(
    source: ImageSource,
    class_id: str,
    split: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    path: Path,
    *,
    vae_fingerprint: str,
    scaling_factor: float,
    batch_size: int = 64,
    chunk_size: int = 256,
    dtype: str = "float32",
    attrs: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    lock_timeout: float | None = 0.0,
) -> LatentStoreInfo:
    """Encode every image of one class and split into the latent store ``path``.

    encode: images (B, C, H, W) float32 in [-1, 1] on the CPU -> latents
        (B, c, h, w), the posterior mean times ``scaling_factor`` (the
        callable moves data to its device). Called under
        ``torch.inference_mode()``, once per batch of at most ``batch_size``.
    chunk_size: rows per HDF5 chunk and per resume unit; batches never cross
        a chunk boundary.
    dtype: "float32" or "float16" storage.
    attrs: extra JSON-able attributes (creation parameters of the caller);
        part of the resume key, so keep volatile values (timestamps) out.
    progress: called as ``progress(done, total)`` in images after each batch
        (and once at the start with the rows resumed from a partial file).
    lock_timeout: see :func:`writer_lock`.

    Peak memory is one batch of images plus one chunk of latents, whatever the
    class size. Rewrites an existing complete store atomically. Items that
    fail to decode are left out (listed in the ``skipped_items`` attribute
    and in ``source.skipped``), unless ``source.strict``.
    """
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"encode.dtype {dtype!r} is not supported; use one of {DTYPES}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"encode.batch_size ({batch_size}) and encode.chunk_size ({chunk_size}) must be >= 1")
    extra = {k: _to_attr(v) for k, v in (attrs or {}).items()}
    clash = {k for k in extra if k in _RESERVED and k != "image_size"}
    if clash or ("image_size" in extra and extra["image_size"] != source.image_size):
        raise ValueError(f"attrs {sorted(clash) or ['image_size']} would overwrite the store's own attributes")
    ids = source.items(class_id, split)
    if not ids:
        raise DatasetError(f"class {class_id!r} has no items in split {split!r}; nothing to encode")
    n = len(ids)
    n_chunks = -(-n // chunk_size)
    params = {
        "format_version": FORMAT_VERSION, "vae_fingerprint": vae_fingerprint,
        "scaling_factor": float(scaling_factor), "image_size": source.image_size,
        "encoder_mode": "mean", "dataset_key": source.dataset_key, "class_id": class_id,
        "split": split, "dtype": dtype, "batch_size": batch_size, "chunk_size": chunk_size,
    }
    # Everything that changes the bytes of a chunk: a partial file written with
    # other values cannot be resumed.
    resume_key = hashlib.sha256(
        json.dumps([params, extra], sort_keys=True).encode() + b"\0" + "\n".join(ids).encode()
    ).hexdigest()
    partial = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with writer_lock(path, lock_timeout):
        f = _open_partial(partial, resume_key)
        try:
            done = np.zeros(n_chunks, bool) if f is None else f["chunks_done"][()].astype(bool)
            failed: list[tuple[str, str]] = []  # before the file exists (shape unknown yet)
            rows_done = sum(min(chunk_size, n - c * chunk_size) for c in np.flatnonzero(done))
            if progress is not None:
                progress(rows_done, n)
            for c in np.flatnonzero(~done):
                start, stop = c * chunk_size, min(n, (c + 1) * chunk_size)
                block, ok = None, np.ones(stop - start, np.uint8)
                for s in range(start, stop, batch_size):
                    batch = ids[s:min(stop, s + batch_size)]
                    z, good, bad = _encode_batch(source, class_id, split, batch, encode, dtype)
                    for i, (item, reason) in enumerate(bad):
                        ok[s - start + batch.index(item)] = 0
                        failed.append((item, reason))
                    if z is not None:
                        if f is None:
                            f = _create_partial(partial, ids, z.shape[1:], dtype, chunk_size, params, extra, resume_key)
                        if block is None:
                            block = np.zeros((stop - start, *z.shape[1:]), dtype)
                        block[np.asarray(good) + (s - start)] = z
                    rows_done += len(batch)
                    if progress is not None:
                        progress(rows_done, n)
                if f is None:
                    continue  # nothing decodable yet; these rows are recorded in ``failed``
                if block is not None:
                    f["latents"][start:stop] = block  # one whole HDF5 chunk: a raw-data write
                f["item_ok"][start:stop] = ok
                _fsync(f)  # rows on disk before the flag that vouches for them
                f["chunks_done"][c] = 1
                _fsync(f)
            if f is None:
                raise DatasetError(
                    f"class {class_id!r} (split {split!r}) has no decodable image: "
                    + "; ".join(f"{i}: {r}" for i, r in failed[:3])
                )
            if failed:
                # Rows that failed before the file existed were never flagged in it.
                pos = {item: i for i, item in enumerate(ids)}
                for item, _ in failed:
                    f["item_ok"][pos[item]] = 0
            info = _finalize(f, partial, path, ids)
            f = None
        finally:
            if f is not None:
                f.close()
    return info


def _create_partial(
    partial: Path, ids: list[str], latent_shape: tuple[int, ...], dtype: str, chunk_size: int,
    params: dict, extra: dict, resume_key: str,
) -> h5py.File:
    n = len(ids)
    f = h5py.File(partial, "w", locking="best-effort")
    # Allocate every chunk now: later writes then change raw data only, never
    # the file's metadata, which is what makes a killed writer's file reusable.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset("latents", shape=(n, *latent_shape), dtype=dtype,
                     chunks=(min(chunk_size, n), *latent_shape), dcpl=dcpl)
    f.create_dataset("index", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    for name, size in (("chunks_done", -(-n // chunk_size)), ("item_ok", n)):
        d = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        d.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset(name, shape=(size,), dtype="u1", dcpl=d, fillvalue=0)
    f.attrs.update(params)
    f.attrs.update(extra)
    f.attrs["latent_shape"] = list(latent_shape)
    f.attrs["resume_key"] = resume_key
    f.attrs["complete"] = False
    _fsync(f)
    return f


def _finalize(f: h5py.File, partial: Path, path: Path, ids: list[str]) -> LatentStoreInfo:
    """Mark the finished partial file complete and move it to ``path`` atomically.

    If some items failed to decode, their rows are dropped by streaming the
    good rows into a fresh file, which then takes the partial file's place.
    Closes ``f``.
    """
    ok = f["item_ok"][()].astype(bool)
    attrs = {k: v for k, v in f.attrs.items()}
    lat = f["latents"]
    if ok.all():
        rows, index, src, target = None, ids, f, f
    else:
        rows = np.flatnonzero(ok)
        index = [ids[i] for i in rows]
        skipped = [ids[i] for i in np.flatnonzero(~ok)]
        attrs["skipped_items"] = json.dumps(skipped)
        log.warning("%s: %d item(s) failed to decode and are left out: %s", path, len(skipped), skipped[:10])
        tmp = path.with_name(path.name + ".assembling")
        target = h5py.File(tmp, "w", locking="best-effort")
        out = target.create_dataset("latents", shape=(len(rows), *lat.shape[1:]), dtype=lat.dtype,
                                    chunks=(max(1, min(lat.chunks[0], len(rows))), *lat.shape[1:]))
        target.create_dataset("index", data=np.asarray(index, dtype=object), dtype=h5py.string_dtype("utf-8"))
        at = 0
        for blk in _iter_rows(lat, rows):
            out[at:at + len(blk)] = blk
            at += len(blk)
    shape = (len(index), *lat.shape[1:])
    h = _hash_header(shape, str(lat.dtype))
    for blk in _iter_rows(lat, rows):
        h.update(np.ascontiguousarray(blk).tobytes())
    digest = _hash_finish(h, index)
    attrs.setdefault("skipped_items", "[]")
    attrs.update(n=len(index), content_hash=digest, complete=True)
    attrs.pop("resume_key", None)
    target.attrs.update(attrs)
    if "resume_key" in target.attrs:
        del target.attrs["resume_key"]
    if target is f:  # the final file holds only what readers need
        del f["chunks_done"], f["item_ok"]
    _fsync(target)
    vae_fp = str(attrs["vae_fingerprint"])
    dtype = str(lat.dtype)
    if target is not f:
        tmp_name = target.filename
        target.close()
        f.close()
        os.replace(tmp_name, path)
        partial.unlink()
    else:
        f.close()
        os.replace(partial, path)
    _fsync_dir(path.parent)
    return LatentStoreInfo(path=path, n=len(index), shape=shape, dtype=dtype, content_hash=digest,
                           vae_fingerprint=vae_fp)


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
    h = _hash_header(lat.shape, str(lat.dtype))
    at = 0
    for blk in blocks:
        if not np.isfinite(blk).all():
            row = at + int(np.flatnonzero(~np.isfinite(blk).reshape(len(blk), -1).all(axis=1))[0])
            raise _fail(path, f"latents contain NaN or infinity (first at row {row}, item {index[row]!r})")
        h.update(np.ascontiguousarray(blk).tobytes())
        at += len(blk)
    digest = _hash_finish(h, index)
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
            digest = _check_values(path, f, _iter_rows(f["latents"]), index)
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
