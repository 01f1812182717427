"""Distillation: one method's sets of several classes, written per class (what ``distilled_images`` calls).

Reads the modes (``pipeline.read_modes``) and, for the methods that sample or decode, the backbone
(``pipeline.get_backbone``, once per process); writes ImageFolder PNGs, latents and a lineage
manifest per (IPC, generation seed) set through ``distilled.write_distilled_class``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import storage
from .config import DIFFUSION_METHODS, ExperimentConfig, finder_key
from .distances import pairwise_distances
from .distilled import DistilledClass, write_distilled_class
from .images import to_uint8
from . import pipeline  # pipeline.get_backbone: the per-process backbone cache (looked up at call time)
from .pipeline import ClassModes, backbone_fingerprint, class_info, open_source, read_modes, vae_fingerprint
from .progress import StageProgress, no_progress
from .sampling import SamplerSettings, image_seed, sample


# --------------------------------------------------------------------------- distillation
def _distances(latents: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of image i to its own mode i, and to the nearest other mode."""
    d = pairwise_distances(latents.reshape(len(latents), -1), centroids.reshape(len(centroids), -1))
    own = d[np.arange(len(d)), np.arange(len(d))]
    if d.shape[1] > 1:
        d_other = d.copy()
        d_other[np.arange(len(d)), np.arange(len(d))] = np.inf
        other = d_other.min(1)
    else:
        other = np.full(len(d), np.nan)
    return own, other


def image_seeds(cfg: ExperimentConfig, class_id: str, ipc: int, gen_seed: int) -> list[int]:
    """Sampling seeds of the ``ipc`` images of one class in one generation seed's set."""
    return [image_seed(cfg.seed * 1_000_003 + gen_seed, class_id, ipc, i) for i in range(ipc)]


SetKey = tuple[int, int]  # (IPC, generation seed): one distilled set of a method


def set_keys(cfg: ExperimentConfig) -> list[SetKey]:
    """Every (IPC, generation seed) set a method writes, in a fixed order."""
    return [(ipc, s) for ipc in cfg.ipc for s in cfg.evaluation.generation_seeds]


@dataclass
class SetContent:
    """One class of one distilled set, before it is written."""

    latents: np.ndarray  # (ipc, C, h, w) float32
    images: np.ndarray  # (ipc, C, H, W) uint8
    extra: list[dict]  # per image: the method's own manifest columns


@dataclass
class DistillResult:
    method: str
    class_id: str
    classes: list[DistilledClass] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    preview: np.ndarray | None = None  # uint8 images of the first set, for thumbnails


def distill_class(
    cfg: ExperimentConfig, home: Path, method: str, class_id: str, progress: StageProgress = no_progress
) -> DistillResult:
    """Write every (IPC, generation seed) set of one method for one class (``distill_classes``
    for one class; its error is raised)."""
    for _, result in distill_classes(cfg, home, method, [class_id], progress):
        if isinstance(result, BaseException):
            raise result
        return result
    raise AssertionError("distill_classes yielded nothing")  # pragma: no cover


def distill_classes(cfg: ExperimentConfig, home: Path, method: str, class_ids: list[str],
                    progress: StageProgress = no_progress) -> Iterator[tuple[str, DistillResult | Exception]]:
    """Write every (IPC, generation seed) set of one method for several classes; yields
    ``(class id, DistillResult)`` as each class is written, or ``(class id, the exception)`` for a
    class that failed (its modes missing, say): the other classes go on.

    A diffusion method samples all classes' images in one ``sampling.sample`` call, up to
    ``sampler.batch_size`` images per forward pass: a GPU sees full batches, not one class's
    ``IPC x seeds`` images. Decoding and writing stay per class. An image depends on its class,
    mode, seed and the settings, not on which classes share its run (``sampling.sample``; batch
    composition changes only float rounding, see the README).

    Two runs sharing a (method, class) at once, e.g. on two cluster workers sharing the storage
    root, take turns: the second waits for the first's locks (``flock``, taken in class order, so
    two runs never wait on each other) and then writes the same files again; outputs never mix.
    An error that concerns every class (the backbone does not load) is raised.
    """
    from .latent_writer import writer_lock

    with contextlib.ExitStack() as locks:
        for class_id in sorted(set(class_ids)):
            locks.enter_context(writer_lock(storage.distill_lock(cfg, home, method, class_id), timeout=None))
        yield from _distill_classes(cfg, home, method, list(dict.fromkeys(class_ids)), progress)


def _distill_classes(cfg: ExperimentConfig, home: Path, method: str, class_ids: list[str],
                     progress: StageProgress) -> Iterator[tuple[str, DistillResult | Exception]]:
    try:
        variant = cfg.variant(method)  # a base method or a variant: what runs is its kind
    except KeyError as e:
        raise ValueError(f"unknown method {method!r}: {e}") from None
    kind, keys = variant.kind, set_keys(cfg)
    ready: dict[str, tuple] = {}
    for class_id in class_ids:
        try:
            ready[class_id] = (class_info(cfg, class_id),
                               {key: read_modes(cfg, home, class_id, *key, variant.modes) for key in keys})
        except Exception as e:  # noqa: BLE001 - reported per class; the others go on
            yield class_id, e
    if not ready:
        return
    needs_backbone = kind in DIFFUSION_METHODS or kind == "decoded_centroids"
    backbone = pipeline.get_backbone(cfg, home) if needs_backbone else None
    fingerprint = backbone.fingerprint if backbone else (backbone_fingerprint(cfg, home) or "")
    sampled = (_sample_classes(cfg, backbone, method, ready, keys, progress)
               if kind in DIFFUSION_METHODS else {})
    for class_id, (info, modes) in ready.items():
        try:
            if kind in DIFFUSION_METHODS:
                contents = _sampled_sets(cfg, backbone, info, keys, *sampled[class_id])
            elif kind == "decoded_centroids":
                contents = _decoded_centroid_sets(cfg, backbone, keys, modes)
            else:
                contents = _real_image_sets(cfg, home, kind, class_id, keys, modes)
            result = _write_sets(cfg, home, method, info, keys, modes, contents, fingerprint)
        except Exception as e:  # noqa: BLE001 - reported per class; the others go on
            yield class_id, e
            continue
        yield class_id, result


def _write_sets(cfg: ExperimentConfig, home: Path, method: str, info, keys: list[SetKey],
                modes: dict[SetKey, ClassModes], contents: dict[SetKey, SetContent], fingerprint: str) -> DistillResult:
    base = {"method": method, "class_id": info.id, "class_name": info.name, "class_label": info.label,
            "backbone_fingerprint": fingerprint, "config": cfg.name}
    variant = cfg.variant(method)
    if variant.name != variant.kind:  # a variant's rows say what it is and whose modes it used
        base.update(method_kind=variant.kind, mode_finder=finder_key(variant.modes))
    result = DistillResult(method, info.id)
    for ipc, s in keys:
        content = contents[(ipc, s)]
        rows = _lineage_rows(base, variant.kind, ipc, s, content, modes[(ipc, s)])
        written = write_distilled_class(storage.distilled_set_dir(cfg, home, method, ipc, s), info.id,
                                        content.images, content.latents, rows)
        result.classes.append(written)
        result.rows.extend(rows)
        if result.preview is None:
            result.preview = content.images
    return result


def _sample_classes(cfg: ExperimentConfig, backbone, method: str, ready: dict[str, tuple], keys: list[SetKey],
                    progress: StageProgress) -> dict[str, tuple[torch.Tensor, list[int], SamplerSettings]]:
    """A diffusion method: every set of every class sampled in one batched call (MGD3 Sec. 3.2).
    Returns {class id: (latents (n, C, h, w) in set order, their seeds, the settings)}."""
    settings = SamplerSettings.from_config(cfg.sampler_for(method))
    labels, seeds, centroids, spans = [], [], [], {}
    for class_id, (info, modes) in ready.items():
        start = len(labels)
        for ipc, s in keys:
            labels += [info.label] * ipc
            seeds += image_seeds(cfg, info.id, ipc, s)
            centroids += list(modes[(ipc, s)].centroids)
        spans[class_id] = (start, len(labels))
    total_steps = settings.steps * -(-len(labels) // cfg.sampler.batch_size)
    done = [0]
    what = f"{method}/{next(iter(ready))}" if len(ready) == 1 else f"{method}, {len(ready)} classes"

    def on_step(_step):
        done[0] += 1
        if done[0] % 10 == 0 or done[0] == total_steps:
            progress(f"{what}: sampling step {done[0]}/{total_steps} ({len(labels)} images)", done[0] / total_steps)

    out = sample(backbone, labels, seeds, modes=torch.from_numpy(np.stack(centroids)), settings=settings,
                 batch_size=cfg.sampler.batch_size, callback=on_step)
    return {c: (out.latents[a:b], seeds[a:b], settings) for c, (a, b) in spans.items()}


def _sampled_sets(cfg: ExperimentConfig, backbone, info, keys: list[SetKey], latents: torch.Tensor,
                  seeds: list[int], settings: SamplerSettings) -> dict[SetKey, SetContent]:
    """One class's sampled latents (in set order) decoded and split into its sets."""
    images = _decode(backbone, latents, cfg.sampler.batch_size)
    contents, pos = {}, 0
    for ipc, s in keys:
        contents[(ipc, s)] = SetContent(latents[pos:pos + ipc].numpy(), images[pos:pos + ipc],
                                        [{"seed": seeds[pos + i], **settings.as_dict(), **_prompt_row(backbone, info)}
                                         for i in range(ipc)])
        pos += ipc
    return contents


def _decoded_centroid_sets(cfg: ExperimentConfig, backbone, keys: list[SetKey],
                           modes: dict[SetKey, ClassModes]) -> dict[SetKey, SetContent]:
    """The baseline that decodes the mode centroids themselves."""
    contents = {}
    for key in keys:
        c = torch.from_numpy(modes[key].centroids)
        contents[key] = SetContent(c.numpy(), _decode(backbone, c, cfg.sampler.batch_size), [{} for _ in c])
    return contents


def _real_image_sets(cfg: ExperimentConfig, home: Path, kind: str, class_id: str, keys: list[SetKey],
                     modes: dict[SetKey, ClassModes]) -> dict[SetKey, SetContent]:
    """The real-image baselines: ``ipc`` random training images, or the one closest to each mode; drawn
    from the rows the modes were found in (``pipeline.training_rows``: the fit split under validation)."""
    from .latents import read_latent_store

    source = open_source(cfg)
    vae_fp = vae_fingerprint(cfg, home)  # the fingerprint only: real images need no model
    store = read_latent_store(storage.latent_store_file(cfg, home, class_id, vae_fp),
                              expected_vae_fingerprint=vae_fp)
    rows = pipeline.training_rows(cfg, store.index, class_id)
    contents = {}
    for ipc, s in keys:
        if kind == "closest_real":
            idx = rows[modes[(ipc, s)].closest_index]
        else:
            rng = np.random.default_rng([cfg.seed, s, int(hashlib.sha256(class_id.encode()).hexdigest()[:8], 16)])
            idx = rows[np.sort(rng.choice(len(rows), size=ipc, replace=False))]
        items = [store.index[i] for i in idx]
        contents[(ipc, s)] = SetContent(np.asarray(store.latents[np.asarray(idx)], dtype=np.float32),
                                        source.load(class_id, "train", items), [{"source_item": it} for it in items])
    return contents


def _lineage_rows(base: dict, kind: str, ipc: int, gen_seed: int, content: SetContent,
                  modes: ClassModes) -> list[dict]:
    """The manifest rows of one class of one set (``distilled.manifest_columns``); ``kind``: the
    base method of ``base["method"]``."""
    own, other = _distances(content.latents, modes.centroids)
    # A random real image is not tied to a mode: report the nearest one.
    mode_idx = modes.finder().predict(content.latents) if kind == "random_real" else np.arange(ipc)
    rows = []
    for i in range(ipc):
        r = dict(base, set=f"{base['method']}/ipc{ipc}/seed{gen_seed}", ipc=ipc, gen_seed=gen_seed,
                 mode_index=int(mode_idx[i]), mode_count=int(modes.counts[mode_idx[i]]), dist_to_mode=float(own[i]),
                 dist_to_nearest_other_mode=float(other[i]))
        r.update(content.extra[i])
        rows.append(r)
    return rows


def _prompt_row(backbone, info) -> dict:
    """Lineage of a text-to-image backbone's conditioning: the class's prompt and the negative
    prompt (CFG's unconditional branch). Empty for class-label backbones."""
    if not hasattr(backbone, "prompt_for"):
        return {}
    return {"prompt": backbone.prompt_for(info.label), "negative_prompt": backbone.prompt_for(backbone.null_class)}


@torch.inference_mode()
def _decode(backbone, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    parts = [to_uint8(backbone.decode(latents[i:i + batch_size].to(backbone.device, backbone.dtype)))
             for i in range(0, len(latents), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
