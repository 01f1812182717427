"""``latent_store``: one class's training images encoded by the backbone's VAE (HDF5, per class)."""

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.config import ExperimentConfig

from ..automation import on_upstream_data_change
from ..failures import fails_with_root_cause
from ..metadata import progress_logger
from ..partitions import class_partitions
from ..executors import accelerator_step
from ..resources import ExperimentResource
from ..versions import checked_config, stage_asset


def build_latent_store_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    @stage_asset(
        cfg, "latent_store",
        partitions_def=class_partitions(cfg),
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
    def latent_store(
        context: dg.AssetExecutionContext, experiment: ExperimentResource
    ) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        class_id = context.partition_key
        # The core loads the backbone (once per process) only when the store must be (re)written.
        info = pipeline.encode_latents(cfg, experiment.storage(), class_id,
                                       progress=progress_logger(context.log, f"latent_store[{class_id}]"))
        context.log.info(f"latent store of class {class_id}: {info.n} latents {info.shape[1:]} in {info.path}")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(info.content_hash),
            metadata={
                "path": dg.MetadataValue.path(str(info.path)),
                "images": info.n,
                "latent_shape": str(tuple(info.shape[1:])),
                "dtype": info.dtype,
                "vae_fingerprint": info.vae_fingerprint,
                "content_hash": info.content_hash,
            },
        )

    return latent_store
