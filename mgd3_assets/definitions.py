"""The code location: assembles assets, checks, jobs, automation and resources.

``config_path`` and ``home`` default to ``$MGD3_CONFIG`` / ``$MGD3_HOME`` (or the
core's defaults); tests and the benchmarks pass their own.
"""

from __future__ import annotations

import warnings

import dagster as dg

from mgd3_core.config import load_config

from .assets import build_assets
from .automation import automation_sensor
from .checks import build_checks
from .executors import build_executor
from .jobs import build_jobs
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
            jobs=build_jobs(),
            sensors=[automation_sensor()],
            resources=build_resources(config_path, home),
            executor=build_executor(),  # MGD3_EXECUTOR (mgd3_assets/executors.py)
        )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
