"""Student training protocols: hard labels (IDC/MinMax) and soft labels (RDED/SRe2L).

Both protocols share one epoch loop (:func:`_fit`), one augmentation
(:class:`TrainAugment`: random resized crop, optional horizontal flip, CutMix)
and one evaluation (:func:`evaluate`); they differ only in the loss, the
optimiser and the schedule:

==========  ==========================================  ==========================
protocol    loss                                        optimiser / schedule
==========  ==========================================  ==========================
hard        cross-entropy on (CutMix-mixed) one-hot      SGD + momentum, LR x 0.2
            labels                                      at 2/3 and 5/6 of training
soft        KL(teacher || student) at temperature T,     AdamW, cosine to 0
            x T^2, teacher run on the augmented batch
==========  ==========================================  ==========================

Conventions: images are uint8 ``(N, C, H, W)`` (see :mod:`mgd3_core.students`),
labels int ``(N,)`` in ``0..K-1``, accuracies are top-1 in **percent**. All
randomness (shuffling, crops, flips, CutMix) comes from one ``torch.Generator``
seeded with ``seed``; weight initialisation is seeded in
:func:`mgd3_core.students.build_student`. Runs are therefore repeatable on the
same machine and library versions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_MEMORY_BUDGET_MB, HardLabelConfig, SoftLabelConfig
from .progress import EpochProgress
from .students import (_as_images, _as_labels, as_model_input, evaluate,  # noqa: F401  (evaluate: re-exported)
                       num_outputs, recompute_bn_stats)


# Random resized crop aspect-ratio range (torchvision's default).
RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class TrainResult:
    """Outcome of one student training run.

    ``final_acc`` (top-1 % on the evaluation split after the last epoch) is the
    headline number; ``best_acc`` is the maximum over the periodic evaluations
    (optimistic: it peeks at the evaluation split, report it labelled as best);
    ``ranking_acc`` is the maximum over the evaluations in the last fifth of
    training (:func:`ranking_window_start`), the accuracy DD-Ranking scores.
    ``history`` has one dict per epoch: ``epoch`` (1-based), ``loss`` (mean
    training loss), ``lr`` (learning rate used in that epoch) and ``eval_acc``
    (None when not evaluated after that epoch).
    """

    final_acc: float
    best_acc: float
    best_epoch: int
    epochs: int
    seconds: float
    history: list[dict] = field(repr=False)
    ranking_acc: float = float("nan")


# ---------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentParams:
    """Per-sample crop boxes and flips of one batch.

    ``boxes``: ``(B, 4)`` float (top, left, height, width) in pixels of the
    input; ``flips``: ``(B,)`` bool.
    """

    boxes: torch.Tensor
    flips: torch.Tensor


@dataclass(frozen=True)
class CutMixParams:
    """One CutMix draw for a batch: partner permutation, pasted box, label weight.

    ``box`` is (top, left, bottom, right) in integer pixels (bottom/right
    exclusive); ``lam`` is the fraction of each image that stays its own, i.e.
    ``1 - box area / (H * W)`` (the weight of the image's own label).
    """

    perm: torch.Tensor
    box: tuple[int, int, int, int]
    lam: float


@dataclass(frozen=True)
class TrainAugment:
    """Random resized crop (+ horizontal flip) per image, then CutMix per batch, on float
    ``(B, C, H, W)`` batches; crop + flip are one batched bilinear ``grid_sample`` (exact for
    the identity box)."""

    rrc_scale: tuple[float, float]
    flip: bool
    cutmix_prob: float
    cutmix_beta: float

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> AugmentParams:
        """Crop boxes as torchvision draws them: area fraction ~ U(rrc_scale), log aspect ~
        U(log 3/4, log 4/3), up to 10 tries per image, the whole image when none fits."""
        lo, hi = self.rrc_scale
        u_area, u_ratio = torch.rand(2, n, _RRC_TRIES, generator=generator, dtype=torch.float64)
        area = height * width * (lo + (hi - lo) * u_area)
        log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (w <= width) & (h <= height)
        first = torch.argmax(fits.to(torch.int8), dim=1)  # index of the first fitting try
        rows = torch.arange(n)
        any_fit = fits.any(dim=1)
        w = torch.where(any_fit, w[rows, first], torch.full((n,), float(width), dtype=torch.float64))
        h = torch.where(any_fit, h[rows, first], torch.full((n,), float(height), dtype=torch.float64))
        top = (height - h) * torch.rand(n, generator=generator, dtype=torch.float64)
        left = (width - w) * torch.rand(n, generator=generator, dtype=torch.float64)
        flips = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        return AugmentParams(boxes=torch.stack([top, left, h, w], dim=1).float(), flips=flips)

    @staticmethod
    def apply(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Crop each box, resize it back to (H, W), mirror where ``flips``."""
        b, _, height, width = images.shape
        top, left, h, w = params.boxes.to(images.device).unbind(1)
        # Affine map from output coords in [-1, 1] to input coords (align_corners=False):
        # the box spans [2*left/W - 1, 2*(left+w)/W - 1] horizontally.
        sx, sy = w / width, h / height
        cx, cy = (2 * left + w) / width - 1, (2 * top + h) / height - 1
        sign = 1.0 - 2.0 * params.flips.to(images.device, images.dtype)
        theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = sx * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = sy, cy
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def sample_cutmix(self, n: int, height: int, width: int, generator: torch.Generator) -> CutMixParams:
        """A box with area fraction about 1 - lam, lam ~ Beta(beta, beta), centre uniform, clipped."""
        # numpy's Beta sampler, seeded from the torch generator, keeps the run deterministic.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        lam = float(rng.beta(self.cutmix_beta, self.cutmix_beta))
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
        return CutMixParams(perm=torch.randperm(n, generator=generator), box=(top, left, bottom, right), lam=lam)

    @staticmethod
    def apply_cutmix(images: torch.Tensor, targets: torch.Tensor | None,
                     params: CutMixParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Paste the box from ``images[perm]``; mix targets ``(B, K)`` by the pasted area."""
        perm = params.perm.to(images.device)
        top, left, bottom, right = params.box
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
        if targets is not None:
            targets = params.lam * targets + (1.0 - params.lam) * targets[perm]
        return mixed, targets

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, _, height, width = images.shape
        images = self.apply(images, self.sample(b, height, width, generator))
        if self.cutmix_prob > 0 and torch.rand((), generator=generator) < self.cutmix_prob:
            images, targets = self.apply_cutmix(images, targets, self.sample_cutmix(b, height, width, generator))
        return images, targets


def make_augment(cfg: HardLabelConfig | SoftLabelConfig, *, orientation_sensitive: bool) -> TrainAugment:
    """The protocol's augmentation: crop scale and CutMix from ``cfg``; no flip for digits/text."""
    return TrainAugment(rrc_scale=(float(cfg.rrc_scale[0]), float(cfg.rrc_scale[1])),
                        flip=not orientation_sensitive,
                        cutmix_prob=float(cfg.cutmix_prob), cutmix_beta=float(cfg.cutmix_beta))


# ---------------------------------------------------------------- schedule
def multistep_milestones(epochs: int) -> list[int]:
    """Epoch indices (0-based) from which the LR is x0.2 and x0.04: 2/3 and 5/6 of training.

    A milestone of 0 (1 epoch) is dropped: torch's MultiStepLR would apply it
    before the first step, training the whole run at 0.04 x the LR.
    """
    return [m for m in (2 * epochs // 3, 5 * epochs // 6) if m >= 1]


def lr_schedule(optimizer: torch.optim.Optimizer, *, kind: Literal["multistep", "cosine"],
                epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR schedule (call ``.step()`` once after each epoch).

    ``"multistep"`` (hard-label protocol): x0.2 at :func:`multistep_milestones`.
    ``"cosine"`` (soft-label protocol): half cosine from the base LR to 0 over ``epochs``.
    """
    if epochs < 1:
        raise ValueError(f"lr_schedule: epochs must be >= 1, got {epochs}")
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=multistep_milestones(epochs), gamma=0.2)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
    raise ValueError(f"lr_schedule: kind must be 'multistep' or 'cosine', got {kind!r}")


# ---------------------------------------------------------------- evaluation (students.evaluate)
def ranking_window_start(epochs: int) -> int:
    """Evaluations after this (1-based) epoch form the ranking window: the last fifth of training.

    DD-Ranking (Li et al. 2025) tests after 80 % of training and scores the best of those tests.
    """
    return math.floor(0.8 * epochs)


def _eval_epochs(epochs: int, evaluations: int, ranking_evaluations: int = 1) -> set[int]:
    """1-based epochs after which to evaluate: ``evaluations`` evenly spaced over the run and
    ``ranking_evaluations`` evenly spaced over the ranking window, the last of each final."""
    for name, value in (("evaluations", evaluations), ("ranking_evaluations", ranking_evaluations)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (1 = only after the last epoch), got {value}")
    start = ranking_window_start(epochs)
    window = {start + math.ceil((epochs - start) * i / ranking_evaluations) for i in range(1, ranking_evaluations + 1)}
    return {math.ceil(epochs * i / evaluations) for i in range(1, evaluations + 1)} | window


# ---------------------------------------------------------------- the shared loop
BatchLoss = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
BNStats = Literal["recomputed", "running"]


def _fit(model: nn.Module, images, targets: torch.Tensor | None, *, batch_loss: BatchLoss,
         optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
         augment: TrainAugment, epochs: int, batch_size: int, seed: int,
         eval_images, eval_labels: torch.Tensor, evaluations: int,
         device: torch.device, progress: EpochProgress | None, ranking_evaluations: int = 1,
         micro_batch: int | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
         bn_stats: BNStats = "recomputed") -> TrainResult:
    """Shuffle -> augment -> loss -> step, per epoch; evaluate on schedule. ``images`` uint8
    (N, C, H, W), in memory or a lazy SplitImages: one batch at a time is read and moved to
    ``device``. ``targets`` float (N, K) or None (soft labels: the teacher in ``batch_loss``).
    ``micro_batch`` < ``batch_size``: gradients of micro-batches accumulated per step.
    ``bn_stats="recomputed"``: batch-norm statistics recomputed on the clean ``images`` before
    each evaluation (:func:`~mgd3_core.students.recompute_bn_stats`); "running": as trained."""
    if bn_stats not in ("recomputed", "running"):
        raise ValueError(f"bn_stats must be 'recomputed' or 'running', got {bn_stats!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    micro = min(micro_batch or batch_size, batch_size)
    generator = torch.Generator().manual_seed(int(seed))
    eval_at = _eval_epochs(epochs, evaluations, ranking_evaluations)
    window_start = ranking_window_start(epochs)
    ranking_acc = -1.0
    model.to(device).train()
    history: list[dict] = []
    best_acc, best_epoch, final_acc = -1.0, 0, float("nan")
    start = time.perf_counter()
    n = len(images)
    for epoch in range(1, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(n, generator=generator)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x, y = augment(as_model_input(images[idx].to(device)),
                           targets[idx].to(device) if targets is not None else None, generator)
            optimizer.zero_grad(set_to_none=True)
            batch_sum = 0.0
            for j in range(0, len(idx), micro):
                share = min(micro, len(idx) - j) / len(idx)
                loss = batch_loss(model, x[j:j + micro], y[j:j + micro] if y is not None else None)
                (loss * share if share < 1 else loss).backward()
                batch_sum += float(loss.detach()) * share
            optimizer.step()
            loss_sum += batch_sum * len(idx)
        scheduler.step()
        record = {"epoch": epoch, "loss": loss_sum / n, "lr": lr, "eval_acc": None}
        if epoch in eval_at:
            if bn_stats == "recomputed":
                recompute_bn_stats(model, images, device=device, memory_budget_mb=memory_budget_mb)
            acc = evaluate(model, eval_images, eval_labels, device=device, memory_budget_mb=memory_budget_mb)
            record["eval_acc"] = acc
            final_acc = acc
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch
            if epoch > window_start:
                ranking_acc = max(ranking_acc, acc)
            model.train()
        history.append(record)
        if progress is not None:
            progress({**record, "epochs": epochs})
    return TrainResult(final_acc=final_acc, best_acc=best_acc, best_epoch=best_epoch, epochs=epochs,
                       seconds=time.perf_counter() - start, history=history, ranking_acc=ranking_acc)


def _prepare(images, labels, eval_images, eval_labels):
    images = _as_images(images, "train_images")
    eval_images = _as_images(eval_images, "eval_images")
    if images.shape[1:] != eval_images.shape[1:]:
        raise ValueError(f"train_images are {tuple(images.shape[1:])} per image but eval_images are "
                         f"{tuple(eval_images.shape[1:])}; both must be (C, H, W) alike")
    labels = _as_labels(labels, len(images), "train_labels") if labels is not None else None
    return images, labels, eval_images, _as_labels(eval_labels, len(eval_images), "eval_labels")


# ---------------------------------------------------------------- hard-label protocol
def train_hard_label(model: nn.Module, train_images, train_labels, eval_images, eval_labels, *,
                     cfg: HardLabelConfig, epochs: int, seed: int, orientation_sensitive: bool,
                     device: str | torch.device = "cpu", evaluations: int = 2, ranking_evaluations: int = 1,
                     progress: EpochProgress | None = None, micro_batch: int | None = None,
                     memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                     bn_stats: BNStats = "recomputed") -> TrainResult:
    """Train ``model`` in place on (distilled or real) images with their hard labels.

    IDC/MinMax protocol: SGD(lr, momentum, weight decay from ``cfg``), batch
    ``cfg.batch_size``, LR x0.2 at 2/3 and 5/6 of ``epochs``, random resized
    crop (``cfg.rrc_scale``), horizontal flip unless ``orientation_sensitive``,
    CutMix with probability ``cfg.cutmix_prob`` (labels mixed by area).

    Args:
        train_images / eval_images: uint8 (N, C, H, W); eval is the real test split.
        train_labels / eval_labels: int (N,), classes 0..K-1 with K = the model's outputs.
        epochs: e.g. ``ExperimentConfig.epochs_for_ipc(ipc)`` or ``cfg.full_data_epochs``.
        evaluations: evenly spaced evaluations on the eval split, the last after the
            final epoch (1 = final only). Each costs a forward pass over the eval split.
        ranking_evaluations: evaluations in the last fifth of training whose best is
            ``TrainResult.ranking_acc`` (1 = the final epoch only).
        progress: called after every epoch with the history record plus ``epochs``.
        bn_stats: batch-norm students' statistics at evaluation (see :func:`_fit`).
    """
    device = torch.device(device)
    images, labels, eval_images, eval_labels = _prepare(train_images, train_labels, eval_images, eval_labels)
    num_classes = num_outputs(model, images[:1], device)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes - 1}] (the model's outputs), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")
    targets = F.one_hot(labels, num_classes).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def batch_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(m(x).float(), y)  # y: (B, K) probabilities after CutMix; float: autocast

    return _fit(model, images, targets, batch_loss=batch_loss, optimizer=optimizer,
                scheduler=lr_schedule(optimizer, kind="multistep", epochs=epochs),
                augment=make_augment(cfg, orientation_sensitive=orientation_sensitive),
                epochs=epochs, batch_size=cfg.batch_size, seed=seed, eval_images=eval_images,
                eval_labels=eval_labels, evaluations=evaluations, device=device, progress=progress,
                ranking_evaluations=ranking_evaluations, micro_batch=micro_batch,
                memory_budget_mb=memory_budget_mb, bn_stats=bn_stats)


# ---------------------------------------------------------------- soft-label protocol
def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) x T^2, averaged over the batch (Hinton et al. 2015)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def train_soft_label(student: nn.Module, train_images, teacher: nn.Module, eval_images, eval_labels, *,
                     cfg: SoftLabelConfig, seed: int, orientation_sensitive: bool, epochs: int | None = None,
                     device: str | torch.device = "cpu", evaluations: int = 2, ranking_evaluations: int = 1,
                     progress: EpochProgress | None = None, micro_batch: int | None = None,
                     memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                     bn_stats: BNStats = "running") -> TrainResult:
    """Train ``student`` in place to match ``teacher`` on augmented distilled images.

    RDED/SRe2L protocol: each augmented (crop/flip/CutMix) batch is labelled
    by the teacher on the fly; loss :func:`soft_label_loss` at
    ``cfg.temperature``; AdamW(``cfg.lr``, ``cfg.weight_decay``), cosine to 0
    over ``epochs`` (default ``cfg.epochs``). The images' own labels are not
    used. The teacher is put in eval mode and not updated. ``bn_stats`` defaults to "running" here:
    recomputing on clean images measured no better with soft labels (docs/decisions.md).
    """
    device = torch.device(device)
    images, _, eval_images, eval_labels = _prepare(train_images, None, eval_images, eval_labels)
    epochs = cfg.epochs if epochs is None else epochs
    teacher.to(device).eval()
    n_student = num_outputs(student, images[:1], device)
    n_teacher = num_outputs(teacher, images[:1], device)
    if n_student != n_teacher:
        raise ValueError(f"student has {n_student} outputs but teacher has {n_teacher}; they must agree")
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def batch_loss(m: nn.Module, x: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return soft_label_loss(m(x).float(), teacher_logits.float(), cfg.temperature)  # float: autocast

    return _fit(student, images, None, batch_loss=batch_loss, optimizer=optimizer,
                scheduler=lr_schedule(optimizer, kind="cosine", epochs=epochs),
                augment=make_augment(cfg, orientation_sensitive=orientation_sensitive),
                epochs=epochs, batch_size=cfg.batch_size, seed=seed, eval_images=eval_images,
                eval_labels=eval_labels, evaluations=evaluations, device=device, progress=progress,
                ranking_evaluations=ranking_evaluations, micro_batch=micro_batch,
                memory_budget_mb=memory_budget_mb, bn_stats=bn_stats)
