"""Student networks for evaluating a distilled set, and their input convention.

Three students, chosen by name (``EvaluationConfig.students``):

- ``"convnet"``: the dataset-distillation ConvNet (DC/DM/IDC lineage): ``depth``
  blocks of [3x3 conv, width 128 -> instance norm -> ReLU -> 2x2 average pool],
  then one linear layer on the flattened map.
- ``"resnetap10"``: ResNet-10 whose strided convolutions are replaced by stride-1
  convolutions followed by 2x2 average pooling (IDC's "ResNetAP"), so that
  downsampling does not alias on tiny synthetic sets.
- ``"resnet18"``: ``torchvision.models.resnet18`` with, for images of at most
  64 px, a CIFAR-style stem (3x3 conv, stride 1, no max-pool).

Input convention (one for every student and protocol in this package): images
are **uint8** ``(N, C, H, W)`` in ``[0, 255]``, as read from the PNG files of a
distilled set or from the real dataset. :func:`as_model_input` maps them to
float ``[-1, 1]`` (the same range as the diffusion backbone's images) right
before the forward pass; float arrays are refused because ``[0, 1]`` and
``[-1, 1]`` floats cannot be told apart reliably. Use :func:`mgd3_core.images.uint8_from_signed`
to store a decoded ``[-1, 1]`` batch.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torchvision
from torch import nn

from .batching import SplitImages, iter_batches, model_batch_size
from .config import DEFAULT_MEMORY_BUDGET_MB

STUDENTS = ("convnet", "resnetap10", "resnet18")
Norm = Literal["instance", "batch"]

CONVNET_WIDTH = 128


# ---------------------------------------------------------------- input convention
def as_uint8_images(images: torch.Tensor | np.ndarray, *, name: str = "images") -> torch.Tensor:
    """Validate and wrap uint8 images ``(N, C, H, W)`` as a tensor (no copy for tensors)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"{name} must be uint8 in [0, 255] (N, C, H, W), got dtype {images.dtype}; convert "
            "[-1, 1] floats with mgd3_core.images.uint8_from_signed"
        )
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def as_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] -> float32 in [-1, 1] on the same device."""
    return images.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------- building blocks
def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "instance":
        # GroupNorm with one channel per group == instance norm with affine
        # parameters, and unlike nn.InstanceNorm2d it behaves the same in train
        # and eval mode (no running statistics), as in the DD ConvNet.
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {kind!r}")


def convnet_depth(image_size: int) -> int:
    """Blocks of the ConvNet so the final map is about 4x4 px: 3 up to 32 px.

    32 -> 3 (4x4), 64 -> 4, 128 -> 5, 256 -> 6 (the ConvNet-6 used for 256 px
    ImageNet subsets).
    """
    if image_size <= 32:
        return 3
    return min(6, max(3, round(math.log2(image_size / 4))))


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet. ``(B, C, H, W)`` -> logits ``(B, K)``.

    ``features`` returns the flattened last map, ``(B, width * (H // 2**depth)**2)``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *,
                 depth: int | None = None, width: int = CONVNET_WIDTH, norm: Norm = "instance"):
        super().__init__()
        depth = convnet_depth(image_size) if depth is None else depth
        if image_size // 2**depth < 1:
            raise ValueError(f"ConvNet depth {depth} pools a {image_size} px image below 1 px")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(norm, width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        side = image_size // 2**depth
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _APBlock(nn.Module):
    """Basic residual block; downsampling by 2x2 average pooling after a stride-1 conv."""

    def __init__(self, cin: int, cout: int, downsample: bool, norm: Norm):
        super().__init__()
        pool: list[nn.Module] = [nn.AvgPool2d(2)] if downsample else []
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), *pool,
                                   _norm(norm, cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(norm, cout))
        self.shortcut: nn.Module = nn.Identity()
        if downsample or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), *pool, _norm(norm, cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetAP10(nn.Module):
    """ResNet-10 (one block per stage, widths 64-128-256-512) with average-pool downsampling.

    Stem: 3x3 conv stride 1; images above 64 px are first average-pooled by 2
    per doubling over 64 px, so stages always see at most 64x64 maps.
    ``features`` -> ``(B, 512)`` after global average pooling.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, norm: Norm = "instance"):
        super().__init__()
        stem_pools = max(0, math.ceil(math.log2(image_size / 64))) if image_size > 64 else 0
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), _norm(norm, 64),
                                  nn.ReLU(inplace=True), *[nn.AvgPool2d(2) for _ in range(stem_pools)])
        widths = (64, 128, 256, 512)
        blocks, cin = [], 64
        for i, w in enumerate(widths):
            blocks.append(_APBlock(cin, w, downsample=i > 0, norm=norm))
            cin = w
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if image_size <= 64:
        # ImageNet's 7x7/2 conv + max-pool would shrink a 32 px image to 8 px
        # before the first stage; small-input ResNets use a 3x3/1 stem instead.
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    # Channels-last weights and inputs keep every activation channels-last, which
    # oneDNN (CPU) and cuDNN convolve faster: ~1.2x per training step on 2 CPU
    # cores at 32 px (experiments/students.py). The ConvNet gains nothing and keeps the default.
    model.register_forward_pre_hook(_channels_last_input)
    return model.to(memory_format=torch.channels_last)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def build_student(name: str, in_channels: int, num_classes: int, image_size: int, *,
                  seed: int | None = None, norm: Norm | None = None,
                  width: int = CONVNET_WIDTH) -> nn.Module:
    """A freshly initialised student.

    Args:
        name: one of :data:`STUDENTS`.
        in_channels: image channels (1 for MNIST, 3 for RGB).
        num_classes: K, the width of the logits.
        image_size: H == W in px.
        seed: seeds the weight initialisation (without touching the global RNG);
            ``None`` uses the global RNG.
        norm: ``"instance"`` (default for convnet/resnetap10) or ``"batch"``;
            resnet18 is torchvision's and always uses batch norm.
        width: ConvNet channels (128 in the DD literature); convnet only.
    """
    if name not in STUDENTS:
        raise ValueError(f"student name {name!r} is unknown; choose from {STUDENTS}")
    for arg, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                            ("image_size", image_size, 8)):
        if int(value) < low:
            raise ValueError(f"build_student: {arg} must be >= {low}, got {value}")
    if width != CONVNET_WIDTH and name != "convnet":
        raise ValueError(f"build_student: width applies to 'convnet' only, not {name!r}")
    if width < 1:
        raise ValueError(f"build_student: width must be >= 1, got {width}")
    if name == "resnet18" and norm not in (None, "batch"):
        raise ValueError("build_student: resnet18 is torchvision's and has batch norm; leave norm=None")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "convnet":
            return ConvNet(in_channels, num_classes, image_size, norm=norm or "instance", width=width)
        if name == "resnetap10":
            return ResNetAP10(in_channels, num_classes, image_size, norm=norm or "instance")
        return _resnet18(in_channels, num_classes, image_size)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to take features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, images, *, batch_size: int | None = None,
                         device: str | torch.device | None = None,
                         memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> np.ndarray:
    """Inputs of the classifier head, ``(N, d)`` float32 numpy, in eval mode.

    ``images`` are uint8 ``(N, C, H, W)`` (see the module docstring), in memory
    or a :class:`~mgd3_core.batching.SplitImages` read from disk batch by batch.
    ``batch_size`` None: as many images as fit ``memory_budget_mb`` MiB of
    activations. Uses the model's ``features`` method when it has one, otherwise
    a forward hook on its last ``nn.Linear`` (torchvision models). The model's
    train/eval mode is restored afterwards.
    """
    if not isinstance(images, SplitImages):
        images = as_uint8_images(images)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if batch_size is None:
        batch_size = model_batch_size(model, images.shape[1:], memory_budget_mb, training=False)
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hook = None
    if callable(getattr(model, "features", None)):
        extract = model.features
    else:
        hook = _last_linear(model).register_forward_hook(lambda m, inp, out: captured.append(inp[0]))

        def extract(x: torch.Tensor) -> torch.Tensor:
            model(x)
            return captured.pop()
    try:
        out = [extract(as_model_input(batch.to(device))).float().cpu() for batch in iter_batches(images, batch_size)]
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return torch.cat(out).flatten(1).numpy() if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, images, labels: torch.Tensor | np.ndarray, *,
             batch_size: int | None = None, device: str | torch.device = "cpu",
             memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> float:
    """Top-1 accuracy in percent of ``model`` on uint8 ``images`` (N, C, H, W) with int ``labels`` (N,).

    ``images`` may be in memory or a :class:`~mgd3_core.batching.SplitImages` read from disk;
    either way only one batch is on ``device`` at a time. ``batch_size`` None: as many images
    as fit ``memory_budget_mb`` MiB of activations (:func:`~mgd3_core.batching.model_batch_size`).
    """
    images = _as_images(images, "eval_images")
    labels = _as_labels(labels, len(images), "eval_labels")
    if batch_size is None:
        batch_size = model_batch_size(model, images.shape[1:], memory_budget_mb, training=False)
    was_training = model.training
    model.eval()
    correct, pos = 0, 0
    try:
        for batch in iter_batches(images, batch_size):
            logits = model(as_model_input(batch.to(device)))
            correct += int((logits.argmax(1).cpu() == labels[pos:pos + len(batch)]).sum())
            pos += len(batch)
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(images), 1)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` keeps running statistics (batch norm) that eval mode uses."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, images, *, device: str | torch.device = "cpu",
                       memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> bool:
    """Replace the batch-norm running statistics by those of ``images`` (uint8 (N, C, H, W),
    in memory or a SplitImages), un-augmented, in train-mode forward passes without gradients.

    Statistics gathered during training come from augmented (cropped, CutMixed) batches; on a
    small distilled set they can sit far from those of clean images, which eval mode then
    normalises the test images with. One pass when the images fit ``memory_budget_mb``, else the
    mean of the statistics of near-equal batches (torch's cumulative average). Returns False,
    doing nothing, for a model without batch norm; the model's mode and momenta are restored."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(images) == 0:
        return bool(layers)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this pass's batches
    was_training = model.training
    model.train()
    try:
        batch_size = model_batch_size(model, images.shape[1:], memory_budget_mb, training=False)
        batch_size = math.ceil(len(images) / math.ceil(len(images) / batch_size))  # near-equal sizes: no batch of 1
        for batch in iter_batches(images, batch_size):
            model(as_model_input(batch.to(device)))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return True


@torch.no_grad()
def num_outputs(model: nn.Module, probe: torch.Tensor, device: torch.device) -> int:
    """Width of the logits, from one forward pass in eval mode (works for any head)."""
    was_training = model.training
    model.to(device).eval()
    try:
        return int(model(as_model_input(probe.to(device))).shape[1])
    finally:
        model.train(was_training)


def _as_images(images, name: str):
    """uint8 (N, C, H, W): an in-memory tensor (validated) or a lazy SplitImages as is."""
    return images if isinstance(images, SplitImages) else as_uint8_images(images, name=name)



def _as_labels(labels: torch.Tensor | np.ndarray, n: int, name: str) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().cpu()
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    return labels


def student_autocast(device: str | torch.device, precision: str):
    """The context a student run trains and is evaluated in (``evaluation.precision``):
    bfloat16 autocast on ``device``'s kind, or nothing for float32. Without autocast's cast
    cache: around a whole run it would keep the bfloat16 copies of the first step's weights."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bfloat16",
                          cache_enabled=False)
