import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from blobenc import AlgonautsDataset, ModelError
from blobenc.cli import app
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.trunk import TrunkSpec
from blobenc.train.checkpoint import ModelSpec
from blobenc.train.config import FinetuneConfig, HeadConfig
from blobenc.train.finetune import build_encoder, finetune, set_trainable
from blobenc.train.fit import fit_head

runner = CliRunner()


@pytest.fixture(scope="session")
def head_run(tmp_path_factory):
    """A fit-head run on a random-init test_vit cache of an 8-subject dataset."""
    from blobenc.data.synth import SynthConfig, write_synthetic

    root = tmp_path_factory.mktemp("ft")
    data = write_synthetic(
        root / "data", SynthConfig(subjects=8, train_images=24, test_images=6, image_size=32, seed=5)
    )
    index = AlgonautsDataset(data).unique_images()
    cfg = ExtractConfig(trunk=TrunkSpec("test_vit", False, seed=3), layers=("blocks.[13]",), num_workers=0)
    extract(index.keys, list(index.paths), root / "cache", cfg, progress=False)
    head = HeadConfig(epochs=4, batch_size=32, hidden_dim=32, proj_dim=40, lr=3e-3, dropout=0.2)
    fit_head(root / "cache", data, root / "run", [head], progress=False)
    return data, root / "run"


def tiny(**kw):
    return FinetuneConfig(**({"epochs": 1, "batch_size": 32, "lr": 1e-3, "num_workers": 0, "accumulate": 2} | kw))


def test_only_attention_blocks_and_head_change(head_run, tmp_path):
    data, run = head_run
    spec = ModelSpec.read(run / "model.json")
    before_trunk = build_encoder(spec).trunk.state_dict()
    before_head = load_file(run / "best.safetensors")
    summary = finetune(run, data, tmp_path / "ft", tiny(), progress=False)
    assert summary["trainable_parameters"] > 0
    after = load_file(tmp_path / "ft" / "last.safetensors")
    changed = {k for k, v in before_trunk.items() if not torch.equal(v, after[f"trunk.{k}"])}
    assert changed and all(".attn." in k and "norm" not in k for k in changed)
    frozen = [
        k
        for k in before_trunk
        if k.startswith(("patch_embed", "pos_embed", "cls_token", "norm."))
        or ".mlp." in k
        or ".norm1" in k
        or ".norm2" in k
    ]
    assert frozen and not changed & set(frozen)  # every frozen parameter bit-identical
    head_changed = {k for k, v in before_head.items() if not torch.equal(v, after[f"head.{k}"])}
    assert "shared_proj.weight" in head_changed
    # the frozen PCA embedding is in no checkpoint: the finetune run holds its own copy of the PCA, once
    assert not any("embed." in k for k in before_head) and "head.embed.weight" not in after
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["pca"] == "pca.safetensors"
    assert (tmp_path / "ft" / "pca.safetensors").read_bytes() == (run / "pca.safetensors").read_bytes()
    from blobenc.run import load_run

    head = load_run(run).module
    tuned = load_run(tmp_path / "ft", which="last").module
    torch.testing.assert_close(tuned.head.embed.weight, head.embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(tuned.head.embed.bias, head.embed.bias, rtol=0, atol=0)


def test_freeze_patterns_and_bad_pattern(head_run):
    _, run = head_run
    encoder = build_encoder(ModelSpec.read(run / "model.json"))
    n_attn = set_trainable(encoder, ("blocks.*.attn.**",), ("**norm**",))
    n_more = set_trainable(encoder, ("blocks.*.attn.**", "blocks.*.mlp.**"), ())
    assert n_more > n_attn
    with pytest.raises(ModelError, match=r"'blocks.\*.atn.\*\*' matches no trunk parameter"):
        set_trainable(encoder, ("blocks.*.atn.**",), ())


def test_finetune_cli_predict_round_trip_and_scores(head_run, tmp_path):
    data, run = head_run
    res = runner.invoke(
        app,
        [
            "finetune",
            str(run),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "ft"),
            "--set",
            "epochs=1",
            "--set",
            "batch_size=32",
            "--set",
            "num_workers=0",
            "--set",
            "lr=1e-4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "trainable parameters" in res.output
    ds = AlgonautsDataset(data)
    scores = {}
    for name, src in (("head", run), ("ft", tmp_path / "ft"), ("ft2", tmp_path / "ft")):
        res = runner.invoke(
            app,
            [
                "predict",
                str(src),
                "--data",
                str(data),
                "--out",
                str(tmp_path / f"p-{name}"),
                "--json",
                str(tmp_path / f"{name}.json"),
            ],
        )
        assert res.exit_code == 0, res.output
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["score"]
    for s in ds.subjects.values():  # native shapes, subjects 6 and 8 (fewer vertices) included
        for hemi in ("lh", "rh"):
            a = np.load(tmp_path / "p-ft" / s.name / f"{hemi}_pred_test.npy")
            assert a.shape == (6, s.n_vertices[hemi]) and a.dtype == np.float32
            np.testing.assert_array_equal(a, np.load(tmp_path / "p-ft2" / s.name / f"{hemi}_pred_test.npy"))
    assert ds.subjects["subj06"].n_vertices_total < ds.subjects["subj01"].n_vertices_total
    # a mean-response predictor has r = 0 everywhere, so a score of 0: both runs beat it clearly
    assert scores["head"] > 5 and scores["ft"] > 5


def test_finetune_refuses_other_trunk_weights(head_run, tmp_path):
    _data, run = head_run
    spec = ModelSpec.read(run / "model.json")
    spec.features = dataclasses.replace(spec.features, weights_fingerprint="0" * 32)
    with pytest.raises(ModelError, match="does not match the weights the features were made with"):
        build_encoder(spec)


def test_finetune_refuses_a_plan_beyond_max_memory_before_reading_images(head_run, tmp_path):
    data, run = head_run
    out = tmp_path / "ft"
    res = runner.invoke(app, ["finetune", str(run), "--data", str(data), "--out", str(out), "--max-memory", "100M"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--max-memory 0.10 GB: finetune needs ~" in res.output and "accumulate" in res.output
    assert not out.exists()  # no folder, no log, no split: a rerun may use --out


def test_grad_checkpointing_trains_the_same(head_run, tmp_path):
    data, run = head_run
    cpu = {"accumulate": 1, "device": "cpu"}  # fp32: bf16 fused attention on a GPU is not bitwise repeatable
    finetune(run, data, tmp_path / "plain", tiny(**cpu), progress=False)
    finetune(run, data, tmp_path / "ckpt", tiny(**cpu, grad_checkpointing=True), progress=False)
    a, b = load_file(tmp_path / "plain/last.safetensors"), load_file(tmp_path / "ckpt/last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cnn_default_trains_its_deepest_cached_stage_and_never_loses_to_phase_1(small_data, tmp_path):
    """A convolutional trunk has no attention blocks: the default unfreezes the deepest cached layer's
    module, its batch norms keep their parameters and running statistics, and phase 2 keeps phase 1's
    weights unless an epoch validates better."""
    index = AlgonautsDataset(small_data).unique_images()
    cfg = ExtractConfig(trunk=TrunkSpec("test_efficientnet", False, seed=1), layers=("blocks.[24]",), num_workers=0)
    extract(index.keys, list(index.paths), tmp_path / "cache", cfg, progress=False)
    head = HeadConfig(epochs=2, batch_size=32, hidden_dim=16, proj_dim=16, lr=3e-3)
    fit_head(tmp_path / "cache", small_data, tmp_path / "run", [head], progress=False)
    spec = ModelSpec.read(tmp_path / "run" / "model.json")
    before = build_encoder(spec).trunk.state_dict()
    summary = finetune(tmp_path / "run", small_data, tmp_path / "ft", tiny(lr=1e-2), progress=False)
    ft_spec = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert ft_spec["finetune"]["unfreeze"] == ["blocks.4.**"]
    after = load_file(tmp_path / "ft" / "last.safetensors")
    changed = {k for k, v in before.items() if not torch.equal(v, after[f"trunk.{k}"])}
    assert changed and all(k.startswith("blocks.4.") and ".bn" not in k for k in changed)
    start = json.loads((tmp_path / "run" / "summary.json").read_text())["val"]["median_r2"]
    # validated again on the same images (from the trunk in float32, not the float16 cache: ~1e-5 apart)
    assert summary["val"]["median_r2"] >= start - 1e-4
