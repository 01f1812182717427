"""The bad-input catalogue: every malformed input the data layer can meet, and its documented
outcome (docs/bad-input.md): a named error, a counted skip, or accepted.

Each case builds its input in a fresh temporary directory and runs the real code on it:
image files go into class ``cat`` of a small ImageFolder tree (three good JPEGs per class);
latent stores are written by the real writer and then damaged; weights are real tiny diffusers
models saved with a config that does not match them.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from PIL import Image

from mgd3_core.backbones import BackboneMismatchError, load_backbone
from mgd3_core.config import BackboneConfig, ClassSpec, ConfigError, DatasetConfig, config_from_dict
from mgd3_core.data import DatasetError, open_dataset
from mgd3_core.latents import LatentStoreError, validate_latent_store
from mgd3_core.modes import ModeDiscoveryError, ModeFinder
from tests.latent_helpers import FINGERPRINT, encode_synthetic, pool_encoder

GOOD = ["0.jpg", "1.jpg", "2.jpg"]


# --------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Accepted:
    """The file is an item of its class and loads as (C, size, size) uint8."""


@dataclass(frozen=True)
class Skipped:
    """The file is left out, listed in ``skipped`` with this reason, and the good files are kept."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """A named error: this exception type, message matching ``pattern`` (a regex)."""

    error: type
    pattern: str


# --------------------------------------------------------------------------- inputs
def _jpeg(color=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.info["transparency"] = 1
    return _png(im)


def _tree(root: Path, classes=("cat", "dog")) -> Path:
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i, item in enumerate(GOOD):
                (d / item).write_bytes(_jpeg(color=(50 * k + 10 * i, 100, 150)))
    return root


def _file(name: str, data: bytes | Callable[[Path], None]):
    """A case that adds one entry to train/cat: bytes, or a function making it at the given path."""

    def build(cat: Path) -> None:
        if callable(data):
            data(cat / name)
        else:
            (cat / name).write_bytes(data)

    return build


def _non_utf8(cat: Path) -> str:
    path = Path(os.fsdecode(os.fsencode(cat) + b"/caf\xe9.jpg"))
    path.write_bytes(_jpeg())
    return str(path)


FILE_CASES = {
    "zero-byte file": ("zero.png", _file("zero.png", b""), Skipped("zero-byte file")),
    "truncated JPEG": ("cut.jpg", _file("cut.jpg", _noisy_jpeg()[:2000]), Skipped("truncated JPEG")),
    "truncated PNG": ("cut.png", _file("cut.png", _png(Image.new("L", (20, 20), 9))[:-20]), Skipped("damaged image")),
    "text named .png": ("text.png", _file("text.png", b"just some text\n" * 20), Skipped("not an image file")),
    "CMYK JPEG": ("cmyk.jpg", _file("cmyk.jpg", _jpeg(color=(0, 0, 0, 0), mode="CMYK")), Accepted()),
    "16-bit grayscale PNG": ("gray16.png", _file(
        "gray16.png", lambda p: Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(p)), Accepted()),
    "RGBA PNG": ("rgba.png", _file("rgba.png", _png(Image.new("RGBA", (9, 9), (9, 9, 9, 0)))), Accepted()),
    "palette PNG with transparency": ("palette.png", _file("palette.png", _palette_with_transparency()),
                                      Accepted()),
    "1x1 image": ("dot.png", _file("dot.png", _png(Image.new("RGB", (1, 1), (255, 0, 0)))), Accepted()),
    "decompression bomb": ("bomb.png", _file("bomb.png", _png_header_claiming(60_000, 60_000)),
                           Skipped("decompression bomb refused")),
    "hidden file": (".DS_Store", _file(".DS_Store", b"\0\0\0\1Bud1"), Skipped("hidden entry ignored")),
    "non-image file": ("notes.txt", _file("notes.txt", b"hello\n"), Skipped("not an image file")),
    "FIFO named .jpg": ("pipe.jpg", _file("pipe.jpg", lambda p: os.mkfifo(p)), Skipped("not a regular file")),
    "symlink loop (file)": ("loop.png", _file("loop.png", lambda p: p.symlink_to(p.name)),
                            Skipped("cannot be read (Too many levels of symbolic links)")),
    "symlink loop (folder)": ("again", _file("again", lambda p: p.symlink_to(".")),
                              Skipped("folder already listed (a symbolic link loop)")),
    "non-UTF-8 file name": (None, _non_utf8, Skipped("file name is not valid UTF-8")),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_image_file(tmp_path, case):
    name, build, outcome = FILE_CASES[case]
    root = _tree(tmp_path / "data")
    cat = root / "train" / "cat"
    made = build(cat)
    path = str(cat / name) if name else made
    src = open_dataset(DatasetConfig(kind="imagefolder", root=str(root), image_size=8, channels=3))
    ids = src.items("cat", "train")
    if isinstance(outcome, Accepted):
        assert ids == sorted([*GOOD, name]) and src.skipped == []
        x = src.load("cat", "train", [name])
        assert x.shape == (1, 3, 8, 8) and x.dtype == np.uint8
    else:
        assert ids == GOOD, "every good file is kept, the bad one left out"
        assert [p for p, _ in src.skipped] == [path], src.skipped
        assert outcome.reason in src.skipped[0][1], src.skipped
        strict = open_dataset(DatasetConfig(kind="imagefolder", root=str(root), strict=True))
        if not (case.startswith("hidden") or case.startswith("non-UTF-8") or case.startswith("symlink loop (f")):
            with pytest.raises(DatasetError, match=f"{name}: .*strict: false"):
                strict.items("cat", "train")  # strict: the same file is an error naming it


# --------------------------------------------------------------------------- trees, classes, splits
def _empty_class(root: Path):
    (root / "train" / "emu").mkdir()
    (root / "val" / "emu").mkdir()
    return lambda: open_dataset(DatasetConfig(kind="imagefolder", root=str(root))).items("emu", "train")


def _missing_split(root: Path):
    import shutil

    shutil.rmtree(root / "val")
    return lambda: open_dataset(DatasetConfig(kind="imagefolder", root=str(root)))


def _class_missing_in_test_split(root: Path):
    (root / "train" / "owl").mkdir()
    (root / "train" / "owl" / "0.jpg").write_bytes(_jpeg())
    return lambda: open_dataset(DatasetConfig(kind="imagefolder", root=str(root))).items("owl", "test")


def _unsafe_class_name(root: Path):
    return lambda: open_dataset(DatasetConfig(kind="imagefolder", root=str(root),
                                              classes=[ClassSpec(id="cat", name="../../etc"), "dog"]))


def _unsafe_folder_on_disk(root: Path):
    (root / "train" / "bad\x1bname").mkdir()
    return lambda: open_dataset(DatasetConfig(kind="imagefolder", root=str(root)))


def _colliding_unicode_names(root: Path):
    for split in ("train", "val"):
        for name in ("caf\u00e9", "cafe\u0301"):
            (root / split / name).mkdir()
    return lambda: open_dataset(DatasetConfig(kind="imagefolder", root=str(root)))


def _class_smaller_than_ipc(root: Path):
    src = open_dataset(DatasetConfig(kind="imagefolder", root=str(root)))
    latents = src.load("cat", "train", src.items("cat", "train")).astype(np.float32)
    return lambda: ModeFinder(5, class_name="cat").fit(latents)


TREE_CASES = {
    "empty class": (_empty_class, Refused(DatasetError, r"class 'emu' \(emu\) has no usable image in .*train/emu")),
    "missing split": (_missing_split, Refused(DatasetError, r"data/val is not a directory.*dataset\.test_dir")),
    "class missing in the test split": (_class_missing_in_test_split, Refused(DatasetError, r"class 'owl'.*has no folder .*val/owl")),
    "unsafe class name": (_unsafe_class_name, Refused(DatasetError, r"class name '\.\./\.\./etc' cannot be used .*path separator")),
    "control character in a folder name": (_unsafe_folder_on_disk, Refused(DatasetError, r"class id 'bad\\x1bname'.*control")),
    "colliding unicode class names": (_colliding_unicode_names, Refused(DatasetError, r"collide .*NFC")),
    "class smaller than IPC": (_class_smaller_than_ipc, Refused(ModeDiscoveryError, r"class 'cat': IPC 5 is larger than the 3 images")),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_bad_tree_or_class(tmp_path, case):
    build, outcome = TREE_CASES[case]
    run = build(_tree(tmp_path / "data"))
    with pytest.raises(outcome.error, match=outcome.pattern):
        run()


def test_unicode_class_names_are_accepted(tmp_path):
    root = _tree(tmp_path / "data", classes=("猫", "caf\u00e9", "Ölfarbe"))
    src = open_dataset(DatasetConfig(kind="imagefolder", root=str(root)))
    assert sorted(c.id for c in src.classes()) == sorted(["猫", "caf\u00e9", "Ölfarbe"])
    assert src.load("猫", "train", src.items("猫", "train")).shape[0] == 3 and src.skipped == []


# --------------------------------------------------------------------------- latent stores
def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _damage_nan(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f["latents"][5, 0, 0, 0] = np.nan


STORE_CASES = {
    "truncated latent store": (_damage_truncate, None, "cannot be opened as HDF5, the file is truncated or corrupt"),
    "corrupt latent store": (_damage_garbage, None, "cannot be opened as HDF5"),
    "NaN latents": (_damage_nan, None, r"NaN or infinity \(first at row 5"),
    "latent store from another VAE": (lambda p: None, "another-vae", f"encoded with VAE fingerprint '{FINGERPRINT}'"
                                      ".*current VAE has fingerprint 'another-vae'"),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_bad_latent_store(tmp_path, case):
    damage, expected_vae, pattern = STORE_CASES[case]
    store = tmp_path / "0.h5"
    encode_synthetic(store, 16, 8, 4, pool_encoder)
    validate_latent_store(store, expected_vae_fingerprint=FINGERPRINT)
    damage(store)
    with pytest.raises(LatentStoreError, match=f"(?s){store}: .*{pattern}"):
        validate_latent_store(store, expected_vae_fingerprint=expected_vae)


# --------------------------------------------------------------------------- weights
def test_weights_of_another_architecture_are_refused(tmp_path):
    """A transformer whose config.json asks for two layers, saved with the weights of one:
    diffusers would give the second layer random weights and only warn."""
    import tests.test_backbones as tb

    root, vae_dir = tmp_path / "dit", tmp_path / "vae"
    tb.tiny_dit().save_pretrained(root / "transformer", safe_serialization=True)
    tb.tiny_vae().save_pretrained(vae_dir, safe_serialization=True)
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    config = root / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 2}))
    cfg = BackboneConfig(kind="pretrained", transformer_dir=str(root), vae_dir=str(vae_dir))
    with pytest.raises(BackboneMismatchError, match=r"transformer: the weights are of another architecture .*"
                                                    r"parameter\(s\) of the model missing from the weights"):
        load_backbone(cfg, tmp_path / "home")


# --------------------------------------------------------------------------- configuration
CONFIG_CASES = {
    "image_size too small": ({"dataset": {"image_size": 4}}, r"dataset\.image_size: .*greater than or equal to 8"),
    "validation_fraction 1": ({"dataset": {"validation_fraction": 1.0}}, r"dataset\.validation_fraction: .*less than 1"),
    "channels 2": ({"dataset": {"channels": 2}}, r"dataset\.channels: "),
    "negative guidance": ({"sampler": {"guidance_strength": -0.1}}, r"sampler\.guidance_strength: "),
    "t_stop beyond steps": ({"sampler": {"steps": 10, "t_stop": 11}}, r"t_stop = 11 is outside \[0, steps = 10\]"),
    "IPC 0": ({"ipc": [0]}, r"ipc: .*integers >= 1"),
    "unknown key": ({"sampler": {"lamda": 0.1}}, r"sampler\.lamda: unknown key"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_out_of_range_config_value(case):
    raw, pattern = CONFIG_CASES[case]
    with pytest.raises(ConfigError, match=f"(?s)invalid configuration:.*{pattern}"):
        config_from_dict(raw)

