"""The group PCA: against scikit-learn, with missing vertices, saved and loaded."""

import numpy as np
from sklearn.decomposition import PCA

from blobenc import AlgonautsDataset
from blobenc.pca import GroupPCA


def test_pca_matches_sklearn_and_torch_agrees():
    rng = np.random.default_rng(0)
    Y = (rng.normal(size=(200, 8)) @ rng.normal(size=(8, 60)) + 0.1 * rng.normal(size=(200, 60))).astype(np.float32)
    ours = GroupPCA(8, backend="sklearn").fit(Y)
    ref = PCA(8, svd_solver="full").fit(Y)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(np.abs(ours.components_ @ ref.components_.T), np.eye(8), atol=1e-4)
    torch_pca = GroupPCA(8, backend="torch").fit(Y)
    np.testing.assert_allclose(torch_pca.explained_variance_, ref.explained_variance_, rtol=1e-3)
    np.testing.assert_allclose(
        torch_pca.inverse_transform(torch_pca.transform(Y)), ours.inverse_transform(ours.transform(Y)), atol=1e-3
    )


def test_pca_missing_vertices_are_not_zeros():
    rng = np.random.default_rng(1)
    Y = (rng.normal(size=(300, 3)) @ rng.normal(size=(3, 40)) + 5).astype(np.float32)
    mask = np.ones_like(Y, dtype=bool)
    mask[:150, 30:] = False  # half the samples (one "subject") lack the last 10 vertices
    observed = np.where(mask, Y, 0)
    em = GroupPCA(3, n_iter=10).fit(observed, mask)
    zeros = GroupPCA(3, n_iter=0).fit(observed)  # what treating missing as zero responses would give
    complete = GroupPCA(3).fit(Y)
    assert np.abs(em.mean_ - complete.mean_).max() < 1e-2
    assert np.abs(zeros.mean_ - complete.mean_).max() > 1
    # the EM components span the true subspace
    proj = em.components_ @ complete.components_.T
    np.testing.assert_allclose(np.linalg.svd(proj, compute_uv=False), 1, atol=1e-2)
    # in place (what fit-head does with its temporary targets): the same fit, Y's gaps imputed
    work = observed.copy()
    in_place = GroupPCA(3, n_iter=10).fit(work, mask, copy=False)
    np.testing.assert_array_equal(in_place.components_, em.components_)
    assert np.abs(work[:150, 30:] - Y[:150, 30:]).max() < 0.1 and (work[mask] == observed[mask]).all()


def test_pca_save_load(small_data, tmp_path):
    ds = AlgonautsDataset(small_data)
    Y = np.random.default_rng(0).normal(size=(20, ds.group.n_vertices)).astype(np.float32)
    pca = GroupPCA(5).fit(Y)
    pca.group = ds.group
    pca.save(tmp_path / "p.safetensors")
    back = GroupPCA.load(tmp_path / "p.safetensors")
    np.testing.assert_array_equal(back.components_, pca.components_)
    assert back.group.same_as(ds.group)
