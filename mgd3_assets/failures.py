"""Failures that say their cause, in the UI's event log and on the demo's console.

Dagster wraps an exception raised by an asset in
``DagsterExecutionStepExecutionError: Error occurred while executing op ...``
and shows the user's error only further down, as its cause. Every asset is
decorated with :func:`fails_with_root_cause`, which re-raises any exception as a
``dagster.Failure`` whose description is the root cause's one-line message
(``DatasetError: class 'delta' has no usable image in ...``); the original
exception and its traceback stay attached as the cause. :func:`root_cause_line`
gives the same line for an exception in this process or for a step failure
recorded in the event log (what ``make demo`` prints last).
"""

from __future__ import annotations

import functools
import inspect

import dagster as dg


def _one_line(text: str) -> str:
    """Several lines (e.g. a config error listing each bad key) joined with "; " (" " after a colon)."""
    out = ""
    for part in (p.strip() for p in str(text).strip().splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


# The project's errors name the file, class or parameter and what to do, so the line is the
# first error below Dagster's wrappers, not the innermost cause (a ConfigError explains the
# YAMLError it was raised from better than the YAMLError does).
def exception_line(exc: BaseException) -> str:
    """``<ExceptionClass>: <message>`` of ``exc`` (below any Dagster wrapper), on one line."""
    while isinstance(exc, dg.DagsterError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return _one_line(f"{type(exc).__name__}: {exc}")


def error_info_line(error) -> str:
    """The same line for an error recorded by Dagster (its ``SerializableErrorInfo``), without the module path
    (``mgd3_core.data.DatasetError: ...`` becomes ``DatasetError: ...``)."""
    while error.cls_name and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    message = error.message.strip()
    head, sep, rest = message.partition(": ")
    if sep and head.rsplit(".", 1)[-1] == error.cls_name:
        message = f"{error.cls_name}: {rest}"
    return _one_line(message)


def root_cause_line(event: dg.DagsterEvent) -> str | None:
    """The root cause of a step failure event: the Failure's description if it has one."""
    data = event.event_specific_data
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return _one_line(user.description)
    error = getattr(data, "error", None)
    return error_info_line(error) if error is not None else None


def fails_with_root_cause(fn):
    """Decorate an asset's compute function (under ``@dg.asset``): any exception it raises
    becomes a ``dagster.Failure`` described by the root cause's line, with the exception's class
    in the metadata; Dagster's own control-flow exceptions pass through unchanged."""

    def failure(e: Exception, args, kwargs) -> dg.Failure:
        line = exception_line(e)
        if isinstance(e, OSError) and e.filename is None:
            line += _storage_hint(args, kwargs)
        return dg.Failure(description=line, metadata={"error": line.split(":", 1)[0]})

    if inspect.isgeneratorfunction(fn):  # an asset that yields one event per partition
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (dg.Failure, dg.RetryRequested, dg.DagsterError):
                raise
            except Exception as e:
                raise failure(e, args, kwargs) from e

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (dg.Failure, dg.RetryRequested, dg.DagsterError):
            raise
        except Exception as e:
            raise failure(e, args, kwargs) from e

    return wrapper


def raise_partition_failures(failed: dict, done: int) -> None:
    """End a run of several partitions that had failures (``{partition key: exception}``): a
    ``dagster.Failure`` whose line starts with the first failure's root cause (what the demo prints
    last) and names every failed partition; ``done`` partitions of the run were materialized and
    stay so (a re-run computes only what is missing)."""
    if not failed:
        return
    (first_pk, first), *others = failed.items()
    line = exception_line(first)
    if str(first_pk) not in line:
        line += f" (partition {first_pk})"
    if others:
        line += (f"; and {len(others)} more partition(s) of this run failed: "
                 + "; ".join(f"{pk}: {exception_line(e)}" for pk, e in others))
    if done:
        line += f"; {done} other partition(s) of this run were materialized and are kept"
    raise dg.Failure(description=line, metadata={"error": exception_line(first).split(":", 1)[0],
                                                 "failed_partitions": ", ".join(map(str, failed))}) from first
