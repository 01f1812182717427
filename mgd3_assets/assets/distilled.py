"""``distilled_images``: one method's distilled images of one class, for every IPC and seed.

Each materialization carries the lineage of its images (mode, distance to the
centroid, seed) as a table, and a thumbnail grid. The manifest files hold the
full lineage; ``mgd3_core.distilled.lineage_of(png)`` answers for any one PNG.
"""

from pathlib import Path

import dagster as dg

from mgd3_core import pipeline, storage
from mgd3_core.config import ExperimentConfig

from ..automation import on_upstream_data_change
from ..failures import fails_with_root_cause
from ..metadata import preview_markdown, progress_logger, table, thumbnails_markdown
from ..partitions import CLASS_DIM, METHOD_DIM, distilled_partitions, method_and_class
from ..executors import accelerator_step
from ..resources import ExperimentResource
from ..versions import checked_config, checked_method_settings, combined_hash, stage_asset


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
        ],
        **accelerator_step(),
        kinds={"pytorch", "png"},
        automation_condition=on_upstream_data_change(),
        description="Distilled images of one class by one method (mgd3, unguided, mgd3_no_stop, random_real, "
        "closest_real, decoded_centroids), for every IPC and generation seed: ImageFolder PNGs, latents and "
        "a lineage manifest under `<home>/runs/<experiment>/distilled/<method>/ipc<k>/seed<s>/`. "
        "Data version: hash of the PNGs.",
    )
    @fails_with_root_cause
    def distilled_images(
        context: dg.AssetExecutionContext, experiment: ExperimentResource
    ) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        home = experiment.storage()
        method, class_id = method_and_class(context.partition_key)
        checked_method_settings(cfg_at_load, cfg, method)
        # The core loads the backbone (once per process) only for the methods that sample or decode.
        result = pipeline.distill_class(cfg, home, method, class_id,
                                        progress=progress_logger(context.log, f"distilled_images[{method}/{class_id}]"))
        root = storage.distilled_root(cfg, home)
        rows = []
        for written, rows_of_set in _rows_by_set(result):
            for r in rows_of_set:
                rows.append(dict(r, image=str((storage.set_images_dir(written.set_dir, class_id) / r["file"]).relative_to(root))))
        context.log.info(f"{method}/{class_id}: wrote {len(rows)} images in {len(result.classes)} sets")
        first = result.classes[0]
        prompted = any("prompt" in r for r in rows)
        columns = LINEAGE_COLUMNS + (PROMPT_LINEAGE_COLUMNS if prompted else [])
        return dg.MaterializeResult(
            data_version=dg.DataVersion(combined_hash([c.content_hash for c in result.classes])),
            metadata={
                "preview": preview_markdown(result.preview, f"{method}, class {class_id}"),
                "thumbnails": thumbnails_markdown(
                    result.preview, f"{method}, class {class_id}: {Path(first.set_dir).relative_to(root)}"),
                "lineage": table(rows, columns),
                **({"prompt": rows[0]["prompt"]} if prompted else {}),
                "images": len(rows),
                "sets": len(result.classes),
                "backbone_fingerprint": rows[0].get("backbone_fingerprint") or "",
                "manifest": dg.MetadataValue.path(str(first.manifest)),
                "distilled_root": dg.MetadataValue.path(str(root)),
            },
        )

    return distilled_images


def _rows_by_set(result):
    """Pair each written set with its lineage rows (``result.rows`` is in set order)."""
    pos = 0
    for written in result.classes:
        k = len(written.files)
        yield written, result.rows[pos:pos + k]
        pos += k
