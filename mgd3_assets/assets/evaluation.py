"""Gathering assets: the teacher, the students, and the reports over every method and class.

- ``teacher``: a classifier trained on the real training split: the fixed
  feature space of the diversity metrics, the soft-label teacher and the
  ConvNet full-data bound;
- ``full_data_students``: the configured students trained on the real data
  (the upper bound of every table);
- ``students``: partitioned by method, each partition reads every class of
  that method's distilled sets;
- ``diversity_report`` and ``evaluation_report``: unpartitioned, they read
  everything; with the automation sensor they run once per change, after all
  classes.
"""

import math

import dagster as dg
import pandas as pd

from mgd3_core import evaluate, storage
from mgd3_core.backbones import backbone_class_conditions
from mgd3_core.config import ExperimentConfig
from mgd3_core.evaluation_report import evaluation_report as write_evaluation_report

from ..automation import on_upstream_data_change
from ..failures import fails_with_root_cause
from ..metadata import frame_table, progress_logger
from ..dagster_private import reread_input_versions
from ..partition_events import observe_if_changed
from ..partitions import METHOD_DIM, class_partitions, method_partitions
from ..executors import accelerator_step
from ..resources import BackboneResource, ExperimentResource
from ..versions import checked_config, class_version, stage_asset
from .distilled import variant_metadata


def _accuracy_summary(df: pd.DataFrame) -> dict:
    """Mean final accuracy per (IPC, student, protocol), as flat metadata numbers for the UI's plots."""
    out = {}
    for (ipc, student, protocol), g in df.groupby(["ipc", "student", "protocol"], dropna=False):
        ipc_label = "all" if not (isinstance(ipc, (int, float)) and math.isfinite(ipc)) else int(ipc)
        out[f"final_acc/ipc{ipc_label}/{student}/{protocol}"] = round(float(g["final_acc"].mean()), 2)
    return out


def build_evaluation_assets(cfg: ExperimentConfig) -> list[dg.AssetsDefinition]:
    return [_teacher_asset(cfg), *_student_assets(cfg), *_report_assets(cfg)]


def _teacher_asset(cfg: ExperimentConfig) -> dg.AssetsDefinition:
    @stage_asset(
        cfg, "teacher",
        # Every class's image files (train: what it learns; test: its accuracy). Under automation
        # an edited image therefore re-runs the reports once with the new teacher and once more
        # after the class's new distilled sets and students (Dagster chains requests within a
        # tick only inside one partitioning); `make demo` runs every stage once, in order.
        deps=[dg.AssetDep("dataset", partition_mapping=dg.AllPartitionMapping())],
        **accelerator_step(),
        kinds={"pytorch"},
        automation_condition=on_upstream_data_change(),
        description="The classifier named by evaluation.teacher.model (ConvNet or ResNet-18) trained on the real "
        "training split of every configured class: the soft-label teacher, the feature "
        "space of the diversity metrics and the full-data run of its own student. "
        "Data version: hash of its weights.",
    )
    @fails_with_root_cause
    def teacher(context: dg.AssetExecutionContext, experiment: ExperimentResource):
        cfg = checked_config(context, experiment)
        # Every class's images as the teacher reads them, observed and recorded as its input: a
        # graph materialized from the UI before any observation is up to date at the first one.
        conditions = backbone_class_conditions(cfg)
        for class_id in class_partitions(cfg).get_partition_keys():
            yield from observe_if_changed(context, "dataset", class_id,
                                          class_version(cfg, experiment.storage(), class_id, conditions))
        reread_input_versions(context, ["dataset"])
        meta = evaluate.train_teacher(cfg, experiment.storage(), progress=progress_logger(context.log, "teacher"))
        weights = storage.teacher_weights_file(cfg, experiment.storage())
        yield dg.MaterializeResult(
            data_version=dg.DataVersion(evaluate.teacher_fingerprint(cfg, experiment.storage())),
            metadata={**{k: v for k, v in meta.items() if isinstance(v, (int, float, str))},
                      "weights": dg.MetadataValue.path(str(weights))},
        )

    return teacher


def _student_assets(cfg: ExperimentConfig) -> list[dg.AssetsDefinition]:
    soft = "soft" in cfg.evaluation.protocols

    @stage_asset(
        cfg, "full_data_students",
        deps=["teacher"],
        **accelerator_step(),
        kinds={"pytorch"},
        automation_condition=on_upstream_data_change(),
        description="Every configured student trained on the whole real training split (the fit split under "
        "evaluation.split: validation): the upper bound.",
    )
    @fails_with_root_cause
    def full_data_students(context: dg.AssetExecutionContext, experiment: ExperimentResource) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        df = evaluate.train_students(cfg, experiment.storage(), evaluate.FULL_DATA,
                                     progress=progress_logger(context.log, "full_data_students"))
        return dg.MaterializeResult(metadata={"runs": frame_table(df), **_accuracy_summary(df)})

    @stage_asset(
        cfg, "students",
        partitions_def=method_partitions(cfg),
        deps=[dg.AssetDep("distilled_images",
                          partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=METHOD_DIM)),
              *(["teacher"] if soft else [])],
        **accelerator_step(),
        kinds={"pytorch"},
        automation_condition=on_upstream_data_change(),
        description="Student classifiers trained on one method's distilled sets (all classes), for every "
        "IPC, generation seed, student and protocol, evaluated on the real test split (with "
        "evaluation.split: validation, on the images held out of the training split).",
    )
    @fails_with_root_cause
    def students(context: dg.AssetExecutionContext, experiment: ExperimentResource) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        method = context.partition_key
        df = evaluate.train_students(cfg, experiment.storage(), method,
                                     progress=progress_logger(context.log, f"students[{method}]"))
        variant = variant_metadata(cfg, method) if method != cfg.kind_of(method) else {}
        return dg.MaterializeResult(metadata={"runs": frame_table(df), **variant, **_accuracy_summary(df)})

    return [full_data_students, students]


def _report_assets(cfg: ExperimentConfig) -> list[dg.AssetsDefinition]:
    @stage_asset(
        cfg, "diversity_report",
        # Only the distilled sets, not the modes they were built from: a direct edge to
        # mode_centroids would let a changed mode trigger this report a tick before the
        # distilled sets built from that mode are even requested.
        deps=[dg.AssetDep("distilled_images", partition_mapping=dg.AllPartitionMapping()), "teacher"],
        **accelerator_step(),  # the teacher runs on evaluation.device
        kinds={"pandas"},
        automation_condition=on_upstream_data_change(),
        description="Diversity and representativeness of every method's distilled sets per class, in the "
        "teacher's feature space, and a t-SNE of real vs synthetic features.",
    )
    @fails_with_root_cause
    def diversity_report(context: dg.AssetExecutionContext, experiment: ExperimentResource) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        out = evaluate.diversity_report(cfg, experiment.storage(),
                                        progress=progress_logger(context.log, "diversity_report"))
        return dg.MaterializeResult(metadata={
            "summary": frame_table(out["summary"], digits=3),  # cosine metrics live in [0, 1]
            "metrics_csv": dg.MetadataValue.path(out["metrics_csv"]),
            "tsne_csv": dg.MetadataValue.path(out["tsne_csv"]),
        })

    @stage_asset(
        cfg, "evaluation_report",
        deps=[dg.AssetDep("students", partition_mapping=dg.AllPartitionMapping()),
              "full_data_students", "diversity_report"],
        kinds={"pandas", "html"},
        automation_condition=on_upstream_data_change(),
        description="Accuracy of every method (mean +- std over generation seeds) next to the baselines and "
        "the full-data bound, with DD-Ranking scores, feature metrics, plots and image grids "
        "(report.md, index.html, CSVs).",
    )
    @fails_with_root_cause
    def evaluation_report(context: dg.AssetExecutionContext, experiment: ExperimentResource,
                          backbone: BackboneResource) -> dg.MaterializeResult:
        cfg = checked_config(context, experiment)
        report = write_evaluation_report(cfg, experiment.storage(), fingerprint=backbone.fingerprint() or "")
        context.log.info(f"evaluation report: {report.html}")
        metadata = {
            "results_table": dg.MetadataValue.md(report.table_markdown),
            "report_html": dg.MetadataValue.path(str(report.html)),
            "report_markdown": dg.MetadataValue.path(str(report.markdown)),
            "report_dir": dg.MetadataValue.path(str(report.out_dir)),
        }
        if report.variants_markdown:  # methods beyond the six base names: ranked by base method
            metadata["variants_table"] = dg.MetadataValue.md(report.variants_markdown)
        if report.summary is not None:
            metadata["summary"] = frame_table(report.summary, digits=3)
        return dg.MaterializeResult(metadata=metadata)

    return [diversity_report, evaluation_report]
