"""The README's bad-input table through the whole asset graph, the way ``make demo`` runs it.

``tests/test_bad_inputs.py`` checks each row against the data layer alone; here each row is an
ImageFolder tree driven through ``python -m mgd3_assets.demo`` (its ``main``, in this process, on
the tiny config with observations and all): every file that is skipped or accepted sits in one
tree that must run to the evaluation report with the file listed as skipped and the rest of its
class used; every row that is an error gets its own small tree and must stop with the row's
error, naming the file or class, as the demo's last line.

Also here: the content key of a clean tree is pinned to values computed by the implementation
before the dataset's listing was shared (existing storage roots keep their latent stores).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mgd3_assets import demo
from mgd3_core import dataset_content, storage
from mgd3_core.config import DatasetConfig
from mgd3_core.data import open_dataset
from mgd3_core.dataset_content import class_content_key
from mgd3_core.dataset_report import SKIPPED_FILES_CSV
from tests.dagster_helpers import tiny_config, write_config
from tests.test_bad_inputs import FILE_CASES, Accepted, Skipped

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the content key, pinned
def _pgm(path: Path, seed: int) -> None:
    """A 6 x 6 binary PGM: its bytes depend on nothing but ``seed`` (no compressor involved)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"P5\n6 6\n255\n" + bytes((seed * 31 + i * 7) % 256 for i in range(36)))


def test_the_content_key_of_a_clean_tree_is_the_one_the_old_implementation_gave(tmp_path):
    """Hard values captured from ``dataset_content`` as it was before the shared listing (it walked
    the class folders itself): a tree without skipped files keeps its key, so the latent stores of
    an existing storage root stay valid. Nested folders and a non-ASCII name included."""
    files = {"train/cat/a.pgm": 1, "train/cat/sub/b.pgm": 2, "train/cat/\u00e9t\u00e9.pgm": 3, "val/cat/c.pgm": 4,
             "train/dog/0.pgm": 5, "val/dog/0.pgm": 6, "val/dog/1.pgm": 7}
    for rel, seed in files.items():
        _pgm(tmp_path / rel, seed)
    source = open_dataset(DatasetConfig(kind="imagefolder", root=str(tmp_path), image_size=8))
    source.dataset_key = "pinned"  # the real one holds the tree's absolute path
    assert {c: class_content_key(source, c) for c in ("cat", "dog")} == {"cat": "556d85f163e84d17",
                                                                        "dog": "0a6a551957f622c1"}
    assert source.skipped == []


# --------------------------------------------------------------------------- running the demo
def _run_demo(monkeypatch, capsys, tmp_path: Path, data: Path, **dataset) -> tuple[int, str, str]:
    """``make demo`` on the tiny config over the ImageFolder tree ``data``, in this process."""
    raw = tiny_config(dataset={"kind": "imagefolder", "root": str(data), "classes": None, "max_per_class": None,
                               **dataset})
    config = write_config(tmp_path / "bad.yaml", raw)
    monkeypatch.setenv("MGD3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(ROOT))  # the repository's dagster.yaml: the instance under MGD3_HOME
    monkeypatch.setenv("MGD3_CONFIG", str(config))
    capsys.readouterr()
    rc = demo.main(["--config", str(config)])
    out, err = capsys.readouterr()
    return rc, out, err


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8), "L").save(path)


def _clean_tree(root: Path, classes=("alpha", "beta"), train: int = 4, test: int = 2) -> Path:
    for k, name in enumerate(classes):
        for i in range(train):
            _png(root / "train" / name / f"{i}.png", seed=100 * k + i)
        for i in range(test):
            _png(root / "val" / name / f"{i}.png", seed=1000 + 100 * k + i)
    return root


# --------------------------------------------------------------------------- skipped and accepted files
@pytest.mark.slow
def test_every_skipped_or_accepted_file_runs_through_the_whole_graph(tmp_path, monkeypatch, capsys):
    """One tree holding every file row of the table in class ``café`` (a unicode class name,
    accepted too), plus a zero-byte file in its test split: the demo runs to the report; the
    skipped files are in the report's list with their reason and in no stage's input (the
    content key's file hashes included); the accepted files and the good ones are encoded."""
    data = _clean_tree(tmp_path / "data", classes=("caf\u00e9", "猫"))
    cafe = data / "train" / "caf\u00e9"
    expected_skips, accepted = {}, []
    for case, (name, build, outcome) in FILE_CASES.items():
        made = build(cafe)
        path = str(cafe / name) if name else made
        if isinstance(outcome, Skipped):
            expected_skips[path] = outcome.reason
        else:
            assert isinstance(outcome, Accepted), case
            accepted.append(name)
    (data / "val" / "caf\u00e9" / "empty.png").write_bytes(b"")
    _png(cafe / ".cache" / "thumb.png", seed=7)  # a hidden folder (the row's other half), with an image
    expected_skips[str(cafe / ".cache")] = "hidden entry ignored"
    expected_skips[str(data / "val" / "caf\u00e9" / "empty.png")] = "zero-byte file"

    rc, out, err = _run_demo(monkeypatch, capsys, tmp_path, data)
    assert rc == 0, err[-3000:]
    assert "== results" in out and "mgd3" in out

    # The report lists every skipped entry with the reason (paths that are not UTF-8 escaped).
    report_dir = storage.report_dir(open_cfg := _cfg(tmp_path), tmp_path / "home")
    skipped = pd.read_csv(report_dir / SKIPPED_FILES_CSV, keep_default_na=False)
    listed = dict(zip(skipped["path"], skipped["reason"]))
    for path, reason in expected_skips.items():
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        assert shown in listed and reason in listed[shown], (path, listed)
    assert set(skipped["class"]) == {"caf\u00e9"}
    assert "left out" in (report_dir / "report.md").read_text()

    # The latent store holds the good and the accepted files of the class, nothing else; the
    # content key hashed exactly the listing (train and test), by the same ids.
    good = sorted([f"{i}.png" for i in range(4)] + accepted)
    source = open_dataset(open_cfg.dataset)
    (store,) = (tmp_path / "home" / "latents").rglob("caf\u00e9.h5")
    with h5py.File(store, "r") as f:
        assert sorted(i.decode() if isinstance(i, bytes) else i for i in f["index"][()]) == good
        assert json.loads(f.attrs["skipped_items"]) == []
    cache = storage.content_key_cache_file(tmp_path / "home", source.dataset_key, "caf\u00e9")
    hashed = set(json.loads(cache.read_text())["files"])
    assert hashed == {f"train/{i}" for i in good} | {"test/0.png", "test/1.png"}


def _cfg(tmp_path: Path):
    from mgd3_core.config import load_config

    return load_config(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------- rows that are errors
def _no_usable_image(data: Path) -> str:
    (data / "train" / "delta").mkdir()
    (data / "train" / "delta" / "x.png").write_bytes(b"")
    _png(data / "val" / "delta" / "0.png", seed=5)
    return (rf"DatasetError: class 'delta' \(delta\) has no usable image in {re.escape(str(data))}/train/delta; "
            rf"skipped 1: .*/train/delta/x\.png: zero-byte file; add images or remove the class")


def _empty_class(data: Path) -> str:
    (data / "train" / "delta").mkdir()
    _png(data / "val" / "delta" / "0.png", seed=5)
    return rf"DatasetError: class 'delta' \(delta\) has no usable image in {re.escape(str(data))}/train/delta; add"


def _unsafe_folder(data: Path) -> str:
    _png(data / "train" / "bad\x1bname" / "0.png", seed=5)
    return r"DatasetError: class id 'bad\\x1bname' cannot be used as a file or folder name: .*control"


def _non_utf8_folder(data: Path) -> str:
    folder = Path(os.fsdecode(os.fsencode(str(data / "train")) + b"/caf\xe9"))
    _png(folder / "0.png", seed=5)
    return r"DatasetError: class id 'caf\\udce9' cannot be used as a file or folder name: it is not valid UTF-8"


def _colliding_names(data: Path) -> str:
    for split in ("train", "val"):
        for name in ("caf\u00e9", "cafe\u0301"):
            _png(data / split / name / "0.png", seed=5)
    return r"DatasetError: class ids .* collide \(the same after Unicode NFC normalisation"


def _missing_split(data: Path) -> str:
    import shutil

    shutil.rmtree(data / "val")
    return rf"DatasetError: {re.escape(str(data))}/val is not a directory: set dataset\.root"


def _class_missing_from_test_split(data: Path) -> str:
    _png(data / "train" / "owl" / "0.png", seed=5)
    return rf"DatasetError: class 'owl' \(owl\) has no folder {re.escape(str(data))}/val/owl; every class needs"


def _class_only_in_test_split(data: Path) -> str:
    _png(data / "val" / "owl" / "0.png", seed=5)
    return (rf"DatasetError: {re.escape(str(data))}/val/owl has no training folder "
            rf"\({re.escape(str(data))}/train/owl does not exist\): its test images would be left out")


def _undecodable(data: Path) -> str:
    """Not a row of the table: a PNG whose chunks are intact (it passes the listing's checks) but
    whose pixel data is not deflate data. The first stage that decodes it (the embedded backbone's
    training) fails naming the file."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
    path = data / "train" / "alpha" / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"not deflate data" * 4) + chunk(b"IEND", b""))
    return rf"UnreadableImageError: {re.escape(str(path))}: cannot be decoded \(OSError: .*\); fix or remove the file"


# (build the case into a clean tree and return the expected last line, dataset settings, exit code)
ERROR_CASES = {
    "one with no usable image": (_no_usable_image, {}, 1),
    "empty class": (_empty_class, {}, 1),
    "unsafe class name": (lambda d: r"DatasetError: class name '\.\./\.\./etc' cannot be used .*path separator",
                          {"classes": [{"id": "alpha", "name": "../../etc"}, "beta"]}, 2),
    "unsafe class folder": (_unsafe_folder, {}, 2),
    "class folder that is not UTF-8": (_non_utf8_folder, {}, 2),
    "colliding unicode class names": (_colliding_names, {}, 2),
    "missing split folder": (_missing_split, {}, 2),
    "class missing from the test split": (_class_missing_from_test_split, {}, 2),
    "class only in the test split": (_class_only_in_test_split, {}, 2),
    "file that passes the checks but does not decode": (_undecodable, {}, 1),
    "class smaller than IPC": (lambda d: r"ModeDiscoveryError: class 'alpha': IPC 2 is larger than the 1 images",
                               {"validation_fraction": 0.0}, 1),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_a_bad_tree_stops_the_demo_with_its_error_last(tmp_path, monkeypatch, capsys, case):
    build, dataset, code = ERROR_CASES[case]
    train = 1 if case == "class smaller than IPC" else 4
    data = _clean_tree(tmp_path / "data", train=train)
    if case == "class smaller than IPC":  # beta keeps enough images: alpha alone fails, at its modes
        for i in range(1, 4):
            _png(data / "train" / "beta" / f"{i}.png", seed=50 + i)
    expected = build(data)
    rc, out, err = _run_demo(monkeypatch, capsys, tmp_path, data, **dataset)
    lines = err.strip().splitlines()
    assert rc == code, err[-3000:]
    assert re.match(expected, lines[-1]), lines[-3:]
    if code == 2:  # found while the definitions load: one line, nothing run
        assert len(lines) == 1, lines


# --------------------------------------------------------------------------- files changing mid-run
class _ToyBackbone:
    vae_fingerprint, scaling_factor = "toy-vae", 1.0

    @staticmethod
    def encode(x):
        from tests.latent_helpers import pool_encoder

        return pool_encoder(x)


@pytest.fixture()
def toy_encoding(tmp_path, monkeypatch):
    """``encode(on_decode)``: ``pipeline.encode_latents`` of class alpha of a clean tree with a toy
    VAE; ``on_decode(path)`` runs before each image is decoded (to change files mid-run). Returns
    (the store's path, its recorded content key, its index)."""
    from mgd3_core import imagefolder, pipeline
    from mgd3_core.config import config_from_dict

    data = _clean_tree(tmp_path / "data", train=6)
    cfg = config_from_dict(tiny_config(dataset={"kind": "imagefolder", "root": str(data), "classes": None,
                                                "max_per_class": None}, encode={"batch_size": 2, "chunk_size": 2}))
    home = tmp_path / "home"
    monkeypatch.setattr(pipeline, "vae_fingerprint", lambda cfg, home: _ToyBackbone.vae_fingerprint)
    monkeypatch.setattr(pipeline, "get_backbone", lambda cfg, home: _ToyBackbone())
    decode = imagefolder.ImageFolderSource._decode

    def encode(on_decode=lambda path: None):
        def watched(self, path, item_id):
            on_decode(Path(path))
            return decode(self, path, item_id)

        monkeypatch.setattr(imagefolder.ImageFolderSource, "_decode", watched)
        info = pipeline.encode_latents(cfg, home, "alpha")
        monkeypatch.setattr(imagefolder.ImageFolderSource, "_decode", decode)
        with h5py.File(info.path, "r") as f:
            index = [i.decode() if isinstance(i, bytes) else i for i in f["index"][()]]
            return info.path, f.attrs["content_key"], index, f["latents"][()]

    encode.data, encode.cfg, encode.home = data / "train" / "alpha", cfg, home
    return encode


def _latent_of(cfg, item: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(open_dataset(cfg.dataset).load("alpha", "train", [item])).float().div(127.5).sub(1.0)
    return _ToyBackbone.encode(x).numpy()[0]


def test_an_image_rewritten_before_or_while_encoding_is_encoded_as_it_is_then(toy_encoding, caplog):
    from mgd3_core import pipeline

    cfg, home, alpha = toy_encoding.cfg, toy_encoding.home, toy_encoding.data
    observed = pipeline.class_content_key(cfg, home, "alpha")  # the dataset observation
    _png(alpha / "1.png", seed=901)  # rewritten between the observation and the encoding
    _, key, index, latents = toy_encoding()
    assert key == pipeline.class_content_key(cfg, home, "alpha") != observed  # the next observation sees it
    assert np.array_equal(latents[index.index("1.png")], _latent_of(cfg, "1.png"))

    rewritten = []

    def rewrite_once(path: Path) -> None:  # rewritten after the listing, just before it is read
        if path.name == "4.png" and not rewritten:
            rewritten.append(path)
            _png(path, seed=902)

    _png(alpha / "0.png", seed=903)  # a change to re-encode for (the store above is reused otherwise)
    with caplog.at_level("WARNING", logger="mgd3"):
        _, key, index, latents = toy_encoding(rewrite_once)
    assert rewritten and key == pipeline.class_content_key(cfg, home, "alpha")  # the key of what the store holds
    for item in ("0.png", "4.png"):
        assert np.array_equal(latents[index.index(item)], _latent_of(cfg, item))
    assert f"files changed while the class was being encoded ({alpha / '4.png'})" in caplog.text


def test_an_image_deleted_while_encoding_is_left_out_with_a_warning(toy_encoding, caplog):
    from mgd3_core import pipeline

    cfg, home, alpha = toy_encoding.cfg, toy_encoding.home, toy_encoding.data

    def delete(path: Path) -> None:
        if path.name == "3.png" and path.exists():
            path.unlink()

    with caplog.at_level("WARNING"):
        path, key, index, _ = toy_encoding(delete)
    assert index == ["0.png", "1.png", "2.png", "4.png", "5.png"]
    assert key == pipeline.class_content_key(cfg, home, "alpha")
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["skipped_items"]) == []  # the store is the class as it is now
    assert f"({alpha / '3.png'}); encoding it again" in caplog.text


def test_files_that_never_settle_leave_a_store_no_observation_vouches_for(toy_encoding, caplog):
    from mgd3_core import pipeline

    cfg, home = toy_encoding.cfg, toy_encoding.home
    seeds = iter(range(2000, 2100))

    def always(path: Path) -> None:
        if path.name == "2.png":
            _png(path, seed=next(seeds))

    with caplog.at_level("WARNING"):
        _, key, index, _ = toy_encoding(always)
    assert key == dataset_content.UNSETTLED_CONTENT_KEY and len(index) == 6
    assert "encoding it again (a last time" in caplog.text
    _, key, _, latents = toy_encoding()  # settled: the next materialization encodes it again
    assert key == pipeline.class_content_key(cfg, home, "alpha")
