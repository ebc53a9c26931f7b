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


def test_pooled_r2_by_hand():
    """Each group vertex's R² pools every validation sample whose subject has it; a vertex a
    subject lacks ignores that subject's rows, whatever they hold."""
    from blobenc.scoring import observed_mask, pooled_r2, validation_scores

    subject = np.array([0, 0, 1, 1])
    group_index = {"a": np.array([0, 1, 2]), "b": np.array([0, 1])}  # b lacks vertex 2
    target = np.array([[1.0, 2, 5], [3, 2, 7], [2, 6, 0], [4, 4, 0]])
    pred = np.array([[1.5, 2, 6], [2.5, 3, 6], [2, 5, -50], [4, 5, 100]])
    observed = observed_mask(subject, ["a", "b"], group_index, 3)
    # vertex 0: mean 2.5, SST 2.25+0.25+0.25+2.25 = 5, SSE 0.25+0.25 = 0.5 -> 0.9
    # vertex 1: mean 3.5, SST 2.25+2.25+6.25+0.25 = 11, SSE 0+1+1+1 = 3 -> 8/11
    # vertex 2: subject a's rows only: mean 6, SST 1+1 = 2, SSE 1+1 = 2 -> 0
    np.testing.assert_allclose(pooled_r2(pred, target, observed), [0.9, 8 / 11, 0.0])
    scores = validation_scores(pred, target, subject, ["a", "b"], group_index, 3)
    assert scores["median_r2"] == pytest.approx(8 / 11)
    one = observed.copy()
    one[1, 2] = False  # a vertex seen in one sample has no R²
    assert np.isnan(pooled_r2(pred, target, one)[2])
