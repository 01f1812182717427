"""Writing a latent store: encode one class into ``<store>.partial`` chunk by chunk, under
an exclusive writer lock, resumable after a crash, renamed into place when complete.
The format and the crash-safety argument are in ``latents.py``'s docstring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch

from .data import DatasetError, ImageSource, UnreadableImageError
from .latents import (
    DTYPES,
    FORMAT_VERSION,
    RESERVED_ATTRS,
    LatentStoreInfo,
    LatentStoreLockedError,
    hash_finish,
    hash_header,
    iter_rows,
    partial_path,
)
from .locks import LockedError, file_lock

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- locking
@contextlib.contextmanager
def writer_lock(path: Path, timeout: float | None = 0.0) -> Iterator[None]:
    """Hold the exclusive writer lock of store ``path`` (``<path>.lock``, see ``mgd3_core.locks``).

    timeout: 0 = fail at once, None = wait as long as it takes, > 0 = wait up
    to that many seconds. Raises LatentStoreLockedError naming the holder.
    """
    lock = path.with_name(path.name + ".lock")
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(lock, timeout))
    except LockedError as e:
        raise LatentStoreLockedError(
            f"{path}: another process ({e.holder}) is writing this latent store "
            f"(lock {lock} held{f' for over {timeout:g} s' if timeout else ''}); wait for it "
            "to finish, or stop it first. Two writers must never share a store."
        ) from None
    with held:
        yield


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
    extra = _checked_attrs(source, dtype, batch_size, chunk_size, attrs)
    ids = source.items(class_id, split)
    if not ids:
        raise DatasetError(f"class {class_id!r} has no items in split {split!r}; nothing to encode")
    n = len(ids)
    params = {
        "format_version": FORMAT_VERSION, "vae_fingerprint": vae_fingerprint,
        "scaling_factor": float(scaling_factor), "image_size": source.image_size,
        "encoder_mode": "mean", "dataset_key": source.dataset_key, "class_id": class_id,
        "split": split, "dtype": dtype, "batch_size": batch_size, "chunk_size": chunk_size,
    }
    resume_key = _resume_key(params, extra, ids)
    partial = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with writer_lock(path, lock_timeout):
        f = _open_partial(partial, resume_key)
        try:
            done = np.zeros(-(-n // chunk_size), bool) if f is None else f["chunks_done"][()].astype(bool)
            failed: list[tuple[str, str]] = []  # before the file exists (shape unknown yet)
            rows_done = [sum(min(chunk_size, n - c * chunk_size) for c in np.flatnonzero(done))]

            def on_batch(rows: int) -> None:
                rows_done[0] += rows
                if progress is not None:
                    progress(rows_done[0], n)

            on_batch(0)
            for c in np.flatnonzero(~done):
                start, stop = c * chunk_size, min(n, (c + 1) * chunk_size)
                block, ok, bad = _encode_chunk(source, class_id, split, ids[start:stop], encode, dtype,
                                               batch_size, on_batch)
                failed += bad
                if f is None and block is not None:
                    f = _create_partial(partial, ids, block.shape[1:], dtype, chunk_size, params, extra, resume_key)
                if f is None:
                    continue  # nothing decodable yet; these rows are recorded in ``failed``
                _write_chunk(f, c, start, stop, block, ok)
            if f is None:
                raise DatasetError(
                    f"class {class_id!r} (split {split!r}) has no decodable image: "
                    + "; ".join(f"{i}: {r}" for i, r in failed[:3])
                )
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


def _resume_key(params: dict, extra: dict, ids: list[str]) -> str:
    """Everything that changes the bytes of a chunk: a partial file written with other
    values cannot be resumed."""
    return hashlib.sha256(
        json.dumps([params, extra], sort_keys=True).encode() + b"\0" + "\n".join(ids).encode()
    ).hexdigest()


def _checked_attrs(source: ImageSource, dtype: str, batch_size: int, chunk_size: int, attrs: dict | None) -> dict:
    """The caller's extra attributes as HDF5 values, after checking the encode settings."""
    if dtype not in DTYPES:
        raise ValueError(f"encode.dtype {dtype!r} is not supported; use one of {DTYPES}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"encode.batch_size ({batch_size}) and encode.chunk_size ({chunk_size}) must be >= 1")
    extra = {k: _to_attr(v) for k, v in (attrs or {}).items()}
    clash = {k for k in extra if k in RESERVED_ATTRS and k != "image_size"}
    if clash or ("image_size" in extra and extra["image_size"] != source.image_size):
        raise ValueError(f"attrs {sorted(clash) or ['image_size']} would overwrite the store's own attributes")
    return extra


def _encode_chunk(source: ImageSource, class_id: str, split: str, chunk_ids: list[str],
                  encode: Callable[[torch.Tensor], torch.Tensor], dtype: str, batch_size: int,
                  on_batch: Callable[[int], None]) -> tuple[np.ndarray | None, np.ndarray, list[tuple[str, str]]]:
    """Encode one chunk's items in batches: (latents (rows, C, h, w), or None when nothing decoded;
    (rows,) uint8 ok flags; (id, reason) of the items that failed to decode)."""
    block, ok, failed = None, np.ones(len(chunk_ids), np.uint8), []
    for s in range(0, len(chunk_ids), batch_size):
        batch = chunk_ids[s:s + batch_size]
        z, good, bad = _encode_batch(source, class_id, split, batch, encode, dtype)
        for item, reason in bad:
            ok[s + batch.index(item)] = 0
            failed.append((item, reason))
        if z is not None:
            if block is None:
                block = np.zeros((len(chunk_ids), *z.shape[1:]), dtype)
            block[np.asarray(good) + s] = z
        on_batch(len(batch))
    return block, ok, failed


def _write_chunk(f: h5py.File, c: int, start: int, stop: int, block: np.ndarray | None, ok: np.ndarray) -> None:
    """Rows start:stop of chunk ``c``, then (once they are on disk) the chunk's done flag."""
    if block is not None:
        f["latents"][start:stop] = block  # one whole HDF5 chunk: a raw-data write
    f["item_ok"][start:stop] = ok
    _fsync(f)  # rows on disk before the flag that vouches for them
    f["chunks_done"][c] = 1
    _fsync(f)


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
        for blk in iter_rows(lat, rows):
            out[at:at + len(blk)] = blk
            at += len(blk)
    shape = (len(index), *lat.shape[1:])
    h = hash_header(shape, str(lat.dtype))
    for blk in iter_rows(lat, rows):
        h.update(np.ascontiguousarray(blk).tobytes())
    digest = hash_finish(h, index)
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
