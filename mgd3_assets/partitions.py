"""Partitions, derived from the experiment config when the definitions load.

- ``class``: one partition per configured class (its folder id), so a new or
  changed class recomputes only its own partitions;
- ``method``: one per distillation method in the config;
- ``distilled``: every (method, class) pair;
- ``finder``: the mode finders that method variants choose other than the config's ``modes``
  (``variant_modes``: every (finder, class) pair; absent when no variant chooses one).

A method is one entry of ``methods``: a base method or a named variant (``config_methods``), so a
grid of settings is a set of partitions. Adding a variant adds its partitions, removing one
leaves the others' alone.

Adding a class to the config and reloading the definitions adds its partitions;
the other classes' partitions and their materializations are untouched.

The per-class assets run many partitions per run (``backfill_policy``): a UI "Materialize all",
a backfill and the automation's request after a backbone change group their classes into runs
of ``runs.classes_per_run`` (``ExperimentConfig.classes_per_run``); a ``distilled_images`` run
holds one method's classes. Dagster's backfill daemon groups the multi-partitions ready at one
iteration by the dimension with fewer keys among them, which is why ``mode_centroids`` records a
run's classes together (``assets/modes.py``).
"""

from __future__ import annotations

import dagster as dg

from mgd3_core import pipeline
from mgd3_core.config import ExperimentConfig, ModesConfig, finder_key

METHOD_DIM = "method"
CLASS_DIM = "class"
FINDER_DIM = "finder"


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


# --------------------------------------------------------------------------- variants' mode finders
def variant_finders(cfg: ExperimentConfig) -> dict[str, ModesConfig]:
    """{finder key: its settings} of every mode finder a listed variant uses other than the
    config's ``modes`` (whose modes are ``mode_centroids``), sorted by key: each is computed once
    per class however many variants share it."""
    found = {finder_key(v.modes): v.modes for v in cfg.method_variants().values() if v.modes != cfg.modes}
    return dict(sorted(found.items()))


def finder_partitions(cfg: ExperimentConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({
        FINDER_DIM: dg.StaticPartitionsDefinition(list(variant_finders(cfg))), CLASS_DIM: class_partitions(cfg)})


def finder_and_class(partition_key: dg.MultiPartitionKey | str) -> tuple[str, str]:
    """(finder key, class id) of a ``variant_modes`` partition key (or its string, ``<class>|<finder>``)."""
    if not isinstance(partition_key, dg.MultiPartitionKey):
        partition_key = dg.MultiPartitionKey(dict(zip(sorted((CLASS_DIM, FINDER_DIM)), str(partition_key).split("|"))))
    keys = partition_key.keys_by_dimension
    return keys[FINDER_DIM], keys[CLASS_DIM]


def finder_partition_key(cfg: ExperimentConfig, method: str, class_id: str) -> dg.MultiPartitionKey | None:
    """The ``variant_modes`` partition a ``distilled_images`` partition reads, or None when its method
    uses the config's ``modes`` (``mode_centroids``)."""
    modes = cfg.modes_for(method)
    if modes == cfg.modes:
        return None
    return dg.MultiPartitionKey({FINDER_DIM: finder_key(modes), CLASS_DIM: class_id})


def variant_modes_mapping(cfg: ExperimentConfig) -> dg.MultiPartitionMapping:
    """``variant_modes[finder, class]`` -> ``distilled_images[method, class]`` for the methods that
    use that finder (the others read no partition of it)."""
    users: dict[str, list[str]] = {f: [] for f in variant_finders(cfg)}
    for name, v in cfg.method_variants().items():
        if v.modes != cfg.modes:
            users[finder_key(v.modes)].append(name)
    return dg.MultiPartitionMapping({
        FINDER_DIM: dg.DimensionPartitionMapping(METHOD_DIM, dg.StaticPartitionMapping(users)),
        CLASS_DIM: dg.DimensionPartitionMapping(CLASS_DIM, dg.IdentityPartitionMapping()),
    })
