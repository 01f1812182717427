"""The three progress callbacks of the core, named after what they report.

- ``StageProgress(message, fraction)``: a stage function (``pipeline``, ``evaluate``) reporting
  a human-readable line and how far it is, 0..1; the Dagster layer logs it.
- ``EpochProgress(record)``: one student training epoch (``training``): a dict with
  ``epoch``, ``epochs``, ``loss`` and ``eval_acc`` (None between evaluations).
- ``TrainingProgress(stage, step, total, metrics)``: one optimisation step of the embedded
  backbone's training (``backbones/train_loop.py``).
"""

from __future__ import annotations

from typing import Callable, Protocol

StageProgress = Callable[[str, float], None]
EpochProgress = Callable[[dict], None]


class TrainingProgress(Protocol):
    def __call__(self, stage: str, step: int, total: int, metrics: dict) -> None: ...


def no_progress(message: str, fraction: float) -> None:  # pragma: no cover - trivial
    """The default ``StageProgress``: report nothing."""


def epoch_lines(progress: StageProgress, label: str, n: int, total: int) -> EpochProgress:
    """An EpochProgress for run ``n`` of ``total``: about five lines per run, and every evaluation."""
    def report(r: dict) -> None:
        epochs = r["epochs"]
        if r["eval_acc"] is None and r["epoch"] % max(1, epochs // 5):
            return
        acc = f", test {r['eval_acc']:.2f}%" if r["eval_acc"] is not None else ""
        progress(f"{label}: epoch {r['epoch']}/{epochs} loss {r['loss']:.3f}{acc} ({n + 1}/{total})",
                 (n + r["epoch"] / epochs) / total)
    return report
