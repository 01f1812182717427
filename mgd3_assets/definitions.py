"""The code location: assembles assets, checks, jobs, automation and resources.

``config_path`` and ``home`` default to ``$MGD3_CONFIG`` / ``$MGD3_HOME`` (or the
core's defaults); tests and the benchmarks pass their own.
"""

from __future__ import annotations

import os
import warnings

import dagster as dg

from mgd3_core.config import DEFAULT_CONFIG, load_config

from .assets import build_assets
from .automation import automation_sensor, observation_schedules
from .checks import build_checks
from .executors import build_executor
from .jobs import DATASET_JOB, METHOD_SETTINGS_JOB, build_jobs
from .partitions import variant_finders
from .resources import build_resources


def build_definitions(config_path: str | None = None, home: str | None = None) -> dg.Definitions:
    """Partitions and code versions come from the config as loaded now; the assets load it
    again when they run and refuse to run if it changed in between (``versions.checked_config``)."""
    cfg = load_config(config_path)
    with warnings.catch_warnings():
        # Partitioned checks and multi-dimension partition mappings are marked beta/preview.
        warnings.simplefilter("ignore", dg.BetaWarning)
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.Definitions(
            assets=build_assets(cfg),
            asset_checks=build_checks(cfg),
            jobs=build_jobs(variant_modes=bool(variant_finders(cfg))),
            sensors=[automation_sensor()],
            schedules=observation_schedules({"dataset": DATASET_JOB, "method_settings": METHOD_SETTINGS_JOB}),
            resources=build_resources(config_path, home),
            executor=build_executor(),  # MGD3_EXECUTOR (mgd3_assets/executors.py)
        )


_LOADED: dict = {}  # {what the definitions are built from: the definitions}


def _built_from() -> tuple:
    """What ``build_definitions()`` reads: the config file's bytes and the environment
    (``MGD3_*``, ``DAGSTER_HOME``; the working directory resolves a relative config path)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("MGD3_") or k == "DAGSTER_HOME"))
    path = os.environ.get("MGD3_CONFIG") or DEFAULT_CONFIG
    try:
        text = open(path, "rb").read()
    except OSError:
        text = None  # load_config resolves it against the project root, or names the missing file
    return env, os.getcwd(), text


@dg.definitions
def defs() -> dg.Definitions:
    """The code location. A process that loads it again and again (a Dask worker, for each step
    it executes; a runner of ``make demo``, for each run) builds it once per config and
    environment: nothing else goes into the definitions (weights are fingerprinted at run time)."""
    key = _built_from()
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = build_definitions()
    return _LOADED[key]
