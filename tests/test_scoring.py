import numpy as np
import pytest
from scipy.stats import pearsonr

from blobenc.scoring import noise_normalized_accuracy, pearson_r, r2_score


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(50, 20))
    p = t * rng.uniform(-1, 1, 20) + rng.normal(size=(50, 20))
    expected = [pearsonr(p[:, j], t[:, j])[0] for j in range(20)]
    np.testing.assert_allclose(pearson_r(p, t), expected, rtol=1e-10)


def test_constant_column_scores_zero():
    t = np.arange(12.0).reshape(6, 2)
    p = np.ones((6, 2))
    np.testing.assert_array_equal(pearson_r(p, t), [0, 0])


def test_r2_by_hand():
    t = np.array([[1.0], [2.0], [3.0], [4.0]])
    p = np.array([[1.5], [2.0], [2.5], [4.0]])
    # SSE = 0.25 + 0 + 0.25 + 0 = 0.5; SST = 5
    np.testing.assert_allclose(r2_score(p, t), [1 - 0.5 / 5])


def test_noise_normalized_by_hand():
    r = np.array([0.5, -0.3, 0.9, 0.2, 0.1])
    nc = np.array([0.5, 0.4, 0.5, 0.0, 0.01])
    # 0.25/0.5*100 = 50; negative r clips to 0; 0.81/0.5*100 = 162 -> 100;
    # zero ceiling -> 1e-14 -> 100; 0.01/0.01*100 = 100
    np.testing.assert_allclose(noise_normalized_accuracy(r, nc), [50, 0, 100, 100, 100])
    assert noise_normalized_accuracy(np.array([0.0]), np.array([0.0]))[0] == pytest.approx(0)
