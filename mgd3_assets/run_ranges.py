"""The partitions of a planned run: one key, or a range of several (as a backfill's runs carry)."""

from __future__ import annotations

import dagster as dg

# The run tags that make a run materialize a range of partitions (what a backfill's runs carry).
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def chunk_runs(partitions_def, plan: list, k: int) -> list:
    """Group [(partition key, asset keys)] into runs of up to ``k`` partitions with the same asset
    keys, each a range of consecutive partition keys (so a run never computes a partition that is
    up to date), as Dagster's backfill does with ``BackfillPolicy.multi_run(k)``. Multi-partitions
    (method x class, finder x class) are grouped along the class dimension, one method (finder) per run."""
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        from .partitions import CLASS_DIM

        classes = {c: i for i, c in enumerate(partitions_def.get_partitions_def_for_dimension(CLASS_DIM).get_partition_keys())}
        other = next(d.name for d in partitions_def.partitions_defs if d.name != CLASS_DIM)
        order = {pk: (pk.keys_by_dimension[other], classes[pk.keys_by_dimension[CLASS_DIM]]) for pk, _ in plan}
        adjacent = lambda a, b: order[a][0] == order[b][0] and order[b][1] == order[a][1] + 1  # noqa: E731
        by_method = sorted(plan, key=lambda item: order[item[0]])
    else:
        index = {pk: i for i, pk in enumerate(partitions_def.get_partition_keys())}
        adjacent = lambda a, b: index[b] == index[a] + 1  # noqa: E731
        by_method = sorted(plan, key=lambda item: index[item[0]])
    runs: list[list] = []
    for pk, keys in by_method:
        last = runs[-1] if runs else None
        if last and len(last) < k and last[-1][1] == keys and adjacent(last[-1][0], pk):
            last.append((pk, keys))
        else:
            runs.append([(pk, keys)])
    return [(run[0][0], run[0][1]) if len(run) == 1 else (dg.PartitionKeyRange(str(run[0][0]), str(run[-1][0])), run[0][1])
            for run in runs]


def partition_tags(job: dg.JobDefinition, pk) -> dict:
    """The run tags that make a run materialize partition ``pk`` (all dimensions of a multi-partition),
    or every partition of a ``dg.PartitionKeyRange``."""
    if isinstance(pk, dg.PartitionKeyRange):
        return {RANGE_START_TAG: pk.start, RANGE_END_TAG: pk.end}
    return dict(job.partitions_def.get_tags_for_partition_key(pk)) if pk is not None else {}


def describe(pk) -> str:
    """A planned run's partitions for the console: a key, or ``first...last`` of a range."""
    if isinstance(pk, dg.PartitionKeyRange):
        return f"{pk.start}...{pk.end}"
    return str(pk or "")
