"""``latent_store``: each class's training images encoded by the backbone's VAE (HDF5, per class).

A run materializes any set of classes (``context.partition_keys``; a UI backfill groups up to
``runs.classes_per_run`` per run): the backbone loads once per run, and each class gets its own
materialization, data version and check result as soon as it is written
(``partition_events``)."""

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.backbones import backbone_class_conditions
from mgd3_core.config import ExperimentConfig

from ..automation import on_upstream_data_change
from ..checks import check_result, latent_store_problems
from ..executors import accelerator_step
from ..failures import fails_with_root_cause, raise_partition_failures
from ..metadata import progress_logger
from ..partition_events import PartitionEvents
from ..partitions import backfill_policy, class_partitions
from ..resources import ExperimentResource
from ..versions import checked_config, class_version, stage_asset


def build_latent_store_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    @stage_asset(
        cfg, "latent_store",
        partitions_def=class_partitions(cfg),
        backfill_policy=backfill_policy(cfg),
        output_required=False,  # one AssetMaterialization per class instead (partition_events)
        deps=["backbone", "dataset"],  # dataset[class]: the class's image content (identity mapping)
        **accelerator_step(),
        kinds={"hdf5"},
        automation_condition=on_upstream_data_change(),
        description="VAE latents (posterior mean x scaling factor) of one class's training images, "
        "in `<home>/latents/<dataset>/<vae fingerprint>/<class>.h5`; reused when a valid store of the same "
        "image content exists. "
        "Data version: the store's content hash.",
    )
    @fails_with_root_cause
    def latent_store(context: dg.AssetExecutionContext, experiment: ExperimentResource):
        cfg = checked_config(context, experiment)
        home = experiment.storage()
        events = PartitionEvents(context, "latent_store", {"backbone": None, "dataset": lambda pk: pk})
        conditions = backbone_class_conditions(cfg)  # once per run, not once per class
        # Recorded together once every class is done (a crash loses no work: a valid store is
        # reused), so the backfill daemon finds the run's classes ready at one iteration and puts
        # their modes into one run (see assets/modes.py).
        failed, done, ready = {}, 0, []
        for class_id in context.partition_keys:
            try:
                # The content this store is encoded from, observed here too: a graph materialized
                # from the UI before the first scheduled observation does not look stale after it.
                yield from events.observe("dataset", class_id, class_version(cfg, home, class_id, conditions))
                # The core loads the backbone (once per process) only when the store must be (re)written.
                info = pipeline.encode_latents(cfg, home, class_id,
                                               progress=progress_logger(context.log, f"latent_store[{class_id}]"))
                problems, check_meta = latent_store_problems(cfg, home, class_id, info.vae_fingerprint)
            except Exception as e:  # noqa: BLE001 - this class fails, the run's other classes go on
                failed[class_id] = e
                context.log.error(f"latent_store[{class_id}] failed: {e}")
                continue
            context.log.info(f"latent store of class {class_id}: {info.n} latents {info.shape[1:]} in {info.path}")
            ready.append((class_id, events.materialization(class_id, info.content_hash, {
                "path": dg.MetadataValue.path(str(info.path)),
                "images": info.n,
                "latent_shape": str(tuple(info.shape[1:])),
                "dtype": info.dtype,
                "vae_fingerprint": info.vae_fingerprint,
                "content_hash": info.content_hash,
            }), check_result(problems, check_meta)))
            done += 1
        yield from events.recorded_together("latent_store_complete", ready)
        raise_partition_failures(failed, done)

    return latent_store
