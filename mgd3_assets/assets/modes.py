"""``mode_centroids``: k-means modes (k = IPC) of each class's latents, for every IPC and seed;
``variant_modes``: the same for the other mode finders that method variants choose.

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
from ..partitions import (CLASS_DIM, backfill_policy, class_partitions, finder_and_class, finder_partitions,
                          variant_finders)
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
        events = PartitionEvents(context, "mode_centroids", {"latent_store": lambda pk: pk})
        work = [(pk, pk, None) for pk in context.partition_keys]
        yield from _discover(context, cfg, experiment.storage(), backbone.vae_fingerprint(), events, work)

    return mode_centroids


def build_variant_modes_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition | None:
    """``variant_modes[finder, class]``: the modes of each finder a method variant chooses other
    than the config's ``modes``, once per (finder, class) however many variants use it. None when
    every method uses the config's finder (the graph then is exactly as without variants)."""
    finders = variant_finders(cfg)
    if not finders:
        return None

    @stage_asset(
        cfg, "variant_modes",
        partitions_def=finder_partitions(cfg),
        backfill_policy=backfill_policy(cfg, per_run=2),
        output_required=False,
        deps=[dg.AssetDep("latent_store",
                          partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=CLASS_DIM))],
        kinds={"scikitlearn", "hdf5"},
        automation_condition=on_upstream_data_change(),
        description="Modes of the mode finders that method variants choose (modes.method / modes.n_init) other "
        "than the config's: like mode_centroids, once per (finder, class), in "
        "`<home>/runs/<experiment>/modes/by_finder/<finder>/<class>.h5`. Data version: hash of the centroids.",
    )
    @fails_with_root_cause
    def variant_modes(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                      backbone: BackboneResource):
        cfg = checked_config(context, experiment)
        finders = variant_finders(cfg)
        events = PartitionEvents(context, "variant_modes", {"latent_store": lambda pk: finder_and_class(pk)[1]})
        work = []
        for pk in context.partition_keys:
            finder, class_id = finder_and_class(pk)
            if finder not in finders:
                raise dg.Failure(f"variant_modes[{pk}]: no listed method uses the mode finder {finder!r} any more; "
                                 "reload the code location")
            work.append((pk, class_id, finders[finder]))
        yield from _discover(context, cfg, experiment.storage(), backbone.vae_fingerprint(), events, work)

    return variant_modes


def _discover(context, cfg: ExperimentConfig, home, vae_fp: str, events: PartitionEvents, work: list):
    """Modes of each (partition key, class, finder settings or None = the config's) of a run: one
    materialization and check result per partition; a failed class does not stop the others.

    The events are yielded together once every class is done (k-means takes well under a second a
    class): the backfill daemon then finds all of the run's classes ready at one tick. Dagster
    groups ready multi-partitions by the dimension with fewer keys among them, so the
    ``distilled_images`` runs hold one method's classes, as in ``make demo``; classes that turned
    up over several ticks were grouped by class, one class's methods per run."""
    asset = context.asset_key.to_user_string()
    source = pipeline.open_source(cfg)
    failed, done, ready = {}, 0, []
    for pk, class_id, modes in work:
        try:
            summary = pipeline.discover_modes(cfg, home, class_id, vae_fp, modes)
            # The grid: the real image closest to each centroid, for the first setting.
            first = next(iter(summary["modes"]))
            closest = source.load(class_id, "train", summary["modes"][first]["closest_items"])
            problems, check_meta = centroid_problems(cfg, home, class_id, modes)
        except Exception as e:  # noqa: BLE001 - this class fails, the run's other classes go on
            failed[pk] = e
            context.log.error(f"{asset}[{pk}] failed: {e}")
            continue
        rows = []
        for setting, s in summary["modes"].items():
            for i, (count, item) in enumerate(zip(s["counts"], s["closest_items"])):
                rows.append({"setting": setting, "mode": i, "count": int(count), "closest_real": item})
            context.log.info(f"modes of class {class_id}, {setting}: counts {s['counts']}, "
                             f"inertia {s['inertia']:.4g}")
        ready.append((pk, events.materialization(pk, summary["content_hash"], {
            "closest_real_images": thumbnails_markdown(
                closest, f"class {class_id}: training image closest to each centroid ({first})"),
            "counts_per_mode": table(rows, MODE_COLUMNS),
            "path": dg.MetadataValue.path(summary["path"]),
            "settings": len(summary["modes"]),
            "inertia": {k: float(v["inertia"]) for k, v in summary["modes"].items()},
            "content_hash": summary["content_hash"],
        }), check_result(problems, check_meta)))
        done += 1
    yield from events.recorded_together("centroids_valid", ready)
    raise_partition_failures(failed, done)
