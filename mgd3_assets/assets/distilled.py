"""``distilled_images``: one method's distilled images of one class, for every IPC and seed.

A run materializes any set of (method, class) partitions (``context.partition_keys``; a UI
backfill and ``make demo`` group up to ``runs.classes_per_run`` classes of one method per run): a
diffusion method samples all of the run's classes in one batched call, and each class gets its own
materialization, data version and check result (``partition_events``).

Each materialization carries the lineage of its images (mode, distance to the
centroid, seed) as a table, and a thumbnail grid. The manifest files hold the
full lineage; ``mgd3_core.distilled.lineage_of(png)`` answers for any one PNG.
"""

from pathlib import Path

import dagster as dg

from mgd3_core import distillation, storage
from mgd3_core.config import ExperimentConfig

from mgd3_core.backbones import backbone_class_conditions

from ..automation import on_upstream_data_change
from ..checks import check_result, distilled_problems
from ..executors import accelerator_step
from ..failures import fails_with_root_cause, raise_partition_failures
from ..metadata import preview_markdown, progress_logger, table, thumbnails_markdown
from ..partition_events import NOT_READ, PartitionEvents
from ..partitions import (CLASS_DIM, METHOD_DIM, backfill_policy, distilled_partitions, finder_partition_key,
                          method_and_class, partition_key, variant_finders, variant_modes_mapping)
from ..resources import ExperimentResource
from ..versions import (checked_config, checked_method_settings, class_version, combined_hash,
                        method_settings_version, stage_asset)


# Every manifest column a reader asks about (``mgd3_core.distilled.MANIFEST_COLUMNS``); floats are
# rounded to 3 decimals for reading, the manifest CSV keeps full precision.
LINEAGE_COLUMNS = [
    ("image", "string", "PNG path relative to the distilled root"),
    ("class_name", "string", "readable class name"),
    ("ipc", "int", "images per class of the set"),
    ("gen_seed", "int", "generation seed of the set"),
    ("mode_index", "int", "the mode (centroid) the image was generated for or is nearest to"),
    ("mode_count", "int", "training latents in that mode (its size)"),
    ("dist_to_mode", "float", "L2 distance of the image's latent to its centroid"),
    ("dist_to_nearest_other_mode", "float", "L2 distance to the nearest other centroid"),
    ("seed", "int", "sampling noise seed (diffusion methods)"),
    ("lambda", "float", "mode-guidance strength λ (diffusion methods; 0 = unguided)"),
    ("t_stop", "int", "guided while t > t_stop (diffusion methods; 0 = guided to the end)"),
    ("cfg_scale", "float", "classifier-free guidance scale (diffusion methods)"),
    ("steps", "int", "sampling steps (diffusion methods)"),
    ("sampler", "string", "ddpm or ddim (diffusion methods)"),
    ("source_item", "string", "training image id (real-image methods)"),
    ("backbone_fingerprint", "string", "hash of the backbone's configs and weights"),
]
# Shown only for a method variant's images (``config_methods``; ``distilled.VARIANT_COLUMNS``).
VARIANT_LINEAGE_COLUMNS = [
    ("method", "string", "the variant's name (its partition key)"),
    ("method_kind", "string", "the base method the variant runs"),
    ("mode_finder", "string", "the mode finder whose modes the images used (method~n_init)"),
]
# Shown only for a text-to-image backbone's images (the rows then carry a prompt).
PROMPT_LINEAGE_COLUMNS = [
    ("prompt", "string", "the class's text prompt (text-to-image backbones)"),
    ("negative_prompt", "string", "the prompt of CFG's unconditional branch"),
]


def build_distilled_images_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    cfg_at_load = cfg

    @stage_asset(
        cfg, "distilled_images",
        partitions_def=distilled_partitions(cfg),
        backfill_policy=backfill_policy(cfg),
        output_required=False,  # one AssetMaterialization per partition instead (partition_events)
        deps=[
            "backbone",
            # dataset[class]: the real-image methods pick its images; with a text-to-image backbone
            # its version covers the class's prompt, so renaming a class re-makes its images.
            dg.AssetDep("dataset",
                        partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=CLASS_DIM)),
            dg.AssetDep("mode_centroids",
                        partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=CLASS_DIM)),
            # The method's own settings: a sampler change re-runs the diffusion methods only.
            dg.AssetDep("method_settings",
                        partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=METHOD_DIM)),
            # A variant with a mode finder of its own reads that finder's modes of its class.
            *([dg.AssetDep("variant_modes", partition_mapping=variant_modes_mapping(cfg))]
              if variant_finders(cfg) else []),
        ],
        **accelerator_step(),
        kinds={"pytorch", "png"},
        automation_condition=on_upstream_data_change(),
        description="Distilled images of one class by one method (mgd3, unguided, mgd3_no_stop, random_real, "
        "closest_real, decoded_centroids, or a named variant of one: the `methods` of the config), for every "
        "IPC and generation seed: ImageFolder PNGs, latents and a lineage manifest under "
        "`<home>/runs/<experiment>/distilled/<method>/ipc<k>/seed<s>/`. Data version: hash of the PNGs.",
    )
    @fails_with_root_cause
    def distilled_images(context: dg.AssetExecutionContext, experiment: ExperimentResource):
        cfg = checked_config(context, experiment)
        home = experiment.storage()
        events = PartitionEvents(context, "distilled_images", {
            "backbone": None,
            "dataset": lambda pk: method_and_class(pk)[1],
            "mode_centroids": lambda pk: method_and_class(pk)[1],
            "method_settings": lambda pk: method_and_class(pk)[0],
            **({"variant_modes": lambda pk: finder_partition_key(cfg_at_load, *method_and_class(pk)) or NOT_READ}
               if variant_finders(cfg_at_load) else {}),
        })
        by_method: dict[str, list[str]] = {}
        for pk in context.partition_keys:
            method, class_id = method_and_class(pk)
            by_method.setdefault(method, []).append(class_id)
        conditions = backbone_class_conditions(cfg)  # once per run, not once per class
        failed, done = {}, 0
        for method, class_ids in by_method.items():
            checked_method_settings(cfg_at_load, cfg, method)
            yield from events.observe("method_settings", method, method_settings_version(cfg, method))
            for class_id in class_ids:
                yield from events.observe("dataset", class_id, class_version(cfg, home, class_id, conditions))
            progress = progress_logger(context.log, f"distilled_images[{method}, {len(class_ids)} classes]")
            # The core loads the backbone (once per process) only for the methods that sample or decode.
            for class_id, result in distillation.distill_classes(cfg, home, method, class_ids, progress=progress):
                pk = partition_key(method, class_id)
                if isinstance(result, BaseException):
                    failed[pk] = result
                    context.log.error(f"distilled_images[{method}/{class_id}] failed: {result}")
                    continue
                yield events.materialization(pk, combined_hash([c.content_hash for c in result.classes]),
                                             _metadata(cfg, home, method, class_id, result))
                problems, check_meta = distilled_problems(cfg, home, method, class_id)
                yield events.check("distilled_complete", pk, check_result(problems, check_meta))
                done += 1
        raise_partition_failures(failed, done)

    return distilled_images


def _metadata(cfg: ExperimentConfig, home, method: str, class_id: str, result) -> dict:
    """One partition's metadata: its images' lineage table, a preview and thumbnails."""
    root = storage.distilled_root(cfg, home)
    rows = []
    for written, rows_of_set in _rows_by_set(result):
        for r in rows_of_set:
            rows.append(dict(r, image=str((storage.set_images_dir(written.set_dir, class_id) / r["file"]).relative_to(root))))
    first = result.classes[0]
    prompted = any("prompt" in r for r in rows)
    variant = "method_kind" in rows[0]
    columns = (LINEAGE_COLUMNS + (VARIANT_LINEAGE_COLUMNS if variant else [])
               + (PROMPT_LINEAGE_COLUMNS if prompted else []))
    return {
        "preview": preview_markdown(result.preview, f"{method}, class {class_id}"),
        "thumbnails": thumbnails_markdown(
            result.preview, f"{method}, class {class_id}: {Path(first.set_dir).relative_to(root)}"),
        "lineage": table(rows, columns),
        **({"prompt": rows[0]["prompt"]} if prompted else {}),
        **(variant_metadata(cfg, method) if variant else {}),
        "images": len(rows),
        "sets": len(result.classes),
        "backbone_fingerprint": rows[0].get("backbone_fingerprint") or "",
        "manifest": dg.MetadataValue.path(str(first.manifest)),
        "distilled_root": dg.MetadataValue.path(str(root)),
    }


def variant_metadata(cfg: ExperimentConfig, method: str) -> dict:
    """A method variant's kind and own settings, as metadata (``distilled_images``, ``students``)."""
    v = cfg.variant(method)
    return {"method_kind": v.kind, "variant_settings": dg.MetadataValue.json(v.changed)}


def _rows_by_set(result):
    """Pair each written set with its lineage rows (``result.rows`` is in set order)."""
    pos = 0
    for written in result.classes:
        k = len(written.files)
        yield written, result.rows[pos:pos + k]
        pos += k
