"""Jobs: one per stage and partitioning (inferred from the selected assets). A run of a
per-class stage covers any set of its partitions (``runs.classes_per_run`` per run when a
backfill or ``make demo`` groups them). The assets evaluate their own checks for each partition
they write (``partition_events``), so the jobs leave the stand-alone check steps out.

The demo (``python -m mgd3_assets.demo``) runs them in dependency order; in the
UI they are the "Materialize" targets of the stages.
"""

from __future__ import annotations

import dagster as dg

DATASET_JOB = "observe_dataset_job"
METHOD_SETTINGS_JOB = "observe_method_settings_job"
BACKBONE_JOB = "backbone_job"
ENCODE_JOB = "encode_job"
MODES_JOB = "modes_job"
VARIANT_MODES_JOB = "variant_modes_job"
DISTILL_JOB = "distill_job"
TEACHER_JOB = "teacher_job"
STUDENTS_JOB = "students_job"
REPORTS_JOB = "reports_job"


def build_jobs(variant_modes: bool = False) -> list[dg.UnresolvedAssetJobDefinition]:
    """The stages' jobs; ``variant_modes``: the graph has that asset (a method variant with a mode
    finder of its own), so its job too (a job of its own: it is partitioned by finder and class)."""
    return [
        # One job per partitioning, so two observation jobs.
        dg.define_asset_job(DATASET_JOB, selection=dg.AssetSelection.assets("dataset"),
                            description="Observe each class's image files (content keys)."),
        dg.define_asset_job(METHOD_SETTINGS_JOB, selection=dg.AssetSelection.assets("method_settings"),
                            description="Observe each distillation method's settings."),
        dg.define_asset_job(BACKBONE_JOB, selection=dg.AssetSelection.assets("backbone"),
                            description="Train or reuse the embedded backbone, or observe a pretrained one."),
        # Two jobs, not one: an asset that emits one materialization per partition yields no output,
        # and Dagster skips a step whose parent in the same run yielded none (partitions.py).
        dg.define_asset_job(ENCODE_JOB, selection=dg.AssetSelection.assets("latent_store").without_checks(),
                            description="Encode classes into their latent stores."),
        dg.define_asset_job(MODES_JOB, selection=dg.AssetSelection.assets("mode_centroids").without_checks(),
                            description="Find the modes of classes."),
        *([dg.define_asset_job(VARIANT_MODES_JOB, selection=dg.AssetSelection.assets("variant_modes").without_checks(),
                               description="Find the modes of classes with the mode finders of method variants.")]
          if variant_modes else []),
        dg.define_asset_job(DISTILL_JOB, selection=dg.AssetSelection.assets("distilled_images").without_checks(),
                            description="Distil classes with one method."),
        dg.define_asset_job(TEACHER_JOB, selection=dg.AssetSelection.assets("teacher", "full_data_students"),
                            description="Train the real-data teacher and the full-data students (the upper bound)."),
        dg.define_asset_job(STUDENTS_JOB, selection=dg.AssetSelection.assets("students"),
                            description="Train and evaluate the students of one method."),
        dg.define_asset_job(REPORTS_JOB, selection=dg.AssetSelection.assets("evaluation_report", "diversity_report"),
                            description="The evaluation and diversity reports over every method and class."),
    ]
