"""The HDF5 latent store: encoding, crash-safe resume, locking, validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mgd3_core.data import DatasetError, SyntheticSource, UnreadableImageError
from mgd3_core.storage import latent_store_path
from mgd3_core.latent_writer import encode_class, writer_lock
from mgd3_core.latents import (
    LatentStoreError,
    LatentStoreLockedError,
    content_hash,
    partial_path,
    read_latent_store,
    validate_latent_store,
)
from tests.latent_helpers import FINGERPRINT, RecordingEncoder, encode_synthetic, pool_encoder

ROOT = Path(__file__).resolve().parent.parent


def _reference(tmp_path: Path, n: int, chunk: int, batch: int):
    """An uninterrupted run's store, read back."""
    ref = tmp_path / "reference" / "0.h5"
    info = encode_synthetic(ref, n, chunk, batch, pool_encoder)
    return info, read_latent_store(ref, expected_vae_fingerprint=FINGERPRINT)


class _Crash(Exception):
    pass


def _crashing(after_calls: int):
    enc = RecordingEncoder()

    def call(x):
        if len(enc.calls) >= after_calls:
            raise _Crash()
        return enc(x)

    return call, enc


# --------------------------------------------------------------------------- encoding
def test_store_holds_posterior_mean_of_a_tiny_autoencoderkl(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    ).eval()
    sf = 0.3
    src = SyntheticSource(10)
    seen = []

    def encode(x):
        seen.append(x.clone())
        return vae.encode(x).latent_dist.mean * sf

    progress = []
    path = latent_store_path(tmp_path, src.dataset_key, "vaefp", "0")
    info = encode_class(src, "0", "train", encode, path, vae_fingerprint="vaefp", scaling_factor=sf,
                        batch_size=4, chunk_size=8, attrs={"backbone": {"kind": "tiny"}},
                        progress=lambda d, t: progress.append((d, t)))
    assert path == tmp_path / "latents" / src.dataset_key / "vaefp" / "0.h5"
    assert info.n == 10 and info.shape == (10, 4, 16, 16) and info.dtype == "float32"
    store = read_latent_store(path, expected_vae_fingerprint="vaefp")
    assert store.index == src.items("0", "train")
    # The encoder saw images in [-1, 1] converted from the uint8 source, in batches <= 4.
    x = torch.from_numpy(src.load("0", "train", store.index)).float() / 127.5 - 1
    assert torch.equal(torch.cat(seen), x) and max(len(s) for s in seen) <= 4
    with torch.no_grad():
        expected = torch.cat([vae.encode(x[s:s + 4]).latent_dist.mean for s in (0, 4, 8)]) * sf
    np.testing.assert_allclose(store.latents, expected.numpy(), rtol=1e-5, atol=1e-6)
    a = store.attrs
    assert a["complete"] is True and a["encoder_mode"] == "mean" and a["vae_fingerprint"] == "vaefp"
    assert a["scaling_factor"] == sf and a["image_size"] == 32 and a["dataset_key"] == src.dataset_key
    assert (a["class_id"], a["split"], a["batch_size"], a["chunk_size"]) == ("0", "train", 4, 8)
    assert json.loads(a["backbone"]) == {"kind": "tiny"}
    assert info.content_hash == content_hash(store.latents, store.index) == a["content_hash"]
    assert progress[0] == (0, 10) and progress[-1] == (10, 10)
    assert all(p[0] <= q[0] for p, q in zip(progress, progress[1:]))
    assert not partial_path(path).exists()


def test_float16_store_and_select(tmp_path):
    path = tmp_path / "0.h5"
    info = encode_synthetic(path, 12, 5, 5, pool_encoder, dtype="float16")
    store = read_latent_store(path)
    assert info.dtype == "float16" and store.latents.dtype == np.float16
    ref = pool_encoder(torch.from_numpy(SyntheticSource(12).load("0", "train", store.index)).float() / 127.5 - 1)
    np.testing.assert_array_equal(store.latents, ref.numpy().astype(np.float16))
    assert np.array_equal(store.select(["000007", "000002"]), store.latents[[7, 2]])
    with pytest.raises(LatentStoreError, match="not in the store"):
        store.select(["999999"])


def test_memory_is_bounded_by_batch_not_class(tmp_path, monkeypatch):
    """No call ever sees more than one batch of images or one chunk of latents."""
    src = SyntheticSource(300)
    loads = []
    orig = src.load
    monkeypatch.setattr(src, "load", lambda c, s, ids: loads.append(len(ids)) or orig(c, s, ids))
    writes = []
    orig_set = h5py.Dataset.__setitem__

    def spy(self, key, value):
        if self.name == "/latents":
            writes.append(np.asarray(value).shape[0])
        return orig_set(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", spy)
    enc = RecordingEncoder()
    encode_class(src, "0", "train", enc, tmp_path / "0.h5", vae_fingerprint="x", scaling_factor=1.0,
                 batch_size=16, chunk_size=64)
    assert sum(loads) == 300 and max(loads) == 16
    assert max(len(c) for c in enc.calls) == 16
    assert writes and max(writes) == 64


def test_store_rejects_unsafe_class_id_and_bad_options(tmp_path):
    with pytest.raises(DatasetError, match="class id"):
        latent_store_path(tmp_path, "ds", "fp", "../escape")
    assert latent_store_path(tmp_path, "ds", "fp", "3", split="test").name == "3@test.h5"
    with pytest.raises(ValueError, match="dtype"):
        encode_synthetic(tmp_path / "0.h5", 4, 2, 2, pool_encoder, dtype="int8")
    with pytest.raises(ValueError, match="overwrite"):
        encode_synthetic(tmp_path / "0.h5", 4, 2, 2, pool_encoder, attrs={"vae_fingerprint": "other"})


def test_non_finite_latents_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="non-finite latents for item"):
        encode_synthetic(tmp_path / "0.h5", 4, 2, 2, lambda x: pool_encoder(x) / 0.0)
    assert not (tmp_path / "0.h5").exists()


# --------------------------------------------------------------------------- crash safety
def test_resume_after_exception_skips_finished_chunks(tmp_path):
    n, chunk, batch = 20, 6, 3  # chunks of 6 rows (last one 2), two batches per chunk
    _, ref = _reference(tmp_path, n, chunk, batch)
    path = tmp_path / "0.h5"
    crashing, first = _crashing(after_calls=5)  # chunks 0 and 1 done, chunk 2 half way
    with pytest.raises(_Crash):
        encode_synthetic(path, n, chunk, batch, crashing)
    assert partial_path(path).exists() and not path.exists()
    with pytest.raises(LatentStoreError, match="interrupted"):
        validate_latent_store(path)
    with pytest.raises(LatentStoreError, match="no completion marker"):
        validate_latent_store(partial_path(path))

    rerun = RecordingEncoder()
    seen = []
    info = encode_synthetic(path, n, chunk, batch, rerun, progress=lambda d, t: seen.append(d))
    assert rerun.items == list(range(12, 20))  # chunks 2 and 3 only
    assert seen[0] == 12
    store = read_latent_store(path)
    assert np.array_equal(store.latents, ref.latents) and store.index == ref.index
    assert info.content_hash == ref.info.content_hash


def test_partial_from_other_parameters_or_truncated_starts_over(tmp_path):
    n, chunk, batch = 12, 4, 2
    _, ref = _reference(tmp_path, n, chunk, batch)
    path = tmp_path / "0.h5"
    crashing, _ = _crashing(after_calls=3)
    with pytest.raises(_Crash):
        encode_synthetic(path, n, chunk, batch, crashing)
    # Another batch size changes the bits of a chunk: nothing may be reused.
    rerun = RecordingEncoder()
    encode_synthetic(path, n, chunk, 4, rerun)
    assert rerun.items == list(range(n))

    # A partial file cut short by a crash is unreadable: it is discarded, not trusted.
    path2 = tmp_path / "b" / "0.h5"
    crashing, _ = _crashing(after_calls=4)
    with pytest.raises(_Crash):
        encode_synthetic(path2, n, chunk, batch, crashing)
    p = partial_path(path2)
    os.truncate(p, p.stat().st_size // 3)
    rerun = RecordingEncoder()
    encode_synthetic(path2, n, chunk, batch, rerun)
    assert rerun.items == list(range(n))
    assert np.array_equal(read_latent_store(path2).latents, ref.latents)


def _start_writer(tmp_path: Path, store: Path, log: Path, n: int, chunk: int, batch: int, sleep: float):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.latent_helpers", str(store), str(log), str(n), str(chunk), str(batch),
         str(sleep)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _wait_for_calls(proc, log: Path, calls: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= calls:
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stdout.read().decode()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("writer did not reach the expected batch in time")


N, CHUNK, BATCH = 40, 8, 4  # 5 chunks of two batches each


@pytest.fixture(scope="module")
def killed_writer(tmp_path_factory):
    """One real writer process: a second writer is tried while it runs, then it is
    SIGKILLed mid-class. (One process for both tests: startup costs seconds.)"""
    tmp = tmp_path_factory.mktemp("killed")
    store, log = tmp / "0.h5", tmp / "calls.log"
    proc = _start_writer(tmp, store, log, N, CHUNK, BATCH, sleep=0.4)
    try:
        # The 5th encoder call starts only after chunks 0 and 1 were flagged done.
        _wait_for_calls(proc, log, 5)
        second = RecordingEncoder()
        try:
            encode_synthetic(store, N, CHUNK, BATCH, second)
            lock_error = None
        except LatentStoreLockedError as e:
            lock_error = e
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with h5py.File(partial_path(store), "r") as f:  # white-box: which chunks survived
        done = set(np.flatnonzero(f["chunks_done"][()]).tolist())
    killed_run = [int(i) for line in log.read_text().splitlines() for i in line.split()]
    return dict(store=store, proc=proc, lock_error=lock_error, second=second, done=done, killed_run=killed_run,
                final_existed=store.exists())


def test_lock_prevents_two_writers(killed_writer):
    err = killed_writer["lock_error"]
    assert err is not None, "a second process could write the store while the first was writing it"
    msg = str(err)
    assert str(killed_writer["store"]) in msg and f"pid {killed_writer['proc'].pid}" in msg and "wait for it" in msg
    assert killed_writer["second"].calls == []


def test_kill_9_mid_class_resumes_without_reencoding(killed_writer, tmp_path):
    store, done = killed_writer["store"], killed_writer["done"]
    assert killed_writer["proc"].returncode == -signal.SIGKILL
    assert not killed_writer["final_existed"], "a killed writer must not leave a store under the final name"
    assert {0, 1} <= done and len(done) < N // CHUNK
    assert set(killed_writer["killed_run"]) >= {i for i in range(N) if i // CHUNK in done}

    _, ref = _reference(tmp_path, N, CHUNK, BATCH)
    rerun = RecordingEncoder()
    info = encode_synthetic(store, N, CHUNK, BATCH, rerun)  # the kernel dropped the dead writer's lock
    assert rerun.items == [i for i in range(N) if i // CHUNK not in done], "finished chunks were encoded again"
    got = read_latent_store(store, expected_vae_fingerprint=FINGERPRINT)
    assert np.array_equal(got.latents, ref.latents) and got.index == ref.index
    assert info.content_hash == ref.info.content_hash
    assert not partial_path(store).exists()


def test_waiting_for_the_lock_times_out_with_a_clear_error(tmp_path):
    store = tmp_path / "0.h5"
    with writer_lock(store):
        t0 = time.monotonic()
        with pytest.raises(LatentStoreLockedError, match="held for over 0.3 s"):
            encode_synthetic(store, 4, 2, 2, pool_encoder, lock_timeout=0.3)
        assert time.monotonic() - t0 >= 0.3


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    store = tmp_path / "0.h5"
    with writer_lock(store):
        with pytest.raises(LatentStoreLockedError, match="another process"):
            encode_synthetic(store, 4, 2, 2, pool_encoder)
    encode_synthetic(store, 4, 2, 2, pool_encoder)


# --------------------------------------------------------------------------- validation
@pytest.fixture()
def good_store(tmp_path) -> Path:
    path = tmp_path / "s" / "0.h5"
    encode_synthetic(path, 24, 8, 4, pool_encoder)
    return path


def test_validate_accepts_a_good_store(good_store):
    info = validate_latent_store(good_store, expected_vae_fingerprint=FINGERPRINT)
    assert info.n == 24 and info.shape == (24, 4, 8, 8) and info.vae_fingerprint == FINGERPRINT
    assert info.content_hash == read_latent_store(good_store).info.content_hash


def test_truncated_store_is_a_named_error(good_store):
    os.truncate(good_store, good_store.stat().st_size // 2)
    for check in (validate_latent_store, read_latent_store):
        with pytest.raises(LatentStoreError, match=f"(?s){good_store}.*truncated or corrupt.*re-materialize"):
            check(good_store)


def test_garbage_file_is_a_named_error(tmp_path):
    path = tmp_path / "0.h5"
    path.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(LatentStoreError, match="cannot be opened as HDF5"):
        validate_latent_store(path)


def test_flipped_latent_bytes_fail_the_content_hash(good_store):
    with h5py.File(good_store, "r") as f:
        offset = f["latents"].id.get_chunk_info(1).byte_offset
    with open(good_store, "r+b") as fh:
        fh.seek(offset + 100)
        b = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(LatentStoreError, match="content hash does not match"):
        validate_latent_store(good_store)
    with pytest.raises(LatentStoreError, match="content hash does not match"):
        read_latent_store(good_store)


def test_fingerprint_mismatch_is_a_named_error(good_store):
    with pytest.raises(LatentStoreError, match=f"(?s){good_store}.*{FINGERPRINT}.*'other-vae'.*re-materialize"):
        read_latent_store(good_store, expected_vae_fingerprint="other-vae")
    with pytest.raises(LatentStoreError, match="other-vae"):
        validate_latent_store(good_store, expected_vae_fingerprint="other-vae")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f.attrs.__setitem__("complete", False), "no completion marker"),
        (lambda f: f.attrs.__delitem__("complete"), "no completion marker"),
        (lambda f: f.attrs.__setitem__("n", 23), "attribute n = 23"),
        (lambda f: (f.__delitem__("index"), f.create_dataset("index", data=np.array(["a"], dtype=object),
                                                             dtype=h5py.string_dtype())), "index has shape"),
        (lambda f: f.attrs.__setitem__("dtype", "float16"), "dtype"),
        (lambda f: f["latents"].__setitem__((3, 0, 0, 0), np.nan), "NaN or infinity.*row 3.*000003"),
    ],
)
def test_inconsistent_store_is_a_named_error(good_store, edit, message):
    with h5py.File(good_store, "r+") as f:
        edit(f)
    with pytest.raises(LatentStoreError, match=f"(?s){good_store}.*{message}"):
        validate_latent_store(good_store)


def test_missing_store_is_a_named_error(tmp_path):
    with pytest.raises(LatentStoreError, match="does not exist; materialize"):
        read_latent_store(tmp_path / "nope.h5")


# --------------------------------------------------------------------------- bad images
def _bad_zlib_png(path: Path) -> None:
    """A PNG whose chunks all have valid CRCs but whose pixel data is not zlib:
    it passes the cheap listing checks and fails only when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 5 + b"garbage" * 9)
                     + chunk(b"IEND", b""))


def _folder_with_undecodable(tmp_path: Path, strict: bool):
    from PIL import Image

    from mgd3_core.config import DatasetConfig
    from mgd3_core.data import open_dataset

    for split in ("train", "val"):
        d = tmp_path / "tree" / split / "a"
        d.mkdir(parents=True)
        for i in range(5):
            Image.new("L", (40, 36), color=40 * i).save(d / f"img{i}.png")
    _bad_zlib_png(tmp_path / "tree" / "train" / "a" / "img2x.png")
    return open_dataset(DatasetConfig(kind="imagefolder", root=str(tmp_path / "tree"), strict=strict))


def test_image_that_fails_to_decode_is_left_out_and_listed(tmp_path):
    src = _folder_with_undecodable(tmp_path, strict=False)
    assert "img2x.png" in src.items("a", "train")  # the cheap check cannot see it
    path = tmp_path / "a.h5"
    info = encode_class(src, "a", "train", lambda x: torch.nn.functional.avg_pool2d(x, 4), path,
                        vae_fingerprint="v", scaling_factor=1.0, batch_size=4, chunk_size=4)
    store = read_latent_store(path)
    assert info.n == 5 and store.index == [f"img{i}.png" for i in range(5)]
    assert json.loads(store.attrs["skipped_items"]) == ["img2x.png"]
    assert any(p.endswith("img2x.png") and "undecodable" in r for p, r in src.skipped)
    np.testing.assert_allclose(store.latents[:, 0, 0, 0], [40 * i / 127.5 - 1 for i in range(5)], atol=1e-6)


def test_image_that_fails_to_decode_is_an_error_when_strict(tmp_path):
    src = _folder_with_undecodable(tmp_path, strict=True)
    with pytest.raises(UnreadableImageError, match="img2x.png"):
        encode_class(src, "a", "train", lambda x: torch.nn.functional.avg_pool2d(x, 4), tmp_path / "a.h5",
                     vae_fingerprint="v", scaling_factor=1.0, batch_size=4, chunk_size=4)
