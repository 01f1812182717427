"""One materialization, one data version and one check result per partition, in a run of several.

A run of K partitions (``BackfillPolicy.multi_run``, ``partitions.backfill_policy``) that returned
one output would give all K partitions the run's one data version and one input-version hash, so
editing one class's images could no longer re-run that class alone. The per-class assets therefore
declare their output optional and emit, for each partition as soon as it is written:

- an ``AssetObservation`` of the observed inputs it was computed from (``dataset[class]``,
  ``method_settings[method]``) when their latest observation differs or there is none, so a graph
  materialized from the UI before any observation does not look stale at the first hourly one;
- an ``AssetMaterialization`` with the partition's own data version and the provenance tags
  Dagster writes for an output (code version; per parent, the data version and the event it was
  read from), computed for that partition's parents only;
- an ``AssetCheckEvaluation`` per check of the asset, in the same run (no check-only runs).

The staleness resolver reads exactly these tags (``dagster_private.provenance_tags``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from .dagster_private import check_target, provenance_tags

DATA_VERSION_TAG = "dagster/data_version"
NOT_READ = object()  # a parent none of whose partitions this partition reads (PartitionEvents.parents)
USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"


def _record_version(record) -> str | None:
    if record is None:
        return None
    return (record.event_log_entry.tags or {}).get(DATA_VERSION_TAG)


def observe_if_changed(context: dg.AssetExecutionContext, source: str, partition: str | None, version: str):
    """Yield an observation of ``source[partition]`` at ``version`` unless its latest observation
    already says so (the inputs a run reads, recorded by the run)."""
    record = context.instance.get_latest_data_version_record(dg.AssetKey(source), True, partition)
    if _record_version(record) != version:
        yield dg.AssetObservation(asset_key=source, partition=partition,
                                  tags={DATA_VERSION_TAG: version, USER_PROVIDED_TAG: "true"})


@dataclass
class PartitionEvents:
    """Builds the events of ``asset`` for the partitions of one run. ``parents``: {parent asset name:
    the function from this asset's partition key to the parent's (None = unpartitioned parent);
    a function may return ``NOT_READ``: that partition reads no partition of the parent}."""

    context: dg.AssetExecutionContext
    asset: str
    parents: dict
    observed: dict = field(default_factory=dict)  # {(source, partition): (version, storage id)}

    def observe(self, source: str, partition: str, version: str):
        """Yield an observation of ``source[partition]`` at ``version`` unless its latest observation
        already says so; remember the version and its event as this run's input."""
        yield from observe_if_changed(self.context, source, partition, version)
        record = self.context.instance.get_latest_data_version_record(dg.AssetKey(source), True, partition)
        self.observed[(source, partition)] = (version, record.storage_id if record else None)

    def _input(self, parent: str, partition: str | None) -> tuple[str | None, int | None]:
        if (parent, partition) in self.observed:
            return self.observed[(parent, partition)]
        record = self.context.instance.get_latest_data_version_record(dg.AssetKey(parent), None, partition)
        return _record_version(record), (record.storage_id if record else None)

    def materialization(self, pk, data_version: str, metadata: dict) -> dg.AssetMaterialization:
        key = dg.AssetKey(self.asset)
        parents = {p: to_parent(pk) if to_parent else None for p, to_parent in self.parents.items()}
        inputs = {dg.AssetKey(p): self._input(p, part) for p, part in parents.items() if part is not NOT_READ}
        code_version = self.context.assets_def.code_versions_by_key.get(key) or self.context.run.run_id
        tags = provenance_tags(data_version, code_version, inputs)
        if isinstance(pk, dg.MultiPartitionKey):
            tags.update({f"dagster/partition/{dim}": value for dim, value in pk.keys_by_dimension.items()})
        return dg.AssetMaterialization(asset_key=key, partition=pk, metadata=metadata, tags=tags)

    def check(self, name: str, pk, result: dg.AssetCheckResult) -> dg.AssetCheckEvaluation:
        """``result`` (of the check function) as the evaluation of check ``name`` on partition ``pk``,
        targeting the partition's latest materialization (the one just emitted)."""
        key = dg.AssetKey(self.asset)
        record = self.context.instance.get_latest_data_version_record(key, False, pk)
        target = None
        if record is not None:
            target = check_target(record.run_id, record.storage_id, record.timestamp)
        return dg.AssetCheckEvaluation(
            asset_key=key, check_name=name, passed=result.passed, metadata=result.metadata,
            description=result.description, blocking=True, partition=str(pk),
            target_materialization_data=target)

    def recorded_together(self, check: str, ready: list):
        """Materializations and check results of partitions already computed, ``(pk, materialization,
        check result)`` each, emitted together at the end of a run rather than one by one: the
        backfill daemon then finds all of the run's partitions ready at one iteration, and groups
        their children's runs by the dimension with fewer ready keys (``assets/modes.py``). Each
        check is built after its materialization is recorded, so it targets that one."""
        for pk, materialization, result in ready:
            yield materialization
            yield self.check(check, pk, result)
