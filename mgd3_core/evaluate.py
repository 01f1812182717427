"""Evaluation stages: teacher, students per method, feature metrics, the report.

Each stage reads distilled sets and real data from the storage root and writes
CSV / weights / report files back to it (atomically), like the other stages in
``pipeline``. Class labels for students are positions in the configured class
list (``ClassInfo.index``), not backbone labels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import storage
from .config import ExperimentConfig
from .distilled import load_distilled_class
from .files import atomic_output, atomic_write
from .progress import EpochProgress, StageProgress, epoch_lines, no_progress

log = logging.getLogger("mgd3")

FULL_DATA = "full_data"


def _classes(cfg: ExperimentConfig) -> list:
    """The configured classes (``data.ClassInfo``), in label order."""
    from .data import open_dataset

    return open_dataset(cfg.dataset).classes()


# --------------------------------------------------------------------------- real data
@functools.lru_cache(maxsize=4)
def _real_split_cached(dataset_json: str, split: str):
    from .batching import SplitImages
    from .config import DatasetConfig
    from .data import open_dataset

    images = SplitImages(open_dataset(DatasetConfig.model_validate_json(dataset_json)), split)
    return images, images.labels


def real_split(cfg: ExperimentConfig, split: str):
    """One split, all classes: (images, labels). ``images`` is a lazy :class:`~mgd3_core.batching.SplitImages`
    (uint8 (N, C, H, W) read from disk batch by batch); ``labels`` (N,) class positions."""
    return _real_split_cached(cfg.dataset.model_dump_json(), split)


def _micro_batch(cfg: ExperimentConfig, model: torch.nn.Module, images, batch_size: int) -> int:
    """Training micro-batch: the protocol's batch, or fewer images when their activations
    would not fit ``evaluation.memory_budget_mb`` (gradients are then accumulated)."""
    from .batching import model_batch_size

    return model_batch_size(model, images.shape[1:], cfg.evaluation.memory_budget_mb, training=True, cap=batch_size)


def distilled_set(cfg: ExperimentConfig, home: Path, method: str, ipc: int, gen_seed: int):
    """All classes of one distilled set: uint8 (N, C, H, W), labels (N,)."""
    root = storage.distilled_set_dir(cfg, home, method, ipc, gen_seed)
    images, labels = [], []
    for info in _classes(cfg):
        imgs, _ = load_distilled_class(root, info.id)
        images.append(imgs)
        labels.append(np.full(len(imgs), info.index, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------- teacher
def train_teacher(cfg: ExperimentConfig, home: Path, progress: StageProgress = no_progress) -> dict:
    """Train the real-data teacher (``evaluation.teacher.model``, hard-label protocol, whole
    training split, first training seed; the fit split under ``evaluation.split: validation``) and
    store it under ``teacher/``.

    It is the soft-label teacher, the fixed feature space of the diversity metrics,
    and the full-data run of its own student (see :func:`teacher_is_full_data_run`).
    Returns its metadata (accuracy on the split students are scored on)."""
    from .students import build_student
    from .training import train_hard_label

    ev = cfg.evaluation
    x, y = real_split(cfg, ev.train_split())
    xt, yt = real_split(cfg, ev.score_split())
    seed, epochs, name = ev.training_seeds[0], cfg.teacher_epochs(), ev.teacher.model
    hard = ev.hard_for(name)
    model = build_student(name, x.shape[1], int(y.max()) + 1, x.shape[-1], seed=seed)
    t0 = time.perf_counter()
    res = train_hard_label(
        model, x, y, xt, yt, cfg=hard, epochs=epochs, seed=seed,
        orientation_sensitive=cfg.dataset.orientation_sensitive, device=ev.device,
        evaluations=ev.evaluations, ranking_evaluations=ev.ranking_evaluations,
        memory_budget_mb=ev.memory_budget_mb, micro_batch=_micro_batch(cfg, model, x, hard.batch_size),
        bn_stats=ev.bn_stats,
        progress=lambda r: progress(f"teacher ({name}) epoch {r['epoch']}/{epochs} loss {r['loss']:.3f}",
                                    r["epoch"] / epochs),
    )
    meta = {"student": name, "train_seed": seed, "epochs": epochs, "final_acc": res.final_acc,
            "best_acc": res.best_acc, "ranking_acc": res.ranking_acc, "seconds": time.perf_counter() - t0,
            "n_train": int(len(x))}
    if ev.split != "test":
        meta["split"] = ev.split
    with atomic_output(storage.teacher_weights_file(cfg, home)) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write(storage.teacher_dir(cfg, home) / "meta.json", json.dumps(meta, indent=2))
    return meta


def teacher_is_full_data_run(cfg: ExperimentConfig, student: str, train_seed: int) -> bool:
    """Whether the teacher run is exactly this full-data run (same model, seed, epochs, float32)."""
    ev = cfg.evaluation
    return (student == ev.teacher.model and train_seed == ev.training_seeds[0]
            and cfg.teacher_epochs() == ev.hard_for(student).full_data_epochs and ev.precision == "float32")


def teacher_fingerprint(cfg: ExperimentConfig, home: Path) -> str:
    """Hash of the teacher's weight file: the teacher's data version."""
    path = storage.teacher_weights_file(cfg, home)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher yet; materialize the teacher asset first")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_teacher(cfg: ExperimentConfig, home: Path) -> torch.nn.Module:
    """The stored teacher, in eval mode with gradients off; refused if it is another model."""
    from .students import build_student

    path = storage.teacher_weights_file(cfg, home)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher yet; materialize the teacher asset first")
    name = cfg.evaluation.teacher.model
    stored = teacher_meta(cfg, home).get("student", "convnet")
    if stored != name:
        raise ValueError(f"{path} is a {stored!r} teacher but evaluation.teacher.model is {name!r}; "
                         "materialize the teacher asset again")
    _, y = real_split(cfg, cfg.evaluation.score_split())
    model = build_student(name, cfg.dataset.channels, len(np.unique(y)), cfg.dataset.image_size)
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def teacher_meta(cfg: ExperimentConfig, home: Path) -> dict:
    path = storage.teacher_dir(cfg, home) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher yet; materialize the teacher asset first")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- students
# Bump when the student code (models, protocols, evaluation) changes a run's result for the
# same inputs: finished runs are kept under a key that includes it (see ``_run_key``).
STUDENT_RUN_VERSION = 2  # 2: rows carry ranking_acc (best test accuracy in the last fifth)


def _digest(*arrays) -> str:
    from .batching import digest

    return digest(*arrays)


def _run_key(cfg: ExperimentConfig, spec: dict, train_digest: str, test_digest: str,
             teacher_digest: str | None, micro_batch: int | None = None, batch_norm: bool = False) -> str:
    """Everything a student run's result depends on: the run's settings, the protocol's
    hyper-parameters, the exact training and test images, the teacher's weights (soft
    labels), and the code and torch versions. A hard-label run does not depend on the teacher:
    adding soft labels or retraining the teacher keeps its key. The run's own epoch count is in
    ``spec``; the protocol's epoch tables are not, so a new schedule for one IPC (or for the
    full-data runs) re-trains only the runs whose epochs change."""
    ev = cfg.evaluation
    soft = spec["protocol"] == "soft"
    protocol_cfg = ev.soft if soft else ev.hard_for(spec["student"])
    payload = dict(spec, version=STUDENT_RUN_VERSION, torch=torch.__version__, device=str(ev.device),
                   evaluations=ev.evaluations, ranking_evaluations=ev.ranking_evaluations,
                   orientation_sensitive=cfg.dataset.orientation_sensitive,
                   protocol_cfg=protocol_cfg.model_dump(mode="json", exclude={"epochs_by_ipc", "full_data_epochs"}),
                   train=train_digest,
                   test=test_digest, teacher=teacher_digest if soft else None)
    protocol_batch = protocol_cfg.batch_size
    if micro_batch is not None and micro_batch < protocol_batch:
        # Accumulated micro-batches: the same update up to rounding for instance-norm students,
        # smaller batch statistics for batch-norm ones. Absent when whole batches fit (old keys stay).
        payload["micro_batch"] = micro_batch
    if ev.precision != "float32":  # absent for float32: the keys of earlier runs stay valid
        payload["precision"] = ev.precision
    if batch_norm and not soft and ev.bn_stats != "running":  # instance-norm and soft keys stay
        payload["bn_stats"] = ev.bn_stats
    if ev.split != "test":  # scored on the validation split (absent for the test split: earlier keys stay)
        payload["split"] = ev.split
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


_ROW_KEYS = ("method", "ipc", "student", "protocol", "gen_seed", "train_seed", "final_acc", "best_acc",
             "ranking_acc", "epochs", "seconds")


def _load_run(path: Path) -> dict | None:
    """The stored row of a finished run, or None (not run yet, or a damaged record)."""
    try:
        row = json.loads(path.read_text())["row"]
        if not all(k in row for k in _ROW_KEYS):
            raise ValueError(f"missing {[k for k in _ROW_KEYS if k not in row]}")
        return row
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:  # torn or foreign: train again, overwrite
        log.warning("%s: unreadable student-run record (%s); training this run again", path, err)
        return None


def train_students(cfg: ExperimentConfig, home: Path, method: str, progress: StageProgress = no_progress) -> pd.DataFrame:
    """Train every configured student on every set of one method; one row per run.

    ``method = "full_data"`` trains on the whole real training split (``evaluation.train_split``; the upper
    bound; the teacher run stands in for its own student when it is the same run,
    :func:`teacher_is_full_data_run`). Rows: method, ipc, student, protocol,
    gen_seed, train_seed, final_acc, best_acc, ranking_acc (best in the last
    fifth, for DD-Ranking), epochs, seconds. Written to ``students/<method>.csv``.

    Each finished run is also recorded under ``students/runs/`` keyed by all it
    depends on (settings, images, teacher, code version), so a sweep that is
    interrupted, or re-run with an added generation seed, student or IPC,
    trains only the runs it does not already have."""
    runs = _student_runs(cfg, method)
    teacher = load_teacher(cfg, home) if any(r[3] == "soft" for r in runs) else None
    test = real_split(cfg, cfg.evaluation.score_split())
    rows: list[dict] = []
    reused = 0
    for n, (spec, train, micro, record_path) in enumerate(sweep_runs(cfg, home, method, teacher)):
        label = (f"{method} ipc={spec['ipc']} seed={spec['gen_seed']} {spec['student']}/{spec['protocol']} "
                 f"train_seed={spec['train_seed']}")
        where = f"({n + 1}/{len(runs)})"
        if record_path is None:
            progress(f"{label}: the teacher run {where}", n / len(runs))
            rows.append(_teacher_row(cfg, home, method, spec["student"], spec["train_seed"]))
            continue
        done = _load_run(record_path)
        if done is not None:
            reused += 1
            progress(f"{label}: already trained, final {done['final_acc']:.2f}% {where}", n / len(runs))
            rows.append(done)
            continue
        progress(f"training {label} {where}", n / len(runs))
        row = _train_student(cfg, spec, train, test, teacher, epoch_lines(progress, label, n, len(runs)),
                             micro)
        atomic_write(record_path, json.dumps({"spec": spec, "row": row}, default=_json_default))
        rows.append(row)
        log.info("%s: final %.2f%% (best %.2f%%)", label, row["final_acc"], row["best_acc"])
    df = pd.DataFrame(rows)
    atomic_write(storage.students_file(cfg, home, method), df.to_csv(index=False))
    progress(f"{method}: {len(rows)} runs done ({reused} reused from earlier runs)", 1.0)
    return df


def sweep_runs(cfg: ExperimentConfig, home: Path, method: str, teacher=None):
    """Each run of a method's sweep, in order: (spec, (x, y), micro-batch, record path), the path
    keyed by all the run depends on (:func:`_run_key`); all but the spec are None for the full-data
    run that the teacher run is. ``teacher``: :func:`load_teacher`'s, when there are soft-label runs."""
    from .students import build_student, has_batch_norm

    ev = cfg.evaluation
    test = real_split(cfg, ev.score_split())
    test_digest, n_classes, runs_dir = _digest(*test), len(np.unique(test[1])), storage.student_runs_dir(cfg, home)
    teacher_digest = None if teacher is None else _digest(
        *(v.contiguous().numpy() for _, v in sorted(teacher.state_dict().items())))
    for ipc, gen_seed, student, protocol, train_seed in _student_runs(cfg, method):
        spec = dict(method=method, ipc=ipc, gen_seed=gen_seed, student=student, protocol=protocol,
                    train_seed=train_seed)
        if method == FULL_DATA and teacher_is_full_data_run(cfg, student, train_seed):
            yield spec, None, None, None
            continue
        if method == FULL_DATA:
            (x, y), spec["epochs"] = real_split(cfg, ev.train_split()), ev.hard_for(student).full_data_epochs
        else:
            x, y = distilled_set(cfg, home, method, ipc, gen_seed)
            spec["epochs"] = cfg.epochs_for_ipc(ipc, protocol, student)
        probe = build_student(student, x.shape[1], n_classes, x.shape[-1])
        batch = ev.hard_for(student).batch_size if protocol == "hard" else ev.soft.batch_size
        micro = _micro_batch(cfg, probe, x, batch)
        key = _run_key(cfg, spec, _digest(x, y), test_digest, teacher_digest, micro, has_batch_norm(probe))
        yield spec, (x, y), micro, runs_dir / f"{key}.json"


def _student_runs(cfg: ExperimentConfig, method: str) -> list[tuple]:
    """(ipc, generation seed, student, protocol, training seed) of every run of a method's sweep;
    IPC and generation seed are None for the full-data runs (hard labels only)."""
    ev = cfg.evaluation
    if method == FULL_DATA:
        return [(None, None, s, "hard", ts) for s in ev.students for ts in ev.training_seeds]
    return [(ipc, g, s, p, ts) for ipc in cfg.ipc for g in ev.generation_seeds for s in ev.students
            for p in ev.protocols for ts in ev.training_seeds]


def _teacher_row(cfg: ExperimentConfig, home: Path, method: str, student: str, train_seed: int) -> dict:
    """The full-data row that is the teacher run itself (:func:`teacher_is_full_data_run`)."""
    meta = teacher_meta(cfg, home)
    return dict(method=method, ipc=np.nan, student=student, protocol="hard", gen_seed=0, train_seed=train_seed,
                final_acc=meta["final_acc"], best_acc=meta["best_acc"],
                ranking_acc=meta.get("ranking_acc", np.nan),  # older teachers: none
                epochs=meta["epochs"], seconds=meta["seconds"])


def _train_student(cfg: ExperimentConfig, spec: dict, train: tuple, test: tuple, teacher,
                   on_epoch: EpochProgress, micro_batch: int | None = None) -> dict:
    """Train one student run (``spec``) on ``train`` = (x, y) and evaluate it on ``test``; its row.
    ``micro_batch``: see ``_micro_batch``."""
    from .students import build_student, student_autocast
    from .training import train_hard_label, train_soft_label

    ev = cfg.evaluation
    (x, y), (xt, yt) = train, test
    epochs, seed = spec["epochs"], spec["train_seed"]
    model = build_student(spec["student"], x.shape[1], len(np.unique(yt)), x.shape[-1], seed=seed)
    t0 = time.perf_counter()
    kwargs = dict(epochs=epochs, seed=seed, orientation_sensitive=cfg.dataset.orientation_sensitive,
                  device=ev.device, evaluations=ev.evaluations, ranking_evaluations=ev.ranking_evaluations,
                  progress=on_epoch, micro_batch=micro_batch, memory_budget_mb=ev.memory_budget_mb)
    with student_autocast(ev.device, ev.precision):
        if spec["protocol"] == "hard":
            res = train_hard_label(model, x, y, xt, yt, cfg=ev.hard_for(spec["student"]), bn_stats=ev.bn_stats,
                                   **kwargs)
        else:
            res = train_soft_label(model, x, teacher, xt, yt, cfg=ev.soft, bn_stats="running", **kwargs)
    ipc, gen_seed = spec["ipc"], spec["gen_seed"]
    return dict(method=spec["method"], ipc=ipc if ipc is not None else np.nan, student=spec["student"],
                protocol=spec["protocol"], gen_seed=gen_seed if gen_seed is not None else 0, train_seed=seed,
                final_acc=res.final_acc, best_acc=res.best_acc, ranking_acc=res.ranking_acc, epochs=epochs,
                seconds=time.perf_counter() - t0)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a student-run record")


# --------------------------------------------------------------------------- feature metrics
def diversity_report(cfg: ExperimentConfig, home: Path, progress: StageProgress = no_progress) -> dict:
    """Diversity / representativeness per (method, IPC, generation seed, class) in the
    teacher's penultimate feature space, plus a t-SNE of real vs synthetic for a few
    classes. Writes ``diversity/metrics.csv`` and ``diversity/tsne.csv``."""
    from .metrics import mean_over_classes, per_class_metrics, tsne_table
    from .students import penultimate_features

    device, budget = cfg.evaluation.device, cfg.evaluation.memory_budget_mb
    teacher = load_teacher(cfg, home).to(device)
    xr, yr = real_split(cfg, cfg.evaluation.train_split())
    fr = penultimate_features(teacher, xr, device=device, memory_budget_mb=budget)
    frames, tsne_frames = [], []
    for ipc in cfg.ipc:
        tsne_inputs = {}
        for method in cfg.methods:
            for g in cfg.evaluation.generation_seeds:
                xs, ys = distilled_set(cfg, home, method, ipc, g)
                fs = penultimate_features(teacher, xs, device=device, memory_budget_mb=budget)
                df = per_class_metrics(fs, ys, fr, yr, k=cfg.evaluation.representativeness_k)
                df.insert(0, "gen_seed", g)
                df.insert(0, "ipc", ipc)
                df.insert(0, "method", method)
                frames.append(df)
                if g == cfg.evaluation.generation_seeds[0]:
                    tsne_inputs[method] = (fs, ys)
            progress(f"features of {method} at IPC {ipc}", 0.5)
        classes = sorted(np.unique(yr))[: cfg.evaluation.tsne_classes]
        if classes:
            t = tsne_table(fr, yr, tsne_inputs, classes, seed=cfg.seed)
            t.insert(0, "ipc", ipc)
            tsne_frames.append(t)
    metrics = pd.concat(frames, ignore_index=True)
    out = storage.diversity_dir(cfg, home)
    atomic_write(out / "metrics.csv", metrics.to_csv(index=False))
    tsne = pd.concat(tsne_frames, ignore_index=True) if tsne_frames else pd.DataFrame()
    atomic_write(out / "tsne.csv", tsne.to_csv(index=False))
    summary = mean_over_classes(metrics)
    return {"metrics_csv": str(out / "metrics.csv"), "tsne_csv": str(out / "tsne.csv"), "summary": summary}
