"""Importing the reference release (its head checkpoint and group PCA) as a run."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from blobenc import AlgonautsDataset
from blobenc.cli import app
from blobenc.features.trunk import TrunkSpec

runner = CliRunner()


def _reference_files(tmp_path, n_vertices, layer_shape, n_layers=2, k=16, p=12, n_subjects=8):
    g = torch.Generator().manual_seed(0)
    enc = {}
    for i in range(n_layers):
        enc[f"feat_projs.{i}.proj.weight1"] = torch.randn(k, layer_shape[0], generator=g) / layer_shape[0]
        enc[f"feat_projs.{i}.proj.weight2"] = torch.randn(k, layer_shape[1], generator=g) / 8
        enc[f"feat_projs.{i}.norm.weight"] = torch.rand(k, generator=g) + 0.5
        enc[f"feat_projs.{i}.norm.bias"] = torch.randn(k, generator=g)
        enc[f"feat_projs.{i}.norm.running_mean"] = torch.randn(k, generator=g)
        enc[f"feat_projs.{i}.norm.running_var"] = torch.rand(k, generator=g) + 0.5
        enc[f"feat_projs.{i}.norm.num_batches_tracked"] = torch.tensor(100)
    enc["shared_proj.weight"] = torch.randn(p, k, generator=g)
    enc["subj_proj.fc.weight"] = torch.randn(n_subjects * p, k, generator=g)
    enc["subj_proj.fc.bias"] = torch.randn(n_subjects * p, generator=g)
    enc["embed.weight"] = torch.randn(n_vertices, p, generator=g)
    enc["embed.bias"] = torch.randn(n_vertices, generator=g)
    torch.save({"epoch": 39, "metric": 0.204, "trunk": None, "encoder": enc}, tmp_path / "ckpt.pt")
    torch.save({"weight": enc["embed.weight"], "bias": enc["embed.bias"]}, tmp_path / "pca.pt")
    return enc


def test_import_reference_reproduces_formula(small_cache, train_data, tmp_path):
    from blobenc.features.cache import FeatureCache
    from blobenc.reference import reference_formula
    from blobenc.run import load_run

    ds = AlgonautsDataset(train_data)
    enc = _reference_files(tmp_path, ds.group.n_vertices, (101, 64))
    res = runner.invoke(
        app,
        [
            "import-reference",
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
            "--pca",
            str(tmp_path / "pca.pt"),
            "--cache",
            str(small_cache),
            "--out",
            str(tmp_path / "ref"),
        ],
    )
    assert res.exit_code == 0, res.output
    loaded = load_run(tmp_path / "ref")
    model, spec = loaded.module, loaded.spec
    cache = FeatureCache.open(small_cache)
    feats = [cache.array(n)[:5].astype(np.float32) for n in spec.layers]
    expected = reference_formula({k: v.numpy() for k, v in enc.items()}, feats, subject=5)
    with torch.no_grad():
        got = model([torch.from_numpy(f) for f in feats], torch.full((5,), 5)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())
    # and predict runs on it, in each subject's native space
    res = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "ref"),
            "--data",
            str(train_data),
            "--subject",
            "subj02",
            "--out",
            str(tmp_path / "pred"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "pred/subj02/lh_pred_test.npy").shape == (10, ds.subjects["subj02"].n_vertices["lh"])


def test_import_reference_phase2_checkpoint_carries_its_trunk(small_cache, train_data, tmp_path):
    from PIL import Image

    from blobenc import ModelError
    from blobenc.features.cache import FeatureCache
    from blobenc.features.trunk import LayerCapture, create_trunk, eval_transform
    from blobenc.reference import import_reference, reference_formula
    from blobenc.run import load_run

    ds = AlgonautsDataset(train_data)
    enc = _reference_files(tmp_path, ds.group.n_vertices, (101, 64))
    cache = FeatureCache.open(small_cache)
    trunk = create_trunk(TrunkSpec(**cache.attrs["trunk"]))
    g = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in trunk.state_dict().items()}
    torch.save({"epoch": 5, "metric": 0.209, "trunk": tuned, "encoder": enc}, tmp_path / "phase2.pt")
    import_reference(tmp_path / "phase2.pt", tmp_path / "pca.pt", small_cache, tmp_path / "ref2")
    loaded = load_run(tmp_path / "ref2")
    model, spec = loaded.module, loaded.spec
    assert spec.finetuned

    trunk.load_state_dict(tuned)  # the reference: its fine-tuned trunk's features, then the formula
    paths = ds.subjects["subj01"].images["test"][:3]
    x = torch.stack([eval_transform(cache.attrs["preprocessing"])(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        feats = LayerCapture(trunk, spec.layers)(x)
        got = model([x], torch.full((3,), 2)).numpy()
    expected = reference_formula(
        {k: v.numpy() for k, v in enc.items()}, [feats[n].numpy() for n in spec.layers], subject=2
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())

    torch.save({"trunk": {"head.weight": torch.zeros(2)}, "encoder": enc}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="other.pt: its trunk does not fit test_vit"):
        import_reference(tmp_path / "other.pt", tmp_path / "pca.pt", small_cache, tmp_path / "ref3")


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_import_reference_refuses_pickled_code(small_cache, tmp_path):
    from blobenc import ModelError
    from blobenc.reference import import_reference

    torch.save({"encoder": _Payload()}, tmp_path / "evil.pt")
    torch.save({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, tmp_path / "pca.pt")
    with pytest.raises(ModelError, match="evil.pt: not a torch weights file"):
        import_reference(tmp_path / "evil.pt", tmp_path / "pca.pt", small_cache, tmp_path / "out")
