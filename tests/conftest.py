"""Fixtures shared by several test modules (pytest finds them here; no cross-module imports)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP barrier
    stalls (10-100x slower when the cores are busy); it also keeps the thread
    count fixed, which bit-exact resume comparisons rely on."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory):
    """The tiny experiment materialized once per test session into a persistent SQLite
    instance (``dagster_helpers.TinyGraph``): shared by the end-to-end, check and browser tests."""
    from tests.dagster_helpers import TinyGraph

    return TinyGraph(tmp_path_factory.mktemp("tiny_graph")).materialize()
