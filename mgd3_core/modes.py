"""Mode discovery: per-class clustering of VAE latents (MGD3, section 3.1).

``ModeFinder`` is a scikit-learn style estimator: ``__init__`` stores
parameters, ``fit`` does the work and returns ``self``, learned attributes end
in ``_``. The modes of a class are the cluster centres of its latents, k = IPC.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Method = Literal["kmeans", "gmm", "bisecting_kmeans"]


class ModeDiscoveryError(ValueError):
    """Latents that cannot be clustered as asked; the message names the class."""


def _as_matrix(latents: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(latents)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ModeDiscoveryError(f"{what}: no latents to cluster (got shape {x.shape})")
    x = x.reshape(x.shape[0], -1).astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise ModeDiscoveryError(
            f"{what}: {bad} latent(s) contain NaN or inf; re-encode the latent store for this class"
        )
    return x


class ModeFinder:
    """Find ``n_modes`` modes in one class's latents.

    Parameters
    ----------
    n_modes: number of modes (= IPC).
    method: "kmeans" (default, the paper), "gmm" (diagonal Gaussian mixture,
        the paper's best variant) or "bisecting_kmeans" (hierarchical modes,
        ManifoldGD, CVPR 2026).
    n_init, max_iter, seed: passed to the clustering algorithm.
    class_name: used in error messages only.

    Fitted attributes
    -----------------
    centroids_: (k, D) float32 mode centres in flattened latent space.
    counts_: (k,) number of latents assigned to each mode.
    labels_: (N,) mode index of each latent.
    inertia_: sum of squared distances of latents to their assigned centre.
    """

    def __init__(
        self,
        n_modes: int,
        method: Method = "kmeans",
        *,
        n_init: int = 3,
        max_iter: int = 300,
        seed: int = 0,
        class_name: str = "<class>",
    ):
        self.n_modes = n_modes
        self.method = method
        self.n_init = n_init
        self.max_iter = max_iter
        self.seed = seed
        self.class_name = class_name

    def fit(self, latents: np.ndarray) -> "ModeFinder":
        """latents: (N, ...) one class's latents; flattened to (N, D)."""
        what = f"class {self.class_name!r}"
        x = _as_matrix(latents, what)
        n, k = x.shape[0], int(self.n_modes)
        if k < 1:
            raise ModeDiscoveryError(f"{what}: the number of modes (IPC) must be >= 1, got {k}")
        if k > n:
            raise ModeDiscoveryError(
                f"{what}: IPC {k} is larger than the {n} images in the class; lower ipc in the "
                "config or add images to this class"
            )
        if self.method == "kmeans":
            from sklearn.cluster import KMeans

            est = KMeans(k, n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed).fit(x)
            centroids, labels = est.cluster_centers_, est.labels_
        elif self.method == "bisecting_kmeans":
            from sklearn.cluster import BisectingKMeans

            est = BisectingKMeans(k, n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed).fit(x)
            centroids, labels = est.cluster_centers_, est.labels_
        elif self.method == "gmm":
            from sklearn.mixture import GaussianMixture

            est = GaussianMixture(
                k, covariance_type="diag", n_init=self.n_init, max_iter=self.max_iter,
                random_state=self.seed, reg_covar=1e-4,
            ).fit(x)
            centroids, labels = est.means_, est.predict(x)
        else:
            raise ModeDiscoveryError(
                f"unknown mode discovery method {self.method!r}; choose kmeans, gmm or bisecting_kmeans"
            )
        centroids = np.asarray(centroids, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        # Order modes by size (largest first), ties by position: a stable, meaningful index.
        counts = np.bincount(labels, minlength=k)
        order = np.lexsort((np.arange(k), -counts))
        remap = np.empty(k, dtype=np.int64)
        remap[order] = np.arange(k)
        self.centroids_ = centroids[order].astype(np.float32)
        self.labels_ = remap[labels]
        self.counts_ = counts[order]
        self.inertia_ = float(((x - centroids[labels]) ** 2).sum())
        return self

    def closest_real(self, latents: np.ndarray) -> np.ndarray:
        """Indices (k,) of the training latents closest to each mode (all distinct)."""
        return closest_real_indices(latents, self.centroids_)


def closest_real_indices(latents: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """For each centroid the index of the nearest latent, never the same latent
    twice (greedy in order of the smallest distance). latents (N, ...), centroids (k, D)."""
    x = _as_matrix(latents, "closest_real")
    c = np.asarray(centroids, dtype=np.float64).reshape(len(centroids), -1)
    if c.shape[1] != x.shape[1]:
        raise ModeDiscoveryError(f"centroids have dimension {c.shape[1]} but latents {x.shape[1]}")
    if len(c) > len(x):
        raise ModeDiscoveryError(f"{len(c)} centroids but only {len(x)} latents to choose from")
    d = pairwise_sq_distances(c, x)  # (k, N)
    chosen = np.full(len(c), -1, dtype=np.int64)
    taken: set[int] = set()
    for flat in np.argsort(d, axis=None, kind="stable"):
        i, j = divmod(int(flat), d.shape[1])
        if chosen[i] < 0 and j not in taken:
            chosen[i] = j
            taken.add(j)
            if len(taken) == len(c):
                break
    return chosen


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared L2 distances (len(a), len(b)) between rows, without a 3-D temporary."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)
