"""Asset checks, per partition and blocking: a failed check stops the assets downstream of it.

Each check is evaluated by its asset's own run, for every partition it materializes, right after
writing it (``partition_events``): no check-only runs. The checks below are also declared on
their own, so the UI lists them and can re-execute one on a partition by hand.

- ``latent_store_complete``: the store exists, has its completion marker, the
  current VAE's fingerprint, a latent for every training image of the class
  (apart from files recorded as undecodable), only finite values and the
  content hash recorded at writing;
- ``centroids_valid`` (of ``mode_centroids`` and ``variant_modes``): for every IPC and generation
  seed, exactly IPC finite centroids whose counts cover every latent of the class;
- ``distilled_complete``: for every IPC and generation seed, exactly IPC PNGs
  in the class's ImageFolder directory and one manifest row for each, whose
  recorded hash matches the file.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg
import h5py
import numpy as np

from mgd3_core import pipeline, storage
from mgd3_core.config import ExperimentConfig
from mgd3_core.distilled import DistilledSetError, read_manifest
from mgd3_core.latents import LatentStoreError, validate_latent_store

from .partitions import (class_partitions, distilled_partitions, finder_and_class, finder_partitions,
                         method_and_class, variant_finders)
from .resources import BackboneResource, ExperimentResource


def check_result(problems: list[str], metadata: dict) -> dg.AssetCheckResult:
    description = None
    if problems:
        description = "; ".join(problems[:5])
        if len(problems) > 5:
            description += f" (and {len(problems) - 5} more)"
    return dg.AssetCheckResult(passed=not problems, description=description,
                               metadata={**metadata, "problems": len(problems)})


def latent_store_problems(cfg: ExperimentConfig, home: Path, class_id: str, vae_fingerprint: str) -> tuple[list[str], dict]:
    path = storage.latent_store_file(cfg, home, class_id, vae_fingerprint)
    try:
        info = validate_latent_store(path, expected_vae_fingerprint=vae_fingerprint)
    except LatentStoreError as e:
        return [str(e)], {"path": str(path)}
    with h5py.File(path, "r") as f:
        skipped = json.loads(f.attrs.get("skipped_items", "[]") or "[]")
    expected = len(pipeline.open_source(cfg).items(class_id, "train"))
    problems = []
    if info.n + len(skipped) != expected:
        problems.append(f"{path}: {info.n} latents + {len(skipped)} skipped files, but class {class_id!r} has "
                        f"{expected} training images now; delete the store (a valid one is reused as is) "
                        f"and re-materialize latent_store[{class_id}]")
    return problems, {"path": str(path), "latents": info.n, "skipped": len(skipped), "training_images": expected}


def centroid_problems(cfg: ExperimentConfig, home: Path, class_id: str, modes=None) -> tuple[list[str], dict]:
    """Problems of one class's modes: the config's finder, or ``modes`` (a variant's)."""
    path = pipeline.modes_path(cfg, home, class_id, modes)
    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            n = int(f.attrs["n_latents"])
    except (OSError, KeyError) as e:
        asset = "mode_centroids" if path == storage.modes_file(cfg, home, class_id) else "variant_modes"
        return [f"{path}: cannot read the modes file ({e}); re-materialize {asset}[{class_id}]"], {}
    for ipc in cfg.ipc:
        for seed in cfg.evaluation.generation_seeds:
            where = f"{path} ipc{ipc}/seed{seed}"
            try:
                m = pipeline.read_modes(cfg, home, class_id, ipc, seed, modes)
            except (KeyError, ValueError, OSError) as e:
                problems.append(str(e))
                continue
            if m.centroids.shape[0] != ipc or len(m.counts) != ipc:
                problems.append(f"{where}: {m.centroids.shape[0]} centroids, {len(m.counts)} counts, expected IPC = {ipc}")
            if not np.isfinite(m.centroids).all():
                problems.append(f"{where}: centroids contain NaN or infinity")
            if int(np.sum(m.counts)) != n:
                problems.append(f"{where}: counts sum to {int(np.sum(m.counts))}, but the class has {n} latents")
            if (np.asarray(m.counts) < 1).any():
                problems.append(f"{where}: empty mode(s) {np.flatnonzero(np.asarray(m.counts) < 1).tolist()}")
    return problems, {"path": str(path), "latents": n}


def distilled_problems(cfg: ExperimentConfig, home: Path, method: str, class_id: str) -> tuple[list[str], dict]:
    problems: list[str] = []
    images = 0
    for ipc in cfg.ipc:
        for seed in cfg.evaluation.generation_seeds:
            sdir = storage.distilled_set_dir(cfg, home, method, ipc, seed)
            where = f"{method}/ipc{ipc}/seed{seed}, class {class_id!r}"
            try:
                rows = read_manifest(sdir, class_id)
            except DistilledSetError as e:
                problems.append(str(e))
                continue
            img_dir = storage.set_images_dir(sdir, class_id)
            pngs = sorted(p.name for p in img_dir.glob("*.png")) if img_dir.is_dir() else []
            images += len(pngs)
            if len(pngs) != ipc:
                problems.append(f"{where}: {len(pngs)} PNGs in {img_dir}, expected IPC = {ipc}")
            if len(rows) != ipc:
                problems.append(f"{where}: {len(rows)} manifest rows, expected IPC = {ipc}")
            listed = {r["file"] for r in rows}
            unlisted = sorted(set(pngs) - listed)
            if unlisted:
                problems.append(f"{where}: PNG(s) {unlisted} have no manifest row")
            for r in rows:
                p = img_dir / r["file"]
                if not p.is_file():
                    problems.append(f"{where}: {p} is in the manifest but missing")
                elif hashlib.sha256(p.read_bytes()).hexdigest() != r["sha256"]:
                    problems.append(f"{where}: {p} does not match the hash in its manifest row")
    return problems, {"images": images, "sets": len(cfg.ipc) * len(cfg.evaluation.generation_seeds)}


def _each_partition(context: dg.AssetCheckExecutionContext, problems_of) -> dg.AssetCheckResult:
    """A check executed on its own (UI: "Execute check"): every partition of its run, one result
    (passed only if each partition passed; the problems name their partitions)."""
    problems, meta = [], {}
    keys = context.partition_keys if context.has_partition_key_range or context.has_partition_key else []
    for pk in keys:
        found, meta = problems_of(pk)
        problems += [f"{pk}: {p}" for p in found] if len(keys) > 1 else found
    return check_result(problems, meta if len(keys) == 1 else {"partitions": len(keys)})


def build_checks(cfg: ExperimentConfig) -> list[dg.AssetChecksDefinition]:
    @dg.asset_check(asset="latent_store", partitions_def=class_partitions(cfg), blocking=True,
                    description="Store complete (a latent per training image), finite, from the current VAE.")
    def latent_store_complete(context: dg.AssetCheckExecutionContext, experiment: ExperimentResource,
                              backbone: BackboneResource) -> dg.AssetCheckResult:
        return _each_partition(context, lambda pk: latent_store_problems(
            experiment.config(), experiment.storage(), pk, backbone.vae_fingerprint()))

    @dg.asset_check(asset="mode_centroids", partitions_def=class_partitions(cfg), blocking=True,
                    description="Exactly IPC finite centroids per IPC and seed, counts covering every latent.")
    def centroids_valid(context: dg.AssetCheckExecutionContext, experiment: ExperimentResource) -> dg.AssetCheckResult:
        return _each_partition(context, lambda pk: centroid_problems(experiment.config(), experiment.storage(), pk))

    @dg.asset_check(asset="distilled_images", partitions_def=distilled_partitions(cfg), blocking=True,
                    description="Exactly IPC PNGs per IPC and seed, each with a manifest row and matching hash.")
    def distilled_complete(context: dg.AssetCheckExecutionContext, experiment: ExperimentResource) -> dg.AssetCheckResult:
        return _each_partition(context, lambda pk: distilled_problems(
            experiment.config(), experiment.storage(), *method_and_class(pk)))

    return [latent_store_complete, centroids_valid, distilled_complete, *_variant_modes_checks(cfg)]


def _variant_modes_checks(cfg: ExperimentConfig) -> list[dg.AssetChecksDefinition]:
    if not variant_finders(cfg):
        return []

    @dg.asset_check(asset="variant_modes", name="centroids_valid", partitions_def=finder_partitions(cfg),
                    blocking=True, description="As mode_centroids': exactly IPC finite centroids per IPC and seed.")
    def variant_centroids_valid(context: dg.AssetCheckExecutionContext,
                                experiment: ExperimentResource) -> dg.AssetCheckResult:
        def problems(pk):
            cfg = experiment.config()
            finder, class_id = finder_and_class(pk)
            return centroid_problems(cfg, experiment.storage(), class_id, variant_finders(cfg).get(finder))
        return _each_partition(context, problems)

    return [variant_centroids_valid]
