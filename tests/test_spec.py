"""The typed specs: FeatureSpec (a cache's and every run's features) and ModelSpec (model.json)."""

import dataclasses
import json

import pytest

from blobenc import CacheError, ModelError
from blobenc.features.cache import FeatureCache
from blobenc.train.checkpoint import MODEL_VERSION, ModelSpec


def test_feature_spec_lists_every_difference(small_cache):
    spec = FeatureCache.open(small_cache).feature_spec()
    assert spec.differences(spec, spec.layer_shapes) == []
    pooled = dataclasses.replace(spec, pool=2, layer_shapes={n: [5, 64] for n in spec.layer_shapes})
    diff = pooled.differences(spec, ["blocks.1"])
    assert diff == ["pool 2 vs None", "layer blocks.1 shape [5, 64] vs [101, 64]"]
    with pytest.raises(CacheError, match="X: not the features the run was trained on: pool 2 vs None; layer"):
        pooled.check_serves(spec, ["blocks.1"], "X")
    with pytest.raises(CacheError, match="X: no layer 'blocks.9'; the run needs blocks.1, blocks.9"):
        spec.check_serves(spec, ["blocks.1", "blocks.9"], "X")
    other = dataclasses.replace(spec, weights_fingerprint="0" * 32)
    with pytest.raises(CacheError, match="X: made with other trunk weights"):
        other.check_serves(spec, ["blocks.1"], "X")


def test_model_spec_round_trip_versions_and_older_files(small_cache, tmp_path):
    features = FeatureCache.open(small_cache).feature_spec()
    spec = ModelSpec(kind="head", subjects=["subj01"], layers=["blocks.1"], features=features, head="group_linear",
                     kwargs={"hidden_dim": 8}, pca="pca.safetensors")  # fmt: skip
    spec.write(tmp_path / "model.json")
    written = json.loads((tmp_path / "model.json").read_text())
    assert written["version"] == MODEL_VERSION and written["kind"] == "head" and "finetuned" not in written
    assert ModelSpec.read(tmp_path / "model.json") == spec
    assert spec.pca_path(tmp_path) == tmp_path / "pca.safetensors"
    older = {k: v for k, v in written.items() if k not in ("version", "kind")}  # a fit-head run before versions
    assert ModelSpec.from_dict(older, "old") == spec
    with pytest.raises(ModelError, match=f"new: model format version {MODEL_VERSION + 1}; this blobenc reads up to"):
        ModelSpec.from_dict(written | {"version": MODEL_VERSION + 1}, "new")
    with pytest.raises(ModelError, match="bad: no 'kwargs'"):
        ModelSpec.from_dict({k: v for k, v in written.items() if k != "kwargs"}, "bad")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ModelError, match="broken.json: not valid JSON"):
        ModelSpec.read(tmp_path / "broken.json")


def test_run_spec_round_trip_and_refusals(tmp_path):
    from blobenc import ConfigError
    from blobenc.train.checkpoint import RunSpec

    spec = RunSpec(kind="finetune", data="ROOT", configs=[{"lr": 1e-5}], source="RUN")
    spec.write(tmp_path / "run.json")
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["from"] == "RUN" and "source" not in written and written["version"] == MODEL_VERSION
    assert RunSpec.read(tmp_path / "run.json") == spec
    (tmp_path / "run.json").write_text(json.dumps(written | {"version": MODEL_VERSION + 1}))
    with pytest.raises(ConfigError, match="run.json: run format version"):
        RunSpec.read(tmp_path / "run.json")
    (tmp_path / "run.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="run.json: not a blobenc run.json"):
        RunSpec.read(tmp_path / "run.json")
