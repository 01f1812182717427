"""Pairwise Euclidean distances between rows, shared by mode discovery, the
distilled sets' lineage and the diversity metrics."""

from __future__ import annotations

import numpy as np


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Squared L2 distances (len(a), len(b)) between the rows of a (n, D) and b (m, D),
    through the expansion |a|^2 + |b|^2 - 2ab (no (n, m, D) temporary), clipped at 0
    against rounding. ``dtype``: the precision to compute in; None keeps the inputs'."""
    if dtype is not None:
        a = np.asarray(a, dtype=dtype)
        b = np.asarray(b, dtype=dtype)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def pairwise_distances(a: np.ndarray, b: np.ndarray, dtype=np.float64) -> np.ndarray:
    """L2 distances (len(a), len(b)); see :func:`pairwise_sq_distances`."""
    return np.sqrt(pairwise_sq_distances(a, b, dtype))
