"""The embedded backbone: a small latent diffusion model trained by the pipeline.

No weights can be downloaded on a fresh machine, so the default experiment
trains its own stand-in for DiT-XL/2 + SD-VAE on the dataset's *training*
split (never the test split), on the CPU:

The models and the two training stages are in ``embedded_training.py``.

1. ``vae``: a small diffusers ``AutoencoderKL`` (MSE reconstruction + a small KL
   term); its ``scaling_factor`` is set to 1 / std of the training latents so
   the diffusion model sees unit-variance latents, as in latent diffusion.
2. ``encode``: the training images are encoded once (posterior mean x scaling
   factor); the DiT trains on these pre-encoded latents, which makes a DiT step
   independent of the image size and of the VAE's cost.
3. ``dit``: a class-conditional diffusers ``DiTTransformer2DModel`` (epsilon
   prediction, fixed variance, DiT's adaLN-Zero initialisation) with label
   dropout for the null class, AdamW with warm-up + cosine decay, EMA weights.

The result is saved in the diffusers pipeline layout (``vae/``, ``transformer/``,
``scheduler/``, safetensors) under ``home/backbones/embedded-<key>/`` and loaded
by the same code as a pretrained DiT (``diffusers_backbone.load_diffusers_backbone``). ``<key>`` hashes the
training settings, the dataset key and the class labels and
``TRAINING_CODE_VERSION``: unchanged inputs reuse the trained backbone.

Label dropout pitfall: each of diffusers' DiT blocks owns a label embedding with
its *own* class dropout (p = 0.1, built in). In training mode the blocks would
drop labels independently and disagree about the label; here the null label is
substituted once, before the model, and every block's dropout is set to 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import diffusers
import torch

from .. import storage
from ..config import BackboneConfig, ExperimentConfig
from ..locks import file_lock
from ..progress import TrainingProgress
from .base import Backbone, experiment_of
from .diffusers_backbone import (DTYPES, diffusers_fingerprints, load_diffusers_backbone,
                                 runtime_identity)
from .diffusers_files import BackboneFilesError
from .embedded_training import encode_mean, train_dit, train_vae, training_images
from .train_loop import deterministic_training
from .vae import load_vae

log = logging.getLogger(__name__)

# Bump whenever a change to this module (or embedded_training.py, train_loop.py) changes the
# trained weights for the same settings: it is part of the backbone directory key, so the next
# run retrains instead of reusing a backbone the code would not produce.
TRAINING_CODE_VERSION = 1

# The backbone asset trains this kind (a materialized asset, not an observed source).
TRAINED_BY_PIPELINE = True


# --------------------------------------------------------------------------- identity
def _dataset(cfg: ExperimentConfig):
    from ..data import open_dataset

    return open_dataset(cfg.dataset)


def training_environment(cfg: ExperimentConfig) -> dict:
    """What of the machine and software changes the trained weights' bits for the
    same settings: the training thread count (float sums are split per thread),
    ATen's CPU kernel level (``torch.backends.cpu.get_cpu_capability()``, e.g.
    AVX512 / AVX2 / DEFAULT: vectorised kernels sum in another order), and the
    torch and diffusers versions."""
    return {
        "threads": cfg.backbone.embedded.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def embedded_training_key(cfg: ExperimentConfig) -> str:
    """Hash of everything that determines the trained weights: the embedded
    training settings (not ``checkpoint_every``), the dataset key (data and its
    preprocessing), the classes and their labels, the code version and the
    training environment (:func:`training_environment`). Another machine
    (CPU capability) or thread count therefore trains its own backbone instead
    of reusing one whose weights it would not reproduce."""
    source = _dataset(cfg)
    settings = cfg.backbone.embedded.model_dump(mode="json")
    settings.pop("checkpoint_every")
    payload = {
        "code": TRAINING_CODE_VERSION,
        "settings": settings,
        "dataset": source.dataset_key,
        "classes": [[c.id, c.label] for c in source.classes()],
        "environment": training_environment(cfg),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def embedded_backbone_dir(cfg: ExperimentConfig, home: Path) -> Path:
    """``home/backbones/embedded-<key>``: exists only once training completed."""
    return storage.embedded_backbone_dir(home, embedded_training_key(cfg))


# --------------------------------------------------------------------------- the kind (registry.py)
def _trained_dir(cfg: ExperimentConfig | BackboneConfig, home: Path) -> tuple[Path, ExperimentConfig]:
    exp = experiment_of(cfg, "the embedded backbone depends on the dataset it is trained on")
    return embedded_backbone_dir(exp, home), exp


def ensure(cfg: ExperimentConfig, home: Path, progress: TrainingProgress | None = None) -> None:
    ensure_embedded_backbone(cfg, Path(home), progress=progress)


def load(cfg: ExperimentConfig, home: Path) -> Backbone:
    root, exp = _trained_dir(cfg, home)
    if not root.is_dir():
        raise BackboneFilesError(
            f"{root}: the embedded backbone has not been trained yet; "
            "run ensure_embedded_backbone (the backbone asset) first"
        )
    return load_diffusers_backbone(root, root, device=exp.backbone.device, dtype=DTYPES[exp.backbone.dtype],
                                   cache_dir=storage.fingerprint_cache_dir(home))


def _fingerprints(cfg: ExperimentConfig, home: Path) -> tuple[str, str] | None:
    root, exp = _trained_dir(cfg, home)
    if not root.is_dir():
        return None
    return diffusers_fingerprints(root, root, device=exp.backbone.device, dtype=DTYPES[exp.backbone.dtype],
                                  cache_dir=storage.fingerprint_cache_dir(home))


def fingerprint(cfg: ExperimentConfig, home: Path) -> str | None:
    fps = _fingerprints(cfg, home)
    return fps[0] if fps else None


def vae_fingerprint(cfg: ExperimentConfig, home: Path) -> str | None:
    fps = _fingerprints(cfg, home)
    return fps[1] if fps else None


def class_conditions(cfg: ExperimentConfig) -> dict[str, str]:
    """Empty: a class-conditional DiT sees a class's label only, never its name."""
    return {}


def version_inputs(cfg: ExperimentConfig) -> dict:
    """The core's identity of the trained weights: training settings, dataset, classes and
    labels, training code version (the directory the embedded backbone is saved under); and the
    dtype and device kind it runs in, which change its outputs and so its fingerprint (the asset's
    data version): the asset must re-run to report it. No runtime entry for float32 on the CPU."""
    runtime = runtime_identity(cfg.backbone.device, DTYPES[cfg.backbone.dtype])
    return {"embedded_training_key": embedded_training_key(cfg), **({"runtime": runtime} if runtime else {})}


def describe(cfg: ExperimentConfig) -> str:
    return ("The embedded latent diffusion backbone (VAE + class-conditional DiT), trained on the "
            "training split or reused when a checkpoint for this config exists.")


# --------------------------------------------------------------------------- training
def _log_progress(stage: str, step: int, total: int, metrics: dict) -> None:
    if step == total or step % max(total // 10, 1) == 0:
        log.info("embedded backbone %s: step %d/%d %s", stage, step, total,
                 {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})


def ensure_embedded_backbone(cfg: ExperimentConfig, home: Path, progress: TrainingProgress | None = None) -> Path:
    """Train the embedded backbone of ``cfg`` (or reuse it) and return its directory.

    The directory is a diffusers pipeline root (``vae/``, ``transformer/``,
    ``scheduler/``, ``model_index.json``, ``training.json``) that
    ``load_diffusers_backbone`` reads like any pretrained DiT. Training is deterministic
    given ``backbone.embedded.seed``, reports ``progress(stage, step, total,
    metrics)`` for stages "vae", "encode" and "dit", checkpoints every
    ``checkpoint_every`` steps in ``<dir>.partial/`` and resumes from there after
    an interruption, to the same weights as an uninterrupted run.
    """
    if cfg.backbone.kind != "embedded":
        raise ValueError(f"backbone.kind is {cfg.backbone.kind!r}; ensure_embedded_backbone needs 'embedded'")
    final = embedded_backbone_dir(cfg, home)
    if final.is_dir():
        return final
    progress = progress or _log_progress
    # Two processes never train the same backbone at once: the second waits, then reuses it.
    with file_lock(final.with_name(final.name + ".lock"), timeout=None,
                   on_wait=lambda holder: log.info("waiting for %s to finish training %s", holder, final.name)):
        if final.is_dir():  # trained by another process while we waited
            return final
        for stale in final.parent.glob(final.name + ".tmp*"):  # a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        work = final.with_name(final.name + ".partial")
        work.mkdir(parents=True, exist_ok=True)
        # A fixed thread count and deterministic algorithms: a resumed training gives the
        # uninterrupted one's weights bit for bit, whatever the caller's thread count.
        with deterministic_training(cfg.backbone.embedded.threads):
            trained = _train(cfg, work, final.name, progress)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_pipeline_root(cfg, tmp, work / "vae", final.name, trained)
        os.replace(tmp, final)
        shutil.rmtree(work, ignore_errors=True)
        return final


def _train(cfg: ExperimentConfig, work: Path, key: str, progress: TrainingProgress) -> dict:
    """VAE, encoding, DiT, resuming from what ``work`` holds; the trained parts and their timings."""
    images, labels, num_classes = training_images(cfg)
    timings = {}
    t0 = time.perf_counter()
    vae_dir = work / "vae"
    if not (vae_dir / "config.json").is_file():
        train_vae(cfg, images, work, key, progress)
    timings["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Always encode with the *saved* VAE, so a resumed run sees the same latents.
    vae, vae_fp = load_vae(vae_dir, what="embedded VAE")
    latents = encode_mean(vae, images) * vae.config.scaling_factor
    progress("encode", 1, 1, {"latent_std": float(latents.std())})
    timings["encode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dit, scheduler = train_dit(cfg, latents, labels, num_classes, work, key, progress)
    timings["dit_s"] = time.perf_counter() - t0
    return {"vae": vae, "vae_fingerprint": vae_fp, "dit": dit, "scheduler": scheduler, "timings": timings,
            "train_images": len(images), "num_classes": num_classes}


def _write_pipeline_root(cfg: ExperimentConfig, out: Path, vae_dir: Path, key: str, trained: dict) -> None:
    """The diffusers pipeline root (``vae/``, ``transformer/``, ``scheduler/``, ``model_index.json``)
    plus ``training.json``, the record of what was trained on what."""
    vae, dit = trained["vae"], trained["dit"]
    shutil.copytree(vae_dir, out / "vae")
    dit.save_pretrained(out / "transformer", safe_serialization=True)
    trained["scheduler"].save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }, indent=2))
    source = _dataset(cfg)
    (out / "training.json").write_text(json.dumps({
        "key": key,
        "code_version": TRAINING_CODE_VERSION,
        "settings": cfg.backbone.embedded.model_dump(mode="json"),
        "dataset_key": source.dataset_key,
        "classes": [{"id": c.id, "name": c.name, "label": c.label} for c in source.classes()],
        "train_images": trained["train_images"],
        "num_classes": trained["num_classes"],
        "scaling_factor": float(vae.config.scaling_factor),
        "vae_fingerprint": trained["vae_fingerprint"],
        "dit_parameters": sum(p.numel() for p in dit.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "timings_s": trained["timings"],
        "environment": training_environment(cfg),
    }, indent=2))
