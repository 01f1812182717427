"""Fixtures shared by several test modules (pytest finds them here; no cross-module imports),
and the suite-wide thread count.

``MGD3_TEST_THREADS=<n>`` runs every test with ``n`` torch intra-op threads,
including the tests that otherwise pin one thread for speed (``one_thread``);
subprocesses get ``OMP_NUM_THREADS=<n>``. ``make test-portability`` runs the
suite at 1 and 2 threads, each with ATen's native CPU kernels and with
``ATEN_CPU_CAPABILITY=default`` (no AVX), the way another machine would: a test
that compares results across model instances, kernels, thread counts or batch
compositions bit for bit fails there.
"""

from __future__ import annotations

import os

import pytest
import torch

THREADS_ENV = "MGD3_TEST_THREADS"


def torch_threads_for_tests(default: int | None = None) -> int:
    """The thread count a test should use: $MGD3_TEST_THREADS when set, else
    ``default`` (None = the process's current count)."""
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: set it to a positive integer (or unset it)")
        return n
    return torch.get_num_threads() if default is None else default


def pytest_configure(config) -> None:
    if os.environ.get(THREADS_ENV):
        n = torch_threads_for_tests()
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)  # worker subprocesses (webserver, crash tests)


def pytest_report_header(config) -> str:
    return (f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP barrier
    stalls (10-100x slower when the cores are busy). $MGD3_TEST_THREADS overrides
    it (the portability check runs these tests at 2 threads too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads_for_tests(default=1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory):
    """The tiny experiment materialized once per test session into a persistent SQLite
    instance (``dagster_helpers.TinyGraph``): shared by the end-to-end, check and browser tests."""
    from tests.dagster_helpers import TinyGraph

    return TinyGraph(tmp_path_factory.mktemp("tiny_graph")).materialize()
