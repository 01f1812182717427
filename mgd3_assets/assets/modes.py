"""``mode_centroids``: k-means modes (k = IPC) of each class's latents, for every IPC and seed.

A run materializes any set of classes (``context.partition_keys``), each with its own
materialization, data version and check result (``partition_events``)."""

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.config import ExperimentConfig

from ..automation import on_upstream_data_change
from ..checks import centroid_problems, check_result
from ..failures import fails_with_root_cause, raise_partition_failures
from ..metadata import table, thumbnails_markdown
from ..partition_events import PartitionEvents
from ..partitions import backfill_policy, class_partitions
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
        backfill_policy=backfill_policy(cfg, per_run=2),  # never latent_store's runs (partitions.py)
        output_required=False,  # one AssetMaterialization per class instead (partition_events)
        deps=["latent_store"],
        kinds={"scikitlearn", "hdf5"},
        automation_condition=on_upstream_data_change(),
        description="Mode discovery: the class's latents clustered into IPC modes, for every IPC and "
        "generation seed (centroids, counts, assignment, closest real image), in "
        "`<home>/runs/<experiment>/modes/<class>.h5`. Data version: hash of the centroids.",
    )
    @fails_with_root_cause
    def mode_centroids(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                       backbone: BackboneResource):
        cfg = checked_config(context, experiment)
        home = experiment.storage()
        events = PartitionEvents(context, "mode_centroids", {"latent_store": lambda pk: pk})
        vae_fp = backbone.vae_fingerprint()
        source = pipeline.open_source(cfg)
        failed, done = {}, 0
        for class_id in context.partition_keys:
            try:
                summary = pipeline.discover_modes(cfg, home, class_id, vae_fp)
                # The grid: the real image closest to each centroid, for the first setting.
                first = next(iter(summary["modes"]))
                closest = source.load(class_id, "train", summary["modes"][first]["closest_items"])
                problems, check_meta = centroid_problems(cfg, home, class_id)
            except Exception as e:  # noqa: BLE001 - this class fails, the run's other classes go on
                failed[class_id] = e
                context.log.error(f"mode_centroids[{class_id}] failed: {e}")
                continue
            rows = []
            for setting, s in summary["modes"].items():
                for i, (count, item) in enumerate(zip(s["counts"], s["closest_items"])):
                    rows.append({"setting": setting, "mode": i, "count": int(count), "closest_real": item})
                context.log.info(f"modes of class {class_id}, {setting}: counts {s['counts']}, "
                                 f"inertia {s['inertia']:.4g}")
            yield events.materialization(class_id, summary["content_hash"], {
                "closest_real_images": thumbnails_markdown(
                    closest, f"class {class_id}: training image closest to each centroid ({first})"),
                "counts_per_mode": table(rows, MODE_COLUMNS),
                "path": dg.MetadataValue.path(summary["path"]),
                "settings": len(summary["modes"]),
                "inertia": {k: float(v["inertia"]) for k, v in summary["modes"].items()},
                "content_hash": summary["content_hash"],
            })
            yield events.check("centroids_valid", class_id, check_result(problems, check_meta))
            done += 1
        raise_partition_failures(failed, done)

    return mode_centroids
