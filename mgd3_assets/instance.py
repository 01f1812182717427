"""Where the persistent Dagster instance keeps its files: ``<storage root>/dagster``.

``dagster.yaml`` can only read whole paths from environment variables, and the
storage root is ``$MGD3_HOME`` *or* a default inside the checkout. These three
thin subclasses of Dagster's SQLite storage, compute-log manager and artifact
storage resolve the directory the same way the core does
(``mgd3_core.storage.storage_root``), so runs, event logs, schedules and step
logs land next to the data they describe, whatever launched Dagster
(``make demo``, ``make ui``, ``dagster dev`` by hand).

A deployment shared by a webserver, a daemon and many run and Dask workers keeps
runs, event logs and schedules in PostgreSQL instead (``deploy/dagster.yaml``,
``Mgd3PostgresStorage``): Dagster's own storage, after one check that the server
answers, so a wrong host or port is one clear error before anything is written, and
keeping its connections open (dagster-postgres alone opens a new server connection
for every query; on the distill stage the server then spent 0.7 s of CPU per run,
against the orchestrating process's 0.25 s).

No heavy imports here: the webserver and daemon import this module too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from dagster_postgres import (
    DagsterPostgresStorage,
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)
from dagster_postgres.utils import pg_url_from_config

from mgd3_core.storage import dagster_dir, storage_root

from .dagster_private import (
    ConfigurableClassData,
    DagsterSqliteStorage,
    LocalArtifactStorage,
    LocalComputeLogManager,
    pg_engine,
    pooled_pg_engine,
    use_pg_engine,
)
from .run_launcher import quicken_daemons_from_yaml


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
        quicken_daemons_from_yaml()  # before the daemon's loops start (run_launcher.py)
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


class PostgresUnreachable(ConnectionError):
    """The instance's PostgreSQL server does not answer; the message names host and port."""


def check_postgres_reachable(url: str, timeout: float = 5.0) -> tuple[str, int]:
    """(host, port) of a ``postgresql://`` URL once a TCP connection to it succeeds.

    Raises ``PostgresUnreachable`` naming the host, the port and the variables that set
    them (``deploy/dagster.yaml``), instead of Dagster's retries ending in "too many
    retries for DB connection".
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 5432
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise PostgresUnreachable(
            f"PostgreSQL at {host}:{port} is unreachable ({e.strerror or e}): start the server, or point "
            "DAGSTER_PG_HOST / DAGSTER_PG_PORT at it (deploy/dagster.yaml)") from None
    return host, port


def storage_is_a_server() -> bool:
    """Whether ``$DAGSTER_HOME/dagster.yaml`` keeps runs and events in PostgreSQL (``deploy/``)
    rather than in files under the storage root (the default ``dagster.yaml``)."""
    path = Path(os.environ.get("DAGSTER_HOME", ".")) / "dagster.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    storage = (config or {}).get("storage") or {}
    return "postgres" in storage or (storage.get("custom") or {}).get("class") == "Mgd3PostgresStorage"


_ENGINES: dict = {}  # (storage class, url): the engine this process's instances share


def _forget_engines_in_child() -> None:
    # A forked child must not use its parent's open connections (SQLAlchemy's advice for fork).
    for engine in _ENGINES.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_engines_in_child)


def _holding_connections(storage_cls):
    """``storage_cls`` (a dagster-postgres storage) querying through an engine that keeps its
    connection open and that every instance of this process shares: a Dask worker makes an
    instance for each step, and a new engine would connect and query the server's settings and
    tables again each time. The first storage in a process checks the tables (creates them
    if absent); disposing one closes the engine's idle connection (it reconnects when used)."""

    class Holding(storage_cls):
        def __init__(self, postgres_url: str, should_autocreate_tables: bool = True):
            key = (storage_cls.__name__, postgres_url)
            super().__init__(postgres_url, should_autocreate_tables and key not in _ENGINES)
            if key not in _ENGINES:
                _ENGINES[key] = pooled_pg_engine(postgres_url)
            use_pg_engine(self, _ENGINES[key])

        def dispose(self) -> None:
            super().dispose()
            pg_engine(self).dispose()

    Holding.__name__ = Holding.__qualname__ = f"Held{storage_cls.__name__}"
    return Holding


HeldPostgresRunStorage = _holding_connections(PostgresRunStorage)
HeldPostgresEventLogStorage = _holding_connections(PostgresEventLogStorage)
HeldPostgresScheduleStorage = _holding_connections(PostgresScheduleStorage)


class Mgd3PostgresStorage(DagsterPostgresStorage):
    """Dagster's PostgreSQL run, event-log and schedule storage, after ``check_postgres_reachable``;
    each keeps one connection open while the instance lives (``_holding_connections``)."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True,
                 inst_data: ConfigurableClassData | None = None):
        # DagsterPostgresStorage.__init__ with the storages above (it would connect 3 more times).
        self.postgres_url, self.should_autocreate_tables = postgres_url, should_autocreate_tables
        self._inst_data = inst_data
        self._run_storage = HeldPostgresRunStorage(postgres_url, should_autocreate_tables)
        self._event_log_storage = HeldPostgresEventLogStorage(postgres_url, should_autocreate_tables)
        self._schedule_storage = HeldPostgresScheduleStorage(postgres_url, should_autocreate_tables)
        super(DagsterPostgresStorage, self).__init__()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value) -> "Mgd3PostgresStorage":
        url = pg_url_from_config(config_value)
        check_postgres_reachable(url)
        quicken_daemons_from_yaml()  # before the daemon's loops start (run_launcher.py)
        return cls(postgres_url=url, inst_data=inst_data,
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True))
