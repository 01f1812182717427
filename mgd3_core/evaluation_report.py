"""The evaluation report of one experiment: what ``evaluation_report`` (the asset) writes.

Gathers every method's student rows, the feature metrics, an image grid per method and the
data's account (``dataset_report``) from the storage root and hands them to
:func:`mgd3_core.report.write_report`, with the split the students were scored on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import storage
from .config import ExperimentConfig
from .distilled import load_distilled_class


def evaluation_report(cfg: ExperimentConfig, home: Path, fingerprint: str = ""):
    """Every method's students and feature metrics, the data's account (``dataset_report``), as
    the report (Markdown, CSV, PNGs, HTML) under ``report/``; returns ``report.Report``."""
    from .dataset_report import dataset_note
    from .evaluate import FULL_DATA, _classes
    from .images import image_grid
    from .report import write_report

    frames = []
    for method in [FULL_DATA, *cfg.methods]:
        path = storage.students_file(cfg, home, method)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: students of {method!r} missing; materialize students first")
        frames.append(pd.read_csv(path))
    accuracy = pd.concat(frames, ignore_index=True)
    metrics = tsne = None
    ddir = storage.diversity_dir(cfg, home)
    if (ddir / "metrics.csv").is_file():
        metrics = pd.read_csv(ddir / "metrics.csv")
        metrics["class"] = metrics["class"].astype(str)
    if (ddir / "tsne.csv").is_file() and (ddir / "tsne.csv").stat().st_size > 1:
        tsne = pd.read_csv(ddir / "tsne.csv")
    grids, ipc, g = {}, cfg.ipc[0], cfg.evaluation.generation_seeds[0]
    infos = _classes(cfg)
    for method in cfg.methods:
        root = storage.distilled_set_dir(cfg, home, method, ipc, g)
        per_class = [load_distilled_class(root, c.id)[0][: min(ipc, 10)] for c in infos]
        grids[f"{method} (IPC {ipc}, seed {g})"] = image_grid(np.concatenate(per_class), nrow=min(ipc, 10))
    notes = (f"Config `{cfg.name}`; backbone fingerprint `{fingerprint}`; sampler: {cfg.sampler.kind}, "
             f"{cfg.sampler.steps} steps, CFG {cfg.sampler.cfg_scale}, λ {cfg.sampler.guidance_strength}, "
             f"t_stop {cfg.sampler.t_stop}; modes: {cfg.modes.method}. {dataset_note(cfg, home)}")
    return write_report(storage.report_dir(cfg, home), accuracy, metrics, tsne=tsne, image_grids=grids,
                        title=f"MGD³ evaluation — {cfg.name}", notes=notes, split=cfg.evaluation.split)
