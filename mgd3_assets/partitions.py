"""Partitions, derived from the experiment config when the definitions load.

- ``class``: one partition per configured class (its folder id), so a new or
  changed class recomputes only its own partitions;
- ``method``: one per distillation method in the config;
- ``distilled``: every (method, class) pair.

Adding a class to the config and reloading the definitions adds its partitions;
the other classes' partitions and their materializations are untouched.
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


def method_and_class(partition_key: dg.MultiPartitionKey) -> tuple[str, str]:
    """(method, class id) of a ``distilled`` partition key."""
    keys = partition_key.keys_by_dimension
    return keys[METHOD_DIM], keys[CLASS_DIM]

