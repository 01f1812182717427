"""Partitions, derived from the experiment config when the definitions load.

- ``class``: one partition per configured class (its folder id), so a new or
  changed class recomputes only its own partitions;
- ``method``: one per distillation method in the config;
- ``distilled``: every (method, class) pair.

Adding a class to the config and reloading the definitions adds its partitions;
the other classes' partitions and their materializations are untouched.

The per-class assets run many partitions per run (``backfill_policy``): a UI "Materialize all",
a backfill and the automation's request after a backbone change group their classes into runs
of ``runs.classes_per_run`` (``ExperimentConfig.classes_per_run``); a ``distilled_images`` run
holds one method's classes (Dagster groups multi-partitions by the dimension with fewer keys).
"""

from __future__ import annotations

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.config import ExperimentConfig

METHOD_DIM = "method"
CLASS_DIM = "class"


def class_partitions(cfg: ExperimentConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([c.id for c in pipeline.class_infos(cfg)])


def method_partitions(cfg: ExperimentConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(cfg.methods))


def distilled_partitions(cfg: ExperimentConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {METHOD_DIM: method_partitions(cfg), CLASS_DIM: class_partitions(cfg)}
    )


def backfill_policy(cfg: ExperimentConfig, per_run: int = 1) -> dg.BackfillPolicy:
    """Up to ``per_run`` x ``classes_per_run`` partitions per run, for the assets whose bodies take
    any set of partition keys (``context.partition_keys``).

    ``mode_centroids`` takes twice as many (k-means is cheap next to encoding) and, above all, a
    policy of its own: such assets emit one materialization per partition and yield no output, and
    Dagster skips a step whose parent in the same run yielded none, so a backfill must never put
    ``mode_centroids`` in ``latent_store``'s runs; it groups parent and child into one run only when
    their policies are equal."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=per_run * cfg.classes_per_run())


def method_and_class(partition_key: dg.MultiPartitionKey | str) -> tuple[str, str]:
    """(method, class id) of a ``distilled`` partition key (or its string, ``<class>|<method>``:
    Dagster joins the dimensions in the order of their names)."""
    if not isinstance(partition_key, dg.MultiPartitionKey):
        partition_key = dg.MultiPartitionKey(dict(zip(sorted((CLASS_DIM, METHOD_DIM)), str(partition_key).split("|"))))
    keys = partition_key.keys_by_dimension
    return keys[METHOD_DIM], keys[CLASS_DIM]



def partition_key(method: str, class_id: str) -> dg.MultiPartitionKey:
    """The ``distilled`` partition key of (method, class id)."""
    return dg.MultiPartitionKey({METHOD_DIM: method, CLASS_DIM: class_id})
