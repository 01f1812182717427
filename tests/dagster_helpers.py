"""Shared pieces of the Dagster-layer tests: tiny configs, event seeding, and one tiny
materialized graph per test session (used by the end-to-end, check and browser tests).

The tiny experiment: MNIST digits 0 and 1, 12 training images each at 16 px, a
one-layer DiT and a two-block VAE trained for 3 steps each, 4 sampling steps,
IPC 2, one generation seed, one guided and one real-image method, students
trained for 2 epochs. Its backbone has two labels, so a config with
class "0" only can use it as a "pretrained" backbone and grow to "0", "1".

The materialized tiny graph (``tiny_graph``) widens it to every method, both
label protocols (a ResNet-18 teacher for the soft labels) and the t-SNE path,
so one materialization covers the whole evaluation end to end.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys
import warnings
from pathlib import Path

import dagster as dg
import yaml

from mgd3_core.config import ALL_METHODS, config_from_dict

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

DATA_VERSION_TAG = "dagster/data_version"
PER_CLASS = ("latent_store", "mode_centroids", "distilled_images")
OBSERVED_INPUTS = ("dataset", "method_settings")
GATHERING = ("teacher", "full_data_students", "students", "diversity_report", "evaluation_report")

TINY = {
    "name": "tiny",
    "seed": 0,
    "dataset": {"kind": "embedded_mnist", "classes": ["0", "1"], "max_per_class": 12, "image_size": 16},
    "backbone": {
        "kind": "embedded",
        "embedded": {
            "vae": {"block_out_channels": [8, 16], "steps": 3, "batch_size": 16},
            "dit": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "steps": 3,
                    "batch_size": 16, "warmup_steps": 1},
        },
    },
    "ipc": [2],
    "modes": {"n_init": 1},
    "sampler": {"steps": 4, "t_stop": 2, "batch_size": 16},
    "methods": ["mgd3", "random_real"],
    "evaluation": {"generation_seeds": [0], "training_seeds": [0], "representativeness_k": 5, "tsne_classes": 0,
                   "hard": {"epochs_by_ipc": {1: 2}, "full_data_epochs": 2}},
}


TINY_GRAPH_CHANGES = {
    "methods": list(ALL_METHODS),
    "evaluation": {**TINY["evaluation"], "protocols": ["hard", "soft"], "tsne_classes": 1,
                   "soft": {"epochs": 2, "temperature": 4.0}, "teacher": {"model": "resnet18"},
                   "ranking_evaluations": 2},
}


def tiny_config(**changes) -> dict:
    """TINY with top-level keys replaced (``dataset``/``backbone`` dicts are merged one level)."""
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    config_from_dict(raw)  # fail here, with the core's message, if a test writes a bad config
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def build_defs(config_path: Path, home: Path) -> dg.Definitions:
    from mgd3_assets.definitions import build_definitions

    return build_definitions(config_path=str(config_path), home=str(home))


# ----------------------------------------------------------------- events without compute
def all_partitions(defs: dg.Definitions) -> dict[str, list[str | None]]:
    """{asset name: partition keys (or [None])} for every materializable asset."""
    graph = defs.resolve_asset_graph()
    out = {}
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        out[key.to_user_string()] = node.partitions_def.get_partition_keys() if node.partitions_def else [None]
    return out


def report_event(instance: dg.DagsterInstance, asset: str, partition: str | None, version: str,
                 observation: bool = False) -> None:
    """Record a materialization (or observation) with a data version, as a run would."""
    cls = dg.AssetObservation if observation else dg.AssetMaterialization
    instance.report_runless_asset_event(cls(asset_key=asset, partition=partition, tags={DATA_VERSION_TAG: version}))


def seed_graph(instance: dg.DagsterInstance, defs: dg.Definitions, backbone_version: str = "fp1",
               suffix: str = "a", observe_backbone: bool = False) -> None:
    """Every asset partition materialized once, in dependency order, with data versions,
    after the observed inputs (each class's files, each method's settings), as ``make demo`` does."""
    graph = defs.resolve_asset_graph()
    for source in OBSERVED_INPUTS:
        for pk in graph.get(dg.AssetKey(source)).partitions_def.get_partition_keys():
            report_event(instance, source, pk, f"{source}-{pk}-{suffix}", observation=True)
    report_event(instance, "backbone", None, backbone_version, observation=observe_backbone)
    order = [*PER_CLASS, *GATHERING]
    parts = all_partitions(defs)
    for asset in order:
        for pk in parts[asset]:
            report_event(instance, asset, pk, f"{asset}-{pk}-{suffix}")


# Every automation evaluation in the tests happens at this one instant. The pretrained backbone is
# also re-observed on an hourly cron; with the wall clock, a test running across the top of an hour
# would see that tick fire between two evaluations and request an extra observation.
EVALUATION_TIME = datetime.datetime.now(datetime.timezone.utc).replace(minute=30, second=0, microsecond=0)


def evaluate(defs: dg.Definitions, instance: dg.DagsterInstance, cursor=None):
    """One automation tick at ``EVALUATION_TIME`` (no cron tick ever passes between two of them)."""
    return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                             evaluation_time=EVALUATION_TIME)


def run_ticks(defs: dg.Definitions, instance: dg.DagsterInstance, cursor, max_ticks: int = 8):
    """Evaluate tick after tick, materializing what each tick requests (with new data) before the
    next, as the sensor's backfills would, until a tick requests nothing.

    Returns (the requests of each tick that requested something, the last cursor).
    """
    ticks = []
    for n in range(max_ticks):
        result = evaluate(defs, instance, cursor)
        cursor = result.cursor
        asked = requested(result)
        if not asked:
            return ticks, cursor
        ticks.append(asked)
        for asset, pks in asked.items():
            for pk in pks:
                report_event(instance, asset, pk, f"{asset}-{pk}-tick{n}")
    raise AssertionError(f"automation still requesting after {max_ticks} ticks: {ticks[-1]}")


def requested(result) -> dict[str, set]:
    """{asset name: requested partition keys} of an automation evaluation, non-empty ones only."""
    out = {}
    for r in result.results:
        if isinstance(r.key, dg.AssetKey) and r.true_subset.size:
            out[r.key.to_user_string()] = set(result.get_requested_partitions(r.key))
    return out


def latest_materialization(instance: dg.DagsterInstance, asset: str, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    return records[0].asset_materialization if records else None


def materialized_partitions(instance: dg.DagsterInstance, asset: str) -> set:
    key = dg.AssetKey(asset)
    parts = instance.get_materialized_partitions(key)
    return set(parts) if parts else ({None} if instance.get_latest_materialization_event(key) else set())


# ----------------------------------------------------------------- who loads the backbone
@contextlib.contextmanager
def recording_backbone_loads(step_names: set[str]):
    """Record every backbone load while active, as the name of the asset or check function
    on the call stack ("?" if none). The per-process cache is emptied whenever a new step
    execution asks for the backbone, so each step that needs it loads it (as in a fresh run
    process, or on a fresh worker) and is seen here, once per step however many partitions
    it materializes: the count per step is what a run pays."""
    from mgd3_core import backbones, pipeline

    loads: list[str] = []
    load, get = backbones.load_backbone, pipeline.get_backbone
    last_step = [None]

    def step_frame(frame):
        while frame is not None:
            if frame.f_code.co_name in step_names:
                return frame
            frame = frame.f_back
        return None

    def recording_load(*args, **kwargs):
        frame = step_frame(sys._getframe(1))
        loads.append(frame.f_code.co_name if frame is not None else "?")
        return load(*args, **kwargs)

    def uncached_get(*args, **kwargs):
        frame = step_frame(sys._getframe(1))
        if frame is None or frame is not last_step[0]:  # a new step execution: as a new process
            pipeline._BACKBONES.clear()
            last_step[0] = frame
        return get(*args, **kwargs)

    backbones.load_backbone, pipeline.get_backbone = recording_load, uncached_get
    try:
        yield loads
    finally:
        backbones.load_backbone, pipeline.get_backbone = load, get


def step_names(defs: dg.Definitions) -> set[str]:
    """Names of every asset and asset check (= their compute functions' names)."""
    graph = defs.resolve_asset_graph()
    return ({k.to_user_string() for k in graph.get_all_asset_keys()}
            | {c.name for c in graph.asset_check_keys})


# ----------------------------------------------------------------- one materialized tiny graph
class TinyGraph:
    """The tiny experiment materialized into a persistent SQLite instance under ``root``."""

    def __init__(self, root: Path, raw: dict | None = None):
        """``raw``: the experiment config (default: the tiny one widened by ``TINY_GRAPH_CHANGES``)."""
        raw = raw if raw is not None else tiny_config(**TINY_GRAPH_CHANGES)
        self.root = root
        self.home = root / "home"
        self.dagster_home = root / "dagster_home"
        self.dagster_home.mkdir(parents=True)
        (self.dagster_home / "dagster.yaml").write_text(yaml.safe_dump({
            "storage": {"sqlite": {"base_dir": str(root / "dagster_storage")}},
            "telemetry": {"enabled": False},
            "nux": {"enabled": False},
            "concurrency": {"pools": {"default_limit": 1}},
        }))
        self.config_path = write_config(root / "tiny.yaml", raw)
        self.cfg = config_from_dict(raw)
        self.defs = build_defs(self.config_path, self.home)
        self.instance = dg.DagsterInstance.from_config(str(self.dagster_home))
        self.stage_reports = []
        self.backbone_loads: list[str] = []

    def materialize(self):
        from mgd3_assets import demo

        with recording_backbone_loads(step_names(self.defs)) as loads:
            self.stage_reports = demo.materialize_graph(self.defs, self.instance, log=lambda m: None,
                                                        log_level="WARNING")
        self.backbone_loads = list(loads)
        return self

    def env(self) -> dict:
        """Environment for a subprocess (webserver) that should see this instance and experiment."""
        return {**os.environ, "DAGSTER_HOME": str(self.dagster_home), "MGD3_HOME": str(self.home),
                "MGD3_CONFIG": str(self.config_path)}
