"""Jobs: one per partitioning (inferred from the selected assets), so each run covers
one partition of one stage.

The demo (``python -m mgd3_assets.demo``) runs them in dependency order; in the
UI they are the "Materialize" targets of the stages.
"""

from __future__ import annotations

import dagster as dg

DATASET_JOB = "observe_dataset_job"
METHOD_SETTINGS_JOB = "observe_method_settings_job"
BACKBONE_JOB = "backbone_job"
PER_CLASS_JOB = "per_class_job"
DISTILL_JOB = "distill_job"
TEACHER_JOB = "teacher_job"
STUDENTS_JOB = "students_job"
REPORTS_JOB = "reports_job"


def build_jobs() -> list[dg.UnresolvedAssetJobDefinition]:
    return [
        # One job per partitioning, so two observation jobs.
        dg.define_asset_job(DATASET_JOB, selection=dg.AssetSelection.assets("dataset"),
                            description="Observe each class's image files (content keys)."),
        dg.define_asset_job(METHOD_SETTINGS_JOB, selection=dg.AssetSelection.assets("method_settings"),
                            description="Observe each distillation method's settings."),
        dg.define_asset_job(BACKBONE_JOB, selection=dg.AssetSelection.assets("backbone"),
                            description="Train or reuse the embedded backbone, or observe a pretrained one."),
        dg.define_asset_job(PER_CLASS_JOB, selection=dg.AssetSelection.assets("latent_store", "mode_centroids"),
                            description="Encode one class and find its modes."),
        dg.define_asset_job(DISTILL_JOB, selection=dg.AssetSelection.assets("distilled_images"),
                            description="Distil one class with one method."),
        dg.define_asset_job(TEACHER_JOB, selection=dg.AssetSelection.assets("teacher", "full_data_students"),
                            description="Train the real-data teacher and the full-data students (the upper bound)."),
        dg.define_asset_job(STUDENTS_JOB, selection=dg.AssetSelection.assets("students"),
                            description="Train and evaluate the students of one method."),
        dg.define_asset_job(REPORTS_JOB, selection=dg.AssetSelection.assets("evaluation_report", "diversity_report"),
                            description="The evaluation and diversity reports over every method and class."),
    ]
