"""Mode discovery: per-class clustering of VAE latents (MGD3, section 3.1).

``ModeFinder`` is a scikit-learn estimator (``BaseEstimator``, ``ClusterMixin``):
``__init__`` stores parameters, ``fit`` does the work and returns ``self``,
learned attributes end in ``_``, ``predict`` assigns latents to their nearest
mode. The modes of a class are the cluster centres of its latents, k = IPC.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from .distances import pairwise_sq_distances

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


class ModeFinder(ClusterMixin, BaseEstimator):
    """Find ``n_modes`` modes in one class's latents.

    Parameters
    ----------
    n_modes: number of modes (= IPC).
    method: "kmeans" (default, the paper), "gmm" (diagonal Gaussian mixture,
        the paper's best variant) or "bisecting_kmeans" (hierarchical modes,
        ManifoldGD, CVPR 2026).
    n_init, max_iter, random_state: passed to the clustering algorithm.
    class_name: used in error messages only.

    Fitted attributes
    -----------------
    cluster_centers_: (k, D) float32 mode centres in flattened latent space, largest
        mode first (``centroids_`` is the same array).
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
        random_state: int = 0,
        class_name: str = "<class>",
    ):
        self.n_modes = n_modes
        self.method = method
        self.n_init = n_init
        self.max_iter = max_iter
        self.random_state = random_state
        self.class_name = class_name

    def fit(self, latents: np.ndarray, y=None) -> "ModeFinder":
        """latents: (N, ...) one class's latents; flattened to (N, D). ``y`` is ignored."""
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

            est = KMeans(k, n_init=self.n_init, max_iter=self.max_iter, random_state=self.random_state).fit(x)
            centroids, labels = est.cluster_centers_, est.labels_
        elif self.method == "bisecting_kmeans":
            from sklearn.cluster import BisectingKMeans

            est = BisectingKMeans(k, n_init=self.n_init, max_iter=self.max_iter, random_state=self.random_state).fit(x)
            centroids, labels = est.cluster_centers_, est.labels_
        elif self.method == "gmm":
            from sklearn.mixture import GaussianMixture

            est = GaussianMixture(
                k, covariance_type="diag", n_init=self.n_init, max_iter=self.max_iter,
                random_state=self.random_state, reg_covar=1e-4,
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
        self.cluster_centers_ = centroids[order].astype(np.float32)
        self.labels_ = remap[labels]
        self.counts_ = counts[order]
        self.inertia_ = float(((x - centroids[labels]) ** 2).sum())
        return self

    @classmethod
    def restored(cls, centers: np.ndarray, counts: np.ndarray, **params) -> "ModeFinder":
        """A finder fitted earlier, from its stored centres (k, ...) and counts: ``predict`` and
        ``closest_real`` work; ``labels_`` and ``inertia_`` belong to the fit and are not kept."""
        finder = cls(len(centers), **params)
        finder.cluster_centers_, finder.counts_ = np.asarray(centers), np.asarray(counts)
        return finder

    @property
    def centroids_(self) -> np.ndarray:
        """Alias of ``cluster_centers_`` (the paper's word)."""
        return self.cluster_centers_

    def predict(self, latents: np.ndarray) -> np.ndarray:
        """(N,) index of the nearest mode of each latent (N, ...)."""
        return nearest_mode(latents, self.cluster_centers_)

    def closest_real(self, latents: np.ndarray) -> np.ndarray:
        """Indices (k,) of the training latents closest to each mode (all distinct)."""
        return closest_real_indices(latents, self.cluster_centers_)


def nearest_mode(latents: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N,) index of the nearest of ``centroids`` (k, ...) for each of ``latents`` (N, ...),
    by squared L2 distance in flattened latent space (ties: the lower index)."""
    x = np.asarray(latents).reshape(len(latents), -1)
    return pairwise_sq_distances(x, np.asarray(centroids).reshape(len(centroids), -1)).argmin(1)


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
