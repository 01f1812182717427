"""Observed inputs: per-partition versions of what the per-class and per-method stages read.

Dagster's code versions are per asset, but two inputs change per partition:

- ``dataset[class]``: one class's image files. Its data version is the class's
  content key (``mgd3_core.dataset_content``: paths and file hashes, re-hashed
  only when a file's size, mtime, ctime or inode changed), so editing or
  replacing an image makes that class's ``latent_store`` partition stale, and
  only that one. With a text-conditioned backbone (Stable Diffusion) the version
  also covers the class's prompt (``versions.class_version``): renaming a class
  re-makes that class's ``distilled_images`` (its latent store is reused).
- ``method_settings[method]``: the settings one method's images depend on
  (``versions.method_settings``: the sampler for the diffusion methods), so a
  sampler change makes the diffusion methods' ``distilled_images`` partitions
  stale and leaves the real-image methods alone; a method variant (``config_methods``)
  is a partition of its own.

Both are observable source assets, observed for all their partitions in one run:
``make demo`` observes them before it plans (the dataset's listing: a walk and a header check
per file, about 0.26 ms per JPEG; then a stat per file, bytes re-hashed only when changed), an
hourly schedule per input does so for the automation (``automation.observation_schedules``), and
every run that reads one records the version it read (``partition_events``), so a graph
materialized from the UI before any observation is up to date at the first one.
"""

import dagster as dg

from mgd3_core.config import ExperimentConfig

from ..partitions import class_partitions, method_partitions
from ..resources import ExperimentResource
from ..versions import class_version, method_settings_version


def build_input_assets(cfg: ExperimentConfig) -> list[dg.SourceAsset]:
    classes, methods = class_partitions(cfg), method_partitions(cfg)

    @dg.observable_source_asset(
        name="dataset",
        partitions_def=classes,
        description="The image files of each class (train and test folders). Data version: the class's "
        "content key (file paths and hashes), so a changed image re-encodes its class only; with a "
        "text-to-image backbone also the class's prompt, so renaming a class re-makes its images only.",
    )
    def dataset(experiment: ExperimentResource) -> dg.DataVersionsByPartition:
        from mgd3_core.backbones import backbone_class_conditions

        run_cfg, home = experiment.config(), experiment.storage()
        conditions = backbone_class_conditions(run_cfg)  # once, not once per class
        return dg.DataVersionsByPartition({
            c: dg.DataVersion(class_version(run_cfg, home, c, conditions))
            for c in classes.get_partition_keys()
        })

    @dg.observable_source_asset(
        name="method_settings",
        partitions_def=methods,
        description="The settings each distillation method or variant depends on beyond the shared ones (the "
        "sampler for diffusion methods; a variant's kind and mode finder). Data version: their hash, so a "
        "sampler change re-runs diffusion methods only, and editing one variant re-runs that variant only.",
    )
    def method_settings(experiment: ExperimentResource) -> dg.DataVersionsByPartition:
        run_cfg = experiment.config()
        return dg.DataVersionsByPartition({
            m: dg.DataVersion(method_settings_version(run_cfg, m)) for m in methods.get_partition_keys()
        })

    return [dataset, method_settings]
