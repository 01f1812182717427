"""Feature-space metrics, DD-Ranking scores and aggregation on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mgd3_core.metrics import (aggregate, cosine_diversity, cosine_representativeness, dd_ranking_scores,
                               diversity, hard_label_recovery, improvement_over_random, label_robust_score,
                               per_class_metrics, representativeness, tsne_embed, tsne_table)


def col(*values):
    """1-D points as an (n, 1) feature array."""
    return np.array(values, dtype=float)[:, None]


# ---------------------------------------------------------------- diversity / representativeness
def test_identical_synthetic_points_have_zero_diversity():
    assert diversity(np.ones((5, 3))) == 0.0
    assert cosine_diversity(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-12)


def test_diversity_1d_by_hand():
    # nearest other point: 0 -> 1 (1), 1 -> 0 (1), 3 -> 1 (2)
    assert diversity(col(0, 1, 3)) == pytest.approx(4 / 3)
    # 2-D: a 3-4-5 triangle's corners (0,0), (3,0), (0,4): nearest 3, 3, 4
    assert diversity(np.array([[0, 0], [3, 0], [0, 4]])) == pytest.approx(10 / 3)


def test_single_synthetic_point_has_undefined_diversity():
    assert math.isnan(diversity(col(2.0)))
    assert math.isnan(cosine_diversity(col(2.0)))


def test_synthetic_equal_to_real_is_perfectly_representative():
    real = np.random.default_rng(0).normal(size=(20, 4))
    assert representativeness(real, real, k=1) == pytest.approx(0.0, abs=1e-6)
    assert cosine_representativeness(real, real) == pytest.approx(1.0)


def test_representativeness_1d_by_hand_and_k_clipping():
    real = col(1, 2, 4)
    assert representativeness(col(0), real, k=1) == pytest.approx(1.0)
    assert representativeness(col(0), real, k=2) == pytest.approx(1.5)       # (1 + 2) / 2
    assert representativeness(col(0), real, k=50) == pytest.approx(7 / 3)    # k clipped to 3
    assert representativeness(col(0, 5), real, k=1) == pytest.approx(1.0)    # (1 + 1) / 2
    assert representativeness(col(0, 5), real, k=2) == pytest.approx((1.5 + 2.0) / 2)  # 5 -> 4, 2: (1 + 3) / 2
    with pytest.raises(ValueError, match="k must be >= 1"):
        representativeness(col(0), real, k=0)


def test_cosine_forms_by_hand():
    e1, e2, e3 = np.eye(3)
    assert cosine_diversity(np.stack([e1, e2, e3])) == pytest.approx(1.0)
    # max cosine to another point: e1 -> 1, e1 -> 1, e2 -> 0; 1 - 2/3
    assert cosine_diversity(np.stack([e1, e1, e2])) == pytest.approx(1 / 3)
    # scale does not matter
    assert cosine_diversity(np.stack([e1, 5 * e1])) == pytest.approx(0.0, abs=1e-12)
    real = np.stack([e2, (e1 + e2) / np.sqrt(2)])
    assert cosine_representativeness(e1[None], real) == pytest.approx(1 / np.sqrt(2))
    with pytest.raises(ValueError, match="all-zero"):
        cosine_representativeness(np.zeros((1, 3)), real)


def test_per_class_metrics_matches_the_functions_per_class():
    rng = np.random.default_rng(1)
    syn, real = rng.normal(size=(6, 3)), rng.normal(size=(30, 3))
    syn_y, real_y = np.array([0, 0, 0, 7, 7, 7]), np.repeat([0, 7], 15)
    df = per_class_metrics(syn, syn_y, real, real_y, k=4)
    assert list(df["class"]) == [0, 7] and list(df["n_real"]) == [15, 15]
    for c, row in df.set_index("class").iterrows():
        s, r = syn[syn_y == c], real[real_y == c]
        assert row["diversity"] == pytest.approx(diversity(s))
        assert row["representativeness"] == pytest.approx(representativeness(s, r, 4))
        assert row["cos_div"] == pytest.approx(cosine_diversity(s))
        assert row["cos_rep"] == pytest.approx(cosine_representativeness(s, r))
    with pytest.raises(ValueError, match="no real images"):
        per_class_metrics(syn, syn_y, real, np.zeros(30, int), k=4)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        diversity(np.zeros(4))
    with pytest.raises(ValueError, match="features"):
        representativeness(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------- t-SNE
def test_tsne_is_seeded_and_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (15, 8)), rng.normal(5, 0.1, (15, 8))])
    a, b = tsne_embed(x, seed=3), tsne_embed(x, seed=3)
    assert a.shape == (30, 2)
    np.testing.assert_allclose(a, b)
    ca, cb = a[:15].mean(0), a[15:].mean(0)
    spread = max(np.linalg.norm(a[:15] - ca, axis=1).max(), np.linalg.norm(a[15:] - cb, axis=1).max())
    assert np.linalg.norm(ca - cb) > spread


def test_tsne_table_rows_per_class_and_method():
    rng = np.random.default_rng(0)
    real, real_y = rng.normal(size=(40, 5)), np.repeat([0, 1], 20)
    syn = {"mgd3": (rng.normal(size=(6, 5)), np.repeat([0, 1], 3)),
           "unguided": (rng.normal(size=(6, 5)), np.repeat([0, 1], 3))}
    t = tsne_table(real, real_y, syn, classes=[1], max_real=10)
    assert set(t["class"]) == {1}
    assert t.groupby("method").size().to_dict() == {"mgd3": 3, "real": 10, "unguided": 3}


# ---------------------------------------------------------------- DD-Ranking
def test_dd_ranking_scalar_formulas():
    assert hard_label_recovery(98.0, 90.5) == pytest.approx(7.5)
    assert improvement_over_random(92.0, 94.5) == pytest.approx(-2.5)
    e = math.e
    assert label_robust_score(0.0, 0.0) == pytest.approx(100 * (1 - 1 / e) / (e - 1 / e))  # 26.9 %
    assert label_robust_score(0.0, 100.0, weight=1.0) == pytest.approx(100.0)
    assert label_robust_score(100.0, 0.0, weight=0.0) == pytest.approx(0.0, abs=1e-12)
    # alpha = 0.5 * 0.1 - 0.5 * 0.04 = 0.03
    assert label_robust_score(4.0, 10.0) == pytest.approx(100 * (math.exp(0.03) - 1 / e) / (e - 1 / e))


def test_dd_ranking_table_uses_seed_means_and_references():
    rows = []
    for seed, (full, rnd, mgd) in enumerate([(98, 90, 93), (99, 92, 95)]):
        base = {"ipc": 10, "student": "convnet", "protocol": "hard", "gen_seed": seed, "train_seed": 0}
        rows += [{**base, "method": "full_data", "ipc": np.nan, "final_acc": full},
                 {**base, "method": "random_real", "final_acc": rnd},
                 {**base, "method": "mgd3", "final_acc": mgd}]
    scores = dd_ranking_scores(pd.DataFrame(rows)).set_index("method")
    assert "full_data" not in scores.index
    assert scores.loc["mgd3", "hlr"] == pytest.approx(98.5 - 94.0)
    assert scores.loc["mgd3", "ior"] == pytest.approx(94.0 - 91.0)
    assert scores.loc["random_real", "ior"] == pytest.approx(0.0)
    assert scores.loc["mgd3", "lrs"] == pytest.approx(label_robust_score(4.5, 3.0))


# ---------------------------------------------------------------- aggregation
def test_aggregate_mean_sample_std_and_count():
    df = pd.DataFrame({"method": ["a"] * 4 + ["b"], "ipc": [10] * 4 + [np.nan], "acc": [1.0, 2.0, 3.0, 4.0, 7.0]})
    out = aggregate(df, ["method", "ipc"]).set_index("method")
    assert out.loc["a", "mean"] == pytest.approx(2.5)
    assert out.loc["a", "std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))  # 1.291, not 1.118
    assert out.loc["a", "n"] == 4
    # a single run: std 0, and the NaN-keyed group is kept
    assert (out.loc["b", "mean"], out.loc["b", "std"], out.loc["b", "n"]) == (7.0, 0.0, 1)
    with pytest.raises(KeyError, match="final_acc"):
        aggregate(df, ["method"], value="final_acc")
