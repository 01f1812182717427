"""The evaluation report's account of the data: how many images the students saw and every
dataset entry left out, with the reason, both from the dataset's one listing
(``ImageSource.listing``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import storage
from .config import ExperimentConfig
from .files import atomic_write

SKIPPED_FILES_CSV = "skipped_files.csv"


def skipped_files(source) -> pd.DataFrame:
    """Every entry of a freshly opened dataset (``ImageSource``) left out, from its listing: columns
    class ("" for an entry beside the class folders), path (bytes that are not UTF-8 escaped), reason."""
    from .image_source import display_path

    rows = [("", p, r) for p, r in source.skipped]  # found when the tree was opened
    for info in source.classes():
        rows += [(info.id, p, r) for p, r in source.listing(info.id).skipped]
    return pd.DataFrame([(c, display_path(p), r) for c, p, r in rows], columns=["class", "path", "reason"])


def dataset_note(cfg: ExperimentConfig, home: Path) -> str:
    """The report's line on the data the students saw (from the dataset's listing), with the
    skipped entries written to ``SKIPPED_FILES_CSV`` in the report folder."""
    from .data import open_dataset

    source = open_dataset(cfg.dataset)
    skipped = skipped_files(source)  # before anything is decoded: the listing's entries only
    ev = cfg.evaluation
    splits = ("train", "test") if ev.split == "test" else (ev.train_split(), ev.score_split(), "test")
    n = {split: sum(len(source.items(c.id, split)) for c in source.classes()) for split in splits}
    atomic_write(storage.report_dir(cfg, home) / SKIPPED_FILES_CSV, skipped.to_csv(index=False))
    left_out = (f"{len(skipped)} file(s) or folder(s) left out (`{SKIPPED_FILES_CSV}` lists each with the reason)"
                if len(skipped) else "no file left out")
    if ev.split == "test":
        counts = f"{n['train']} training and {n['test']} test images"
    else:  # the test split is listed (its files are part of the classes' content), never read
        counts = (f"{n['fit']} training images (the fit split) and {n['val']} validation images held out of "
                  f"the training split (dataset.validation_fraction {cfg.dataset.validation_fraction:g}); "
                  f"the {n['test']} test images are not used")
    return f"Dataset `{source.dataset_key}`: {counts} in {len(source.classes())} classes; {left_out}."
