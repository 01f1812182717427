"""Diversity, representativeness, t-SNE, DD-Ranking scores and seed aggregation.

Feature-space metrics take one class at a time: ``syn`` ``(n, d)`` are the
synthetic images' features and ``real`` ``(m, d)`` the real training images'
features of the *same* class, in a fixed feature space (the real-trained
teacher's penultimate layer, :func:`mgd3_core.students.penultimate_features`).
Distances are Euclidean in that space. :func:`per_class_metrics` loops over
classes and returns tidy rows.

=========================  ==============================================  ============
metric                     definition (per class)                          better
=========================  ==============================================  ============
``diversity``              mean_i min_{j != i} ||s_i - s_j||               higher
``representativeness``     mean_i mean of the k smallest ||s_i - r_j||     lower
``cos_div``                1 - mean_i max_{j != i} cos(s_i, s_j)           higher
``cos_rep``                mean_i max_j cos(s_i, r_j)                      higher
=========================  ==============================================  ============

``representativeness`` is a distance (the paper's form, MGD3 Sec. 5, there in
t-SNE space with k = 50): small means every synthetic image sits among real
images. ``cos_div`` uses each point's nearest neighbour, like ``diversity``,
rather than the single most similar pair of the class, so one duplicated pair
does not decide the score of a whole class.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .distances import pairwise_distances

# DD-Ranking (Li et al., 2025) default weight between IOR and HLR.
LRS_WEIGHT = 0.5


# ---------------------------------------------------------------- helpers
def _as_points(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) feature array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf features")
    return x


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has an all-zero feature vector; its cosine similarity is undefined")
    return x / norms


# ---------------------------------------------------------------- diversity / representativeness
def diversity(syn) -> float:
    """Mean distance from each synthetic point to its nearest *other* synthetic point.

    ``syn``: (n, d). Returns NaN for n = 1 (no other point to be diverse from).
    Identical points give 0.
    """
    syn = _as_points(syn, "syn")
    if len(syn) < 2:
        return float("nan")
    d = pairwise_distances(syn, syn, dtype=None)
    np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean())


def representativeness(syn, real, k: int = 50) -> float:
    """Mean over synthetic points of the mean distance to its ``k`` nearest real points.

    ``syn``: (n, d), ``real``: (m, d); ``k`` is clipped to m (a class with
    fewer than k real images uses all of them). Lower is more representative.
    """
    syn, real = _as_points(syn, "syn"), _as_points(real, "real")
    if k < 1:
        raise ValueError(f"representativeness: k must be >= 1, got {k}")
    if len(syn) == 0 or len(real) == 0:
        raise ValueError(f"representativeness needs points on both sides, got {len(syn)} syn and {len(real)} real")
    if syn.shape[1] != real.shape[1]:
        raise ValueError(f"syn has {syn.shape[1]} features but real has {real.shape[1]}")
    k = min(int(k), len(real))
    d = pairwise_distances(syn, real, dtype=None)
    nearest = np.partition(d, k - 1, axis=1)[:, :k]
    return float(nearest.mean())


def cosine_diversity(syn) -> float:
    """1 - mean over synthetic points of the max cosine similarity to another synthetic point.

    ``syn``: (n, d). NaN for n = 1; 0 for identical (or parallel) points.
    """
    syn = _as_points(syn, "syn")
    if len(syn) < 2:
        return float("nan")
    u = _unit(syn, "syn")
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return float(1.0 - sim.max(axis=1).mean())


def cosine_representativeness(syn, real) -> float:
    """Mean over synthetic points of the max cosine similarity to a real point (1 = on a real point)."""
    syn, real = _as_points(syn, "syn"), _as_points(real, "real")
    if syn.shape[1] != real.shape[1]:
        raise ValueError(f"syn has {syn.shape[1]} features but real has {real.shape[1]}")
    return float((_unit(syn, "syn") @ _unit(real, "real").T).max(axis=1).mean())


def per_class_metrics(syn_features, syn_labels, real_features, real_labels, *, k: int = 50) -> pd.DataFrame:
    """The four metrics for every class present in ``syn_labels``.

    Args:
        syn_features: (n, d); syn_labels: (n,) class of each synthetic image.
        real_features: (m, d); real_labels: (m,) -- the real *training* images.
        k: neighbours for :func:`representativeness`.

    Returns:
        One row per class: ``class, n_syn, n_real, diversity, representativeness,
        cos_div, cos_rep``.
    """
    syn_features, real_features = _as_points(syn_features, "syn_features"), _as_points(real_features, "real_features")
    syn_labels, real_labels = np.asarray(syn_labels), np.asarray(real_labels)
    if syn_labels.shape != (len(syn_features),) or real_labels.shape != (len(real_features),):
        raise ValueError("syn_labels / real_labels must have one label per feature row")
    rows = []
    for c in np.unique(syn_labels):
        s, r = syn_features[syn_labels == c], real_features[real_labels == c]
        if len(r) == 0:
            raise ValueError(f"class {c!r} has synthetic images but no real images in real_labels")
        rows.append({"class": c.item() if hasattr(c, "item") else c, "n_syn": len(s), "n_real": len(r),
                     "diversity": diversity(s), "representativeness": representativeness(s, r, k),
                     "cos_div": cosine_diversity(s), "cos_rep": cosine_representativeness(s, r)})
    return pd.DataFrame(rows, columns=["class", "n_syn", "n_real", "diversity", "representativeness",
                                       "cos_div", "cos_rep"])


# ---------------------------------------------------------------- t-SNE
def tsne_embed(features, *, seed: int = 0, perplexity: float = 30.0, n_threads: int | None = 1) -> np.ndarray:
    """2-D t-SNE coordinates ``(n, 2)`` of ``features`` ``(n, d)``, seeded (PCA init).

    Perplexity is lowered to ``(n - 1) / 3`` for small n, as t-SNE needs
    perplexity < n. ``n_threads`` caps the OpenMP threads of sklearn's
    Barnes-Hut gradient (None: sklearn's default, all cores): on a shared
    2-core machine its threads spin at barriers, and 300 points took 58 s with
    all cores against 7 s with one.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = _as_points(features, "features")
    if len(x) < 4:
        raise ValueError(f"tsne_embed needs at least 4 points, got {len(x)}")
    perplexity = min(float(perplexity), (len(x) - 1) / 3.0)
    with threadpool_limits(limits=n_threads, user_api="openmp"):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def tsne_table(real_features, real_labels, syn_by_method: dict[str, tuple[np.ndarray, np.ndarray]],
               classes: Sequence, *, seed: int = 0, max_real: int = 200) -> pd.DataFrame:
    """Per class, one joint t-SNE of the real images and every method's synthetic images.

    Joint per class so that the methods' points are comparable within a class
    (the paper's Fig. 5). ``syn_by_method`` maps method -> (features (n, d),
    labels (n,)). At most ``max_real`` real points per class (the first ones)
    keep t-SNE fast.

    Returns rows ``class, method ('real' for real points), x, y``.
    """
    real_features, real_labels = _as_points(real_features, "real_features"), np.asarray(real_labels)
    frames = []
    for c in classes:
        parts = [("real", real_features[real_labels == c][:max_real])]
        for method, (f, lab) in syn_by_method.items():
            parts.append((method, _as_points(f, f"syn_by_method[{method!r}]")[np.asarray(lab) == c]))
        stacked = np.concatenate([p for _, p in parts])
        xy = tsne_embed(stacked, seed=seed)
        names = np.concatenate([[m] * len(p) for m, p in parts])
        frames.append(pd.DataFrame({"class": c, "method": names, "x": xy[:, 0], "y": xy[:, 1]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["class", "method", "x", "y"])


# ---------------------------------------------------------------- DD-Ranking scores
def hard_label_recovery(full_acc: float, syn_hard_acc: float) -> float:
    """HLR = Acc(real, hard labels) - Acc(synthetic, hard labels), percentage points (lower is better)."""
    return float(full_acc) - float(syn_hard_acc)


def improvement_over_random(syn_acc: float, random_acc: float) -> float:
    """IOR = Acc(synthetic) - Acc(random real subset, same IPC and protocol), points (higher is better)."""
    return float(syn_acc) - float(random_acc)


def label_robust_score(hlr: float, ior: float, weight: float = LRS_WEIGHT) -> float:
    """DD-Ranking's label-robust score in percent, from HLR and IOR in percentage points.

    alpha = w * IOR - (1 - w) * HLR with IOR, HLR as fractions (so alpha is in
    [-1, 1]); LRS = (e^alpha - e^-1) / (e - e^-1) * 100, which maps alpha = -1,
    0, 1 to 0, 26.9, 100 %. A method equal to random with no gap to full data
    scores 26.9 %.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"label_robust_score: weight must be in [0, 1], got {weight}")
    alpha = weight * ior / 100.0 - (1.0 - weight) * hlr / 100.0
    return 100.0 * (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


# ---------------------------------------------------------------- aggregation
def aggregate(df: pd.DataFrame, by: Sequence[str], value: str = "acc") -> pd.DataFrame:
    """Mean, sample std (ddof = 1; 0 when n = 1) and count of ``value`` per group.

    Groups with NaN keys are kept (e.g. the full-data rows' ``ipc``). Returns
    columns ``*by, mean, std, n``.
    """
    missing = [c for c in [*by, value] if c not in df.columns]
    if missing:
        raise KeyError(f"aggregate: column(s) {missing} not in the frame (columns: {list(df.columns)})")
    g = df.groupby(list(by), dropna=False, sort=False)[value]
    out = g.agg(mean="mean", std=lambda s: float(s.std(ddof=1)) if s.count() > 1 else 0.0, n="count").reset_index()
    out["n"] = out["n"].astype(int)
    return out


def dd_ranking_scores(acc: pd.DataFrame, *, value: str = "final_acc", weight: float = LRS_WEIGHT,
                      full_method: str = "full_data", random_method: str = "random_real") -> pd.DataFrame:
    """HLR, IOR and LRS per (method, ipc, student, protocol) from the run-level accuracy rows.

    Uses seed means: HLR = mean full-data accuracy of the student (hard
    protocol, any ``ipc`` value) - the method's mean hard-protocol accuracy;
    IOR = the method's mean accuracy - ``random_method``'s at the same ipc,
    student and protocol. Missing references give NaN. Rows of
    ``full_method`` itself are not scored.

    Returns columns ``method, ipc, student, protocol, hlr, ior, lrs``.
    """
    keys = ["method", "ipc", "student", "protocol"]
    means = aggregate(acc, keys, value).set_index(keys)["mean"]
    full = acc[(acc["method"] == full_method) & (acc["protocol"] == "hard")].groupby("student")[value].mean()
    rows = []
    for (method, ipc, student, protocol), mean in means.items():
        if method == full_method:
            continue
        hard = means.get((method, ipc, student, "hard"), float("nan"))
        hlr = hard_label_recovery(full.get(student, float("nan")), hard)
        ior = improvement_over_random(mean, means.get((random_method, ipc, student, protocol), float("nan")))
        lrs = label_robust_score(hlr, ior, weight) if np.isfinite(hlr) and np.isfinite(ior) else float("nan")
        rows.append({"method": method, "ipc": ipc, "student": student, "protocol": protocol,
                     "hlr": hlr, "ior": ior, "lrs": lrs})
    return pd.DataFrame(rows, columns=[*keys, "hlr", "ior", "lrs"])


def mean_over_classes(metrics: pd.DataFrame, by: Iterable[str] = ("method", "ipc"),
                      columns: Sequence[str] = ("diversity", "representativeness", "cos_div", "cos_rep")
                      ) -> pd.DataFrame:
    """Class-averaged feature metrics per group (NaN classes, e.g. IPC 1 diversity, are skipped)."""
    return metrics.groupby(list(by), dropna=False, sort=False)[list(columns)].mean().reset_index()
