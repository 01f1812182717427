"""Every private Dagster API this project uses, behind one module (dagster pinned in pyproject.toml).

Dagster's underscore modules change between releases without notice. Nothing else in
the project imports ``dagster._...``; ``tests/test_dagster_private.py`` checks that each
name here still exists and takes the arguments we pass, so an upgrade that changes
one fails there, by name, before a demo or the UI breaks.

- storage classes subclassed by ``instance.py`` (the instance under the storage root);
- Dagster's own staleness resolver, what the UI's "unsynced" badge shows (``demo.py``).

No heavy imports at module level: the webserver and daemon import ``instance.py``.
"""

from __future__ import annotations

import dagster as dg
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.storage.root import LocalArtifactStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from dagster._serdes import ConfigurableClassData

__all__ = [
    "ConfigurableClassData",
    "DagsterSqliteStorage",
    "LocalArtifactStorage",
    "LocalComputeLogManager",
    "is_fresh",
    "stale_status_resolver",
]


def stale_status_resolver(defs: dg.Definitions, instance: dg.DagsterInstance):
    """Dagster's staleness resolver over ``defs`` as of now (``is_fresh`` asks it)."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def is_fresh(resolver, key: dg.AssetKey, partition: str | None) -> bool:
    """Whether an asset partition is materialized and up to date with its code and inputs."""
    from dagster._core.definitions.data_version import StaleStatus

    return resolver.get_status(key, partition) == StaleStatus.FRESH
