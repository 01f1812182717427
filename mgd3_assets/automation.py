"""Declarative automation: re-run exactly what a changed backbone (or other input) affects.

Every store records a content hash as its data version, and the backbone its
fingerprint. The condition on each downstream asset fires for a partition when
one of its parents' *data version* changed (not merely when the parent was
re-materialized or re-observed), when a parent of the same partitioning is
requested on the same tick, when its own code version (the config it depends
on) changed, or when the partition is new (a class added to the config); it
then waits until no parent is missing or in progress. So:

- a new backbone fingerprint requests, on the next tick, every per-class
  partition below it (latent stores, modes, distilled sets), which the sensor
  submits as one backfill run in dependency order. Dagster chains requests
  within one tick only between assets of the same partitioning, so the
  gathering assets (students, reports) follow on later ticks: each once, when
  all of its inputs are updated and none is still in progress, i.e. after
  all classes;
- re-materializing or re-observing the backbone with the same fingerprint (or
  any store with the same content) requests nothing;
- materializations made by ``make demo`` trigger nothing: the demo runs
  everything downstream itself;
- automation reacts to changes; it does not fill a graph that was never
  materialized (``make demo`` or the UI's "Materialize all" does that).

The embedded backbone itself is re-trained when its code version changes (a
changed ``backbone`` or ``dataset`` section of the config); a pretrained
backbone is observed on a schedule, which is how a swapped weights file is found;
so are the per-class image files (``dataset``) and per-method settings
(``method_settings``), which is how an edited image or a changed sampler
reaches exactly its class's or its methods' partitions.
"""

from __future__ import annotations

import dagster as dg

# How often the observed inputs are re-read (when the sensor runs): a pretrained backbone's
# weights, each class's image files, each method's settings.
OBSERVE_CRON = "0 * * * *"
# Tag of the runs `make demo` launches (mgd3_assets/demo.py). The demo runs the whole graph in
# order itself, so its materializations must not also trigger the sensor (a UI opened while
# the demo runs would otherwise start a second copy of the remaining work).
DEMO_RUN_TAG = "mgd3/launched_by"
# Observable sources giving per-partition versions of the inputs (assets/inputs.py).
OBSERVED_INPUTS = ("dataset", "method_settings")


def _needs_run() -> dg.AutomationCondition:
    """Something this partition was computed from changed since it was last requested or updated:
    a parent's data version (or a parent of the same partitioning is requested on this tick),
    its own code version (the config it depends on), or it is new (a class added)."""
    changed_outside_the_demo = (
        dg.AutomationCondition.data_version_changed()
        & ~dg.AutomationCondition.all_new_updates_have_run_tags(tag_keys={DEMO_RUN_TAG})
    )
    parent_changed = dg.AutomationCondition.any_deps_match(
        changed_outside_the_demo | dg.AutomationCondition.will_be_requested()
    ).with_label("any_parent_data_version_changed")
    return (
        dg.AutomationCondition.newly_missing() | dg.AutomationCondition.code_version_changed() | parent_changed
    ).since_last_handled().with_label("needs_run")


def on_upstream_data_change() -> dg.AutomationCondition:
    """Request a partition that needs a run once none of its parents is missing, in progress, or
    itself waiting to run: so an asset that gathers many partitions runs once, after all of them.
    The observed inputs are not waited for: a class added in the UI is observed on the next
    scheduled observation, and its stores should not wait for that (the observation then
    re-requests nothing unless the content differs from what was encoded)."""
    needs_run = _needs_run()
    parent_waiting = dg.AutomationCondition.any_deps_match(
        ((dg.AutomationCondition.missing() | needs_run) & ~dg.AutomationCondition.will_be_requested())
        | dg.AutomationCondition.in_progress()
    ).ignore(dg.AssetSelection.assets(*OBSERVED_INPUTS)).with_label("any_parent_missing_running_or_waiting")
    return (needs_run & ~parent_waiting & ~dg.AutomationCondition.in_progress()).with_label(
        "on_upstream_data_change")


def on_backbone_config_change() -> dg.AutomationCondition:
    """Re-train the embedded backbone when the settings it is trained from change."""
    return (
        dg.AutomationCondition.code_version_changed().since_last_handled()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("on_backbone_config_change")


def observe_on_schedule() -> dg.AutomationCondition:
    """Re-observe an unpartitioned observable source (pretrained weights) periodically."""
    return dg.AutomationCondition.cron_tick_passed(OBSERVE_CRON).with_label("observe_hourly")


def observation_schedules(jobs: dict[str, str]) -> list[dg.ScheduleDefinition]:
    """Observe each partitioned input (``{asset: its observation job}``: every class's files, every
    method's settings) hourly in one run of all its partitions. An automation condition would
    request one run per partition (10 runs an hour for 10 classes, 1,000 for ImageNet-1K)."""
    return [dg.ScheduleDefinition(name=f"observe_{asset}_hourly", job_name=job, cron_schedule=OBSERVE_CRON,
                                  default_status=dg.DefaultScheduleStatus.RUNNING,
                                  description=f"Observe every partition of {asset} in one run.")
            for asset, job in jobs.items()]


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    """Evaluates the conditions above. Running by default: the conditions only react to
    changes, so a freshly loaded, fully materialized graph requests nothing."""
    return dg.AutomationConditionSensorDefinition(
        "mgd3_automation",
        target=dg.AssetSelection.all(include_sources=True),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Re-runs every partition downstream of a changed backbone fingerprint or store content.",
    )
