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


def report_variants(cfg: ExperimentConfig) -> dict[str, tuple[str, dict]]:
    """``{method: (base method, {setting: value})}`` for :mod:`mgd3_core.report_grid`: over every setting
    some variant changes, the value each method runs with (a base method's fixed one included, e.g.
    unguided's λ 0), None where its kind does not use the setting. No settings with the base names."""
    from .config_methods import APPLIES_TO, KIND_FIXED, MODES_KEYS, SAMPLER_KEYS

    variants = cfg.method_variants()
    keys = list(dict.fromkeys(k for v in variants.values() for k in v.changed))
    out = {}
    for name, v in variants.items():
        settings = {}
        for k in keys:
            used = k in APPLIES_TO[v.kind] or SAMPLER_KEYS.get(k) in KIND_FIXED.get(v.kind, {})
            value = getattr(v.sampler, SAMPLER_KEYS[k]) if k in SAMPLER_KEYS else getattr(v.modes, MODES_KEYS[k])
            settings[k] = value if used else None
        out[name] = (v.kind, settings)
    return out


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
                        title=f"MGD³ evaluation — {cfg.name}", notes=notes, split=cfg.evaluation.split,
                        variants=report_variants(cfg))
