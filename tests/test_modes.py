"""Mode discovery as an estimator, and the closest-real selection."""

import numpy as np
import pytest

from mgd3_core.modes import ModeDiscoveryError, ModeFinder, closest_real_indices


def _blobs(k=4, n_per=30, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d))
    x = np.concatenate([c + rng.normal(0, 0.5, (n_per + 5 * i, d)) for i, c in enumerate(centres)])
    return x.reshape(len(x), 2, 2, 2), centres


@pytest.mark.parametrize("method", ["kmeans", "gmm", "bisecting_kmeans"])
def test_mode_finder_recovers_separated_modes(method):
    x, centres = _blobs()
    f = ModeFinder(4, method, random_state=0).fit(x)
    assert f.centroids_.shape == (4, 8)
    assert f.labels_.shape == (len(x),)
    assert f.counts_.sum() == len(x) and list(f.counts_) == sorted(f.counts_, reverse=True)
    # Every true centre has a centroid within the blob's noise.
    d = np.linalg.norm(centres[:, None] - f.centroids_[None], axis=2)
    assert (d.min(1) < 1.0).all()
    # Counts, labels and inertia are consistent with each other.
    assert np.array_equal(np.bincount(f.labels_, minlength=4), f.counts_)
    flat = x.reshape(len(x), -1)
    assert f.inertia_ == pytest.approx(((flat - f.centroids_[f.labels_]) ** 2).sum(), rel=1e-4)


def test_fit_returns_self_and_is_seeded():
    x, _ = _blobs(k=6, n_per=10)
    a = ModeFinder(5, random_state=3)
    assert a.fit(x) is a
    b = ModeFinder(5, random_state=3).fit(x)
    # The same seed picks the same initial centres and the same clusters ...
    assert np.array_equal(a.labels_, b.labels_) and np.array_equal(a.counts_, b.counts_)
    # ... but k-means sums each cluster in per-thread chunks (OpenMP), so the float32
    # centroids of two fits agree to float32 rounding, not bit for bit: rtol 1e-5, atol 1e-6.
    np.testing.assert_allclose(a.centroids_, b.centroids_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["kmeans", "gmm", "bisecting_kmeans"])
def test_mode_finder_is_a_scikit_learn_clusterer_whose_predict_gives_the_nearest_mode(method):
    from sklearn.base import ClusterMixin, clone

    x, _ = _blobs()
    f = ModeFinder(4, method, n_init=2, random_state=5, class_name="7")
    assert isinstance(f, ClusterMixin)
    assert clone(f).get_params() == f.get_params() == {
        "n_modes": 4, "method": method, "n_init": 2, "max_iter": 300, "random_state": 5, "class_name": "7"}
    labels = f.fit_predict(x)  # ClusterMixin: fit, then the training labels
    assert f.cluster_centers_ is f.centroids_
    # Well-separated blobs: every training latent's nearest centre is the mode it was assigned.
    assert np.array_equal(f.predict(x), labels)
    # predict on new points: the nearest centre by L2 distance in flattened latent space.
    probe = f.cluster_centers_[[2, 0, 3]] + 0.01
    assert f.predict(probe.reshape(3, 2, 2, 2)).tolist() == [2, 0, 3]
    # The pipeline restores a fit from the stored modes file (centres, counts) to assign latents.
    restored = ModeFinder.restored(f.cluster_centers_, f.counts_)
    assert np.array_equal(restored.predict(x), labels) and restored.n_modes == 4


def test_closest_real_is_distinct_and_nearest():
    x, _ = _blobs()
    f = ModeFinder(4).fit(x)
    idx = f.closest_real(x)
    assert len(set(idx.tolist())) == 4
    flat = x.reshape(len(x), -1)
    for i, j in enumerate(idx):
        d = np.linalg.norm(flat - f.centroids_[i], axis=1)
        assert d[j] == pytest.approx(d.min(), rel=1e-6)
    # Two centroids at the same place still get two different images.
    dup = np.stack([flat[0], flat[0]])
    assert len(set(closest_real_indices(x, dup).tolist())) == 2


def test_errors_name_the_class_and_numbers():
    x, _ = _blobs(k=2, n_per=3)
    with pytest.raises(ModeDiscoveryError, match=r"class 'seven'.*IPC 50.*\b(6|11)\b"):
        ModeFinder(50, class_name="seven").fit(x)
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ModeDiscoveryError, match="NaN"):
        ModeFinder(2, class_name="3").fit(bad)
    with pytest.raises(ModeDiscoveryError, match="no latents"):
        ModeFinder(2).fit(np.zeros((0, 4)))
