"""The ``evaluation`` section of the experiment config: students, protocols, teacher.

Re-exported by :mod:`mgd3_core.config`, which is where callers import it from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .config_base import DEFAULT_MEMORY_BUDGET_MB, _Strict

Student = Literal["convnet", "resnetap10", "resnet18"]

# Where students are scored (``evaluation.split``) -> (the dataset split they and everything they are
# built from learn from, the split they are scored on): "validation" holds out
# ``dataset.validation_fraction`` of the training split, so settings chosen on it never see the test split.
SPLIT_DATA = {"test": ("train", "test"), "validation": ("fit", "val")}


class HardLabelConfig(_Strict):
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=64, ge=1)
    rrc_scale: list[float] = [0.5, 1.0]
    cutmix_prob: float = Field(default=0.5, ge=0, le=1)
    cutmix_beta: float = Field(default=1.0, gt=0)
    # Epochs by IPC (the nearest key at or below a given IPC applies).
    epochs_by_ipc: dict[int, int] = {1: 300, 10: 300, 50: 200}
    full_data_epochs: int = Field(default=30, ge=1)

    @field_validator("rrc_scale")
    @classmethod
    def _scale_pair(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not (0 < v[0] <= v[1] <= 1):
            raise ValueError("rrc_scale must be [low, high] with 0 < low <= high <= 1")
        return v


class SoftLabelConfig(_Strict):
    temperature: float = Field(default=4.0, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    epochs: int = Field(default=300, ge=1)
    # Epochs by IPC as in HardLabelConfig; None = ``epochs`` at every IPC (RDED: 300).
    epochs_by_ipc: dict[int, int] | None = None
    batch_size: int = Field(default=64, ge=1)
    # Augmentation of the soft-label protocol; same meaning as in HardLabelConfig.
    rrc_scale: list[float] = [0.5, 1.0]
    cutmix_prob: float = Field(default=0.5, ge=0, le=1)
    cutmix_beta: float = Field(default=1.0, gt=0)

    @field_validator("rrc_scale")
    @classmethod
    def _scale_pair(cls, v: list[float]) -> list[float]:
        return HardLabelConfig._scale_pair(v)


class TeacherConfig(_Strict):
    """The classifier trained on the real training split (hard-label protocol, first
    training seed): the soft-label teacher, the feature space of the diversity metrics,
    and the full-data run of its own student when ``epochs`` = ``hard.full_data_epochs``."""

    model: Student = "convnet"
    epochs: int | None = Field(default=None, ge=1)  # None = hard.full_data_epochs


class EvaluationConfig(_Strict):
    protocols: list[Literal["hard", "soft"]] = ["hard"]
    students: list[Student] = ["convnet"]
    generation_seeds: list[int] = [0, 1, 2]
    training_seeds: list[int] = [0]
    hard: HardLabelConfig = HardLabelConfig()
    # Hard-label settings of one student where they differ from ``hard`` (only the keys given),
    # e.g. {resnet18: {epochs_by_ipc: {1: 300, 10: 100, 50: 100}}}; see ``hard_for``.
    hard_by_student: dict[Student, dict] = {}
    soft: SoftLabelConfig = SoftLabelConfig()
    teacher: TeacherConfig = TeacherConfig()
    representativeness_k: int = Field(default=50, ge=1)
    tsne_classes: int = Field(default=3, ge=0)
    device: str = "cpu"
    # Student runs' forward passes: bfloat16 = autocast (weights, optimiser and losses stay float32).
    precision: Literal["float32", "bfloat16"] = "float32"
    # Test-split evaluations per run, evenly spaced, the last after the final epoch (the headline).
    evaluations: int = Field(default=2, ge=1)
    # Extra test-split evaluations over the last fifth of each run (1 = the final epoch only); the
    # DD-Ranking scores use their best, as DD-Ranking does (tests after 80 % of training, keeps the best).
    ranking_evaluations: int = Field(default=1, ge=1)
    # Batch-norm students (resnet18) trained with hard labels, at each evaluation: statistics recomputed
    # over the clean training images, or "running" as gathered on augmented batches (soft labels: always
    # running; docs/decisions.md: ResNet-18 with hard labels).
    bn_stats: Literal["recomputed", "running"] = "recomputed"
    # Activation MiB of one batch on evaluation.device: sizes evaluation batches and training micro-batches.
    memory_budget_mb: int = Field(default=DEFAULT_MEMORY_BUDGET_MB, ge=16)
    # Score students on the real test split, or on the validation part of the training split (modes, real
    # baselines, teacher and full-data runs then use the rest of it, the "fit" split): for choosing settings.
    # Left out of dumps while "test", so the versions and keys from before the option stay the same.
    split: Literal["test", "validation"] = Field(default="test", exclude_if=lambda v: v == "test")

    @field_validator("generation_seeds", "training_seeds")
    @classmethod
    def _non_empty_unique(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct integers")
        return v

    @model_validator(mode="after")
    def _student_hard_settings(self) -> "EvaluationConfig":
        for student in self.hard_by_student:
            try:
                self.hard_for(student)
            except ValidationError as e:
                bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise ValueError(f"hard_by_student.{student}: {bad}") from None
        return self

    def train_split(self) -> str:
        """The dataset split students, teacher, modes and real baselines learn from: "train" or "fit"."""
        return SPLIT_DATA[self.split][0]

    def score_split(self) -> str:
        """The dataset split students are scored on: "test" or "val"."""
        return SPLIT_DATA[self.split][1]

    def hard_for(self, student: str | None) -> HardLabelConfig:
        """The hard-label settings ``student`` trains with: ``hard`` with its ``hard_by_student`` keys."""
        override = self.hard_by_student.get(student)  # type: ignore[call-overload]
        if not override:
            return self.hard
        return HardLabelConfig.model_validate({**self.hard.model_dump(), **override})
