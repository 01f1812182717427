"""Where the persistent Dagster instance keeps its files: ``<storage root>/dagster``.

``dagster.yaml`` can only read whole paths from environment variables, and the
storage root is ``$MGD3_HOME`` *or* a default inside the checkout. These three
thin subclasses of Dagster's SQLite storage, compute-log manager and artifact
storage resolve the directory the same way the core does
(``mgd3_core.storage.storage_root``), so runs, event logs, schedules and step
logs land next to the data they describe, whatever launched Dagster
(``make demo``, ``make ui``, ``dagster dev`` by hand). For production, replace
the ``storage`` block of ``dagster.yaml`` with the commented Postgres one.

No heavy imports here: the webserver and daemon import this module too.
"""

from __future__ import annotations

from pathlib import Path

from mgd3_core.storage import dagster_dir, storage_root

from .dagster_private import (
    ConfigurableClassData,
    DagsterSqliteStorage,
    LocalArtifactStorage,
    LocalComputeLogManager,
)


def dagster_storage_dir() -> Path:
    """``<storage root>/dagster``: ``$MGD3_HOME/dagster`` or ``<repo>/mgd3_home/dagster``."""
    return dagster_dir(storage_root())


class Mgd3SqliteStorage(DagsterSqliteStorage):
    """SQLite run, event-log and schedule storage under ``dagster_storage_dir()``."""

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value) -> "Mgd3SqliteStorage":
        return cls.from_local(str(dagster_storage_dir()), inst_data=inst_data)


class Mgd3ComputeLogManager(LocalComputeLogManager):
    """Captured step stdout/stderr under ``dagster_storage_dir()/logs``."""

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value) -> "Mgd3ComputeLogManager":
        return cls(str(dagster_storage_dir() / "logs"), inst_data=inst_data)


class Mgd3ArtifactStorage(LocalArtifactStorage):
    """The instance's scratch files (``storage/<run>/files``) under ``dagster_storage_dir()``."""

    @classmethod
    def config_type(cls):
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value) -> "Mgd3ArtifactStorage":
        return cls(str(dagster_storage_dir()), inst_data=inst_data)
