"""``mode_centroids``: k-means modes (k = IPC) of one class's latents, for every IPC and seed."""

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.config import ExperimentConfig

from ..automation import on_upstream_data_change
from ..failures import fails_with_root_cause
from ..metadata import table, thumbnails_markdown
from ..partitions import class_partitions
from ..resources import BackboneResource, ExperimentResource
from ..versions import checked_config, stage_asset


MODE_COLUMNS = [
    ("setting", "string", "IPC and generation seed"),
    ("mode", "int", "mode index (= image index in the distilled sets)"),
    ("count", "int", "training latents assigned to the mode"),
    ("closest_real", "string", "item id of the training image closest to the centroid"),
]


def build_mode_centroids_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    @stage_asset(
        cfg, "mode_centroids",
        partitions_def=class_partitions(cfg),
        deps=["latent_store"],
        kinds={"scikitlearn", "hdf5"},
        automation_condition=on_upstream_data_change(),
        description="Mode discovery: the class's latents clustered into IPC modes, for every IPC and "
        "generation seed (centroids, counts, assignment, closest real image), in "
        "`<home>/runs/<experiment>/modes/<class>.h5`. Data version: hash of the centroids.",
    )
    @fails_with_root_cause
    def mode_centroids(
        context: dg.AssetExecutionContext, experiment: ExperimentResource, backbone: BackboneResource
    ) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        home, class_id = experiment.storage(), context.partition_key
        summary = pipeline.discover_modes(cfg, home, class_id, backbone.vae_fingerprint())
        rows = []
        for setting, s in summary["modes"].items():
            for i, (count, item) in enumerate(zip(s["counts"], s["closest_items"])):
                rows.append({"setting": setting, "mode": i, "count": int(count), "closest_real": item})
            context.log.info(f"modes of class {class_id}, {setting}: counts {s['counts']}, "
                             f"inertia {s['inertia']:.4g}")
        # The grid: the real image closest to each centroid, for the first setting.
        first = next(iter(summary["modes"]))
        closest = pipeline.open_source(cfg).load(class_id, "train", summary["modes"][first]["closest_items"])
        return dg.MaterializeResult(
            data_version=dg.DataVersion(summary["content_hash"]),
            metadata={
                "closest_real_images": thumbnails_markdown(
                    closest, f"class {class_id}: training image closest to each centroid ({first})"),
                "counts_per_mode": table(rows, MODE_COLUMNS),
                "path": dg.MetadataValue.path(summary["path"]),
                "settings": len(summary["modes"]),
                "inertia": {k: float(v["inertia"]) for k, v in summary["modes"].items()},
                "content_hash": summary["content_hash"],
            },
        )

    return mode_centroids
