"""Resources: where the experiment config and the storage root come from, and the backbone.

Environment switches go through here and nowhere else: ``MGD3_CONFIG`` picks the
experiment file, ``MGD3_HOME`` the storage root. The definitions pass them as
``EnvVar`` when they are set, so the UI shows where a value came from; unset,
the core's defaults apply (``configs/embedded.yaml``, ``<repo>/mgd3_home``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.config import ExperimentConfig, load_config
from mgd3_core.storage import storage_root

# The concurrency pool of every step that holds the accelerator (dagster.yaml limits it to 1).
ACCELERATOR_POOL = "accelerator"


class ExperimentResource(dg.ConfigurableResource):
    """The experiment: its validated config and the storage root all outputs live under.

    ``config_path`` empty means ``$MGD3_CONFIG`` or ``configs/embedded.yaml``;
    ``home`` empty means ``$MGD3_HOME`` or ``<repo>/mgd3_home``.
    """

    config_path: str = ""
    home: str = ""

    def config(self) -> ExperimentConfig:
        return load_config(self.config_path or None)

    def storage(self) -> Path:
        return Path(self.home).resolve() if self.home else storage_root()


class BackboneResource(dg.ConfigurableResource):
    """The experiment's diffusion backbone, loaded at most once per process.

    Steps never pass a backbone between each other: each process loads it on
    first use (``mgd3_core.pipeline.get_backbone`` keeps it). Every job runs its
    steps in the run's own process (``executors.build_executor``), so a run of
    many partitions loads it once; on Dask each worker loads it once and keeps it
    across the steps it executes.
    """

    experiment: ExperimentResource

    def fingerprint(self) -> str | None:
        """The backbone's fingerprint without loading it (None: not trained or not found)."""
        return pipeline.backbone_fingerprint(self.experiment.config(), self.experiment.storage())

    def vae_fingerprint(self) -> str:
        """The fingerprint latent stores are kept under, without loading any weights."""
        return pipeline.vae_fingerprint(self.experiment.config(), self.experiment.storage())

    def ensure(self, progress: Callable[[str, int, int, dict], None] | None = None) -> str:
        """Train or reuse the embedded backbone, or check a pretrained one loads; its fingerprint.

        ``progress(stage, step, total, metrics)`` reports embedded training."""
        return pipeline.ensure_backbone(self.experiment.config(), self.experiment.storage(), progress)

    def get(self):
        """The loaded backbone (``mgd3_core.backbones.base.Backbone``), from the process cache."""
        return pipeline.get_backbone(self.experiment.config(), self.experiment.storage())


def build_resources(config_path: str | None = None, home: str | None = None) -> dict:
    """Resources for the definitions: explicit values win, then the environment, then defaults."""

    def value(explicit: str | None, env: str):
        if explicit is not None:
            return str(explicit)
        return dg.EnvVar(env) if os.environ.get(env) else ""

    experiment = ExperimentResource(config_path=value(config_path, "MGD3_CONFIG"), home=value(home, "MGD3_HOME"))
    return {"experiment": experiment, "backbone": BackboneResource(experiment=experiment)}
