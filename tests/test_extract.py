import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from blobenc import AlgonautsDataset, CacheError, ModelError
from blobenc.cli import app
from blobenc.features.cache import FeatureCache
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.trunk import LayerCapture, TrunkSpec, create_trunk, resolve_layers

runner = CliRunner()
VIT = TrunkSpec("test_vit", pretrained=False, seed=0)


def images_of(data):
    index = AlgonautsDataset(data).unique_images()
    return index.keys, list(index.paths)


def run_extract(data, out, **kw):
    trunk = kw.pop("trunk", VIT)
    cfg = ExtractConfig(
        trunk=trunk, **{"layers": ("blocks.*",), "batch_size": 8, "num_workers": 0, "chunk_images": 16} | kw
    )
    return extract(*images_of(data), out, cfg, progress=False)


def read_all(path):
    g = zarr.open_group(path, mode="r")
    return {name: g[name][:] for name in g.attrs["layers"]}


def test_vit_store_shapes_dtypes_and_plain_zarr(small_data, tmp_path):
    keys, _ = images_of(small_data)
    summary = run_extract(small_data, tmp_path / "c", layers=("blocks.[02]", "blocks.1"))
    assert summary["images_done"] == len(keys) and summary["chunks_done"] == summary["chunks_total"]
    g = zarr.open_group(tmp_path / "c", mode="r")  # plain zarr, no blobenc
    assert g.attrs["layers"] == ["blocks.0", "blocks.1", "blocks.2"]  # model order, not pattern order
    assert g.attrs["images"] == keys and keys == sorted(keys) and keys[0].startswith("nsd-")
    assert g.attrs["trunk"]["model"] == "test_vit"
    assert set(g.attrs["preprocessing"]) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}
    for name in g.attrs["layers"]:
        a = g[name]
        assert a.shape == (len(keys), 101, 64) and a.dtype == np.float16 and a.chunks[0] == 16
        assert np.isfinite(a[:]).all() and np.abs(a[:].astype(np.float32)).sum() > 0
    assert FeatureCache.open(tmp_path / "c").complete


def test_cnn_store(small_data, tmp_path):
    run_extract(
        small_data, tmp_path / "c", trunk=TrunkSpec("test_resnet", False), layers=("layer[24]",), store_dtype="float32"
    )
    g = zarr.open_group(tmp_path / "c", mode="r")
    assert g["layer2"].shape[1:] == (48, 20, 20) and g["layer4"].shape[1:] == (96, 5, 5)
    assert g["layer2"].dtype == np.float32


def test_features_equal_model_forward(small_data, tmp_path):
    """The cached rows are the trunk's own block outputs on timm's eval transform, in fp16."""
    import timm
    from PIL import Image

    _, paths = images_of(small_data)
    run_extract(small_data, tmp_path / "c", layers=("blocks.2",), device="cpu")  # the reference below is fp32 CPU
    model = create_trunk(VIT)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    x = torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in (0, 17)])
    with torch.inference_mode():
        t = model.patch_embed(x)
        t = model.norm_pre(model.patch_drop(model._pos_embed(t)))
        for blk in model.blocks[:3]:
            t = blk(t)
    cached = zarr.open_group(tmp_path / "c", mode="r")["blocks.2"].oindex[[0, 17]]
    np.testing.assert_allclose(cached.astype(np.float32), t.numpy(), rtol=2e-3, atol=2e-3)


def test_early_stop_equals_full_forward():
    model = create_trunk(VIT)
    x = torch.randn(2, 3, 160, 160)
    layers = resolve_layers(model, ["blocks.1", "blocks.0"])
    early, full = LayerCapture(model, layers), None
    with torch.inference_mode():
        a = early(x)
        early.remove()
        full = LayerCapture(model, layers, stop_early=False)
        b = full(x)
    for n in layers:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_glob_expansion_and_unknown_pattern():
    model = create_trunk(VIT)
    assert resolve_layers(model, ["blocks.[02]", "blocks.1"]) == ["blocks.0", "blocks.1", "blocks.2"]
    n = len(model.blocks)
    assert resolve_layers(model, ["blocks.?.attn"]) == [f"blocks.{i}.attn" for i in range(n)]
    assert resolve_layers(model, ["blocks.*"]) == [f"blocks.{i}" for i in range(n)]  # * stays within a name
    assert "blocks.0.attn.qkv" in resolve_layers(model, ["blocks.**"])  # ** crosses dots
    assert resolve_layers(model, ["blocks.[!0-4]"]) == [f"blocks.{i}" for i in range(5, n)]
    with pytest.raises(ModelError, match=r"--layers 'block.1' matches no module; similar: blocks.1"):
        resolve_layers(model, ["block.1"])


def test_mismatched_resume_refused_and_overwrite(small_data, tmp_path):
    out = tmp_path / "c"
    run_extract(small_data, out, layers=("blocks.0",))
    before = read_all(out)
    with pytest.raises(CacheError, match=r"different layers \(stored \['blocks.0'\], requested \['blocks.1'\]\)"):
        run_extract(small_data, out, layers=("blocks.1",))
    with pytest.raises(CacheError, match="different weights_fingerprint"):
        run_extract(small_data, out, layers=("blocks.0",), trunk=TrunkSpec("test_vit", False, seed=1))
    with pytest.raises(CacheError, match="different dtype"):
        run_extract(small_data, out, layers=("blocks.0",), store_dtype="float32")
    np.testing.assert_array_equal(read_all(out)["blocks.0"], before["blocks.0"])  # nothing lost
    cfg = ExtractConfig(trunk=VIT, layers=("blocks.1",), num_workers=0, chunk_images=16)
    extract(*images_of(small_data), out, cfg, overwrite=True, progress=False)
    assert zarr.open_group(out, mode="r").attrs["layers"] == ["blocks.1"]


def test_refuses_foreign_folder(small_data, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "thesis.tex").write_text("precious")
    with pytest.raises(CacheError, match="not a blobenc feature cache; refusing"):
        run_extract(small_data, tmp_path / "c")
    cfg = ExtractConfig(trunk=VIT, layers=("blocks.0",), num_workers=0)
    with pytest.raises(CacheError, match="refusing"):
        extract(*images_of(small_data), tmp_path / "c", cfg, overwrite=True, progress=False)
    assert (tmp_path / "c" / "thesis.tex").read_text() == "precious"


def test_plan_refuses_beyond_max_memory_or_the_free_disk_before_writing(small_data, tmp_path):
    from blobenc import ResourceError
    from blobenc.plan import MemoryPlan

    out = tmp_path / "cache"
    args = ["extract", str(small_data), "--out", str(out), "--model", "test_vit", "--no-pretrained", "-q"]
    res = runner.invoke(app, [*args, "--layers", "blocks.*", "--max-memory", "100M"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--max-memory 0.10 GB: extract needs ~" in res.output and "--batch-size" in res.output
    assert not out.exists()
    plan = MemoryPlan("extract", {"baseline": 1}, disk=1 << 60)  # an exabyte: more than any disk has free
    with pytest.raises(ResourceError, match=r"cache: extract writes ~1152921504.61 GB, the disk has .* GB free"):
        plan.check_disk(out, "free space")


def test_corrupt_image_keeps_finished_chunks(data_copy, tmp_path):
    _, paths = images_of(data_copy)
    bad = paths[40]  # in chunk 2 (16 images per chunk)
    bad.unlink()  # the image may be a hard link shared by several subjects
    bad.write_bytes(b"not a png")
    with pytest.raises(CacheError, match=rf"{bad.name}: cannot read image"):
        run_extract(data_copy, tmp_path / "c", layers=("blocks.0",))
    cache = FeatureCache.open(tmp_path / "c", allow_incomplete=True)
    assert cache.done_flags().tolist()[:2] == [True, True] and not cache.complete
    with pytest.raises(CacheError, match=r"incomplete \(2/5 chunks\)"):
        FeatureCache.open(tmp_path / "c")
    res = runner.invoke(
        app,
        [
            "extract",
            str(data_copy),
            "--model",
            "test_vit",
            "--no-pretrained",
            "--layers",
            "blocks.0",
            "--out",
            str(tmp_path / "c"),
            "--chunk-images",
            "16",
            "--workers",
            "0",
        ],
    )
    assert res.exit_code == 1 and "cannot read image" in res.output and "Traceback" not in res.output


def test_two_shards_make_complete_store(small_data, tmp_path):
    keys, paths = images_of(small_data)
    cfg = ExtractConfig(trunk=VIT, layers=("blocks.1",), num_workers=0, chunk_images=16)
    first = extract(keys, paths, tmp_path / "s", cfg, shard=(0, 2), progress=False)
    assert not FeatureCache.open(tmp_path / "s", allow_incomplete=True).complete
    second = extract(keys, paths, tmp_path / "s", cfg, shard=(1, 2), progress=False)
    assert first["images_done"] + second["images_done"] == len(keys)
    extract(keys, paths, tmp_path / "whole", cfg, progress=False)
    assert FeatureCache.open(tmp_path / "s").complete
    np.testing.assert_array_equal(read_all(tmp_path / "s")["blocks.1"], read_all(tmp_path / "whole")["blocks.1"])


def test_pooled_and_multiview(small_data, tmp_path):
    cpu = {"device": "cpu"}  # fp32 everywhere: bf16 on a GPU rounds differently per batch shape
    run_extract(small_data, tmp_path / "p", layers=("blocks.0",), pool=2, **cpu)
    run_extract(small_data, tmp_path / "full", layers=("blocks.0",), store_dtype="float32", **cpu)
    pooled = zarr.open_group(tmp_path / "p", mode="r")["blocks.0"][:].astype(np.float32)
    full = zarr.open_group(tmp_path / "full", mode="r")["blocks.0"][:]
    assert pooled.shape[1:] == (1 + 4, 64)
    np.testing.assert_allclose(pooled[:, 0], full[:, 0], atol=2e-3, rtol=2e-3)  # class token kept
    grid = full[:, 1:].reshape(-1, 10, 10, 64)
    np.testing.assert_allclose(pooled[:, 1], grid[:, :5, :5].mean((1, 2)), atol=2e-3, rtol=2e-3)

    run_extract(small_data, tmp_path / "v", layers=("blocks.0",), views=3, crop_scale=0.5, **cpu)
    views = zarr.open_group(tmp_path / "v", mode="r")["blocks.0"][:]
    assert views.shape[1:] == (3, 101, 64)
    np.testing.assert_allclose(views[:, 0].astype(np.float32), full, atol=2e-3, rtol=2e-3)  # view 0 = centre
    assert not np.allclose(views[:, 1], views[:, 2])
    run_extract(small_data, tmp_path / "v2", layers=("blocks.0",), views=3, crop_scale=0.5)
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "v2", mode="r")["blocks.0"][:], views)


def test_float16_overflow_is_an_error(small_data, tmp_path):
    from blobenc.features.trunk import to_store

    with pytest.raises(CacheError, match=r"layer 'x' has values up to 7e\+04, beyond float16's range"):
        to_store("x", torch.tensor([1.0, -7e4]), "float16")
    with pytest.raises(CacheError, match="layer 'x' produced NaN or inf values"):
        to_store("x", torch.tensor([1.0, float("nan")]), "float32")
    assert to_store("x", torch.tensor([7e4]), "float32").dtype == np.float32
    # a trunk whose activations leave float16's range: weights scaled up, given as a weights file
    model = create_trunk(TrunkSpec("test_vit", False))
    save_file(
        {k: v * 1e6 if k.startswith("patch_embed") else v for k, v in model.state_dict().items()},
        tmp_path / "w.safetensors",
    )
    big = TrunkSpec("test_vit", pretrained=False, weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(CacheError, match=r"beyond float16's range .*--store-dtype float32"):
        run_extract(small_data, tmp_path / "c", trunk=big, layers=("blocks.0",))


def test_local_weights_file(small_data, tmp_path):
    model = create_trunk(TrunkSpec("test_vit", False, seed=7))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = {}
    for name in ("w.safetensors", "w.pth"):
        spec = TrunkSpec("test_vit", pretrained=False, weights=str(tmp_path / name), seed=0)  # the file wins
        run_extract(small_data, tmp_path / name.replace(".", "_"), trunk=spec, layers=("blocks.0",))
        out[name] = zarr.open_group(tmp_path / name.replace(".", "_"), mode="r")
    ref = TrunkSpec("test_vit", False, seed=7)
    run_extract(small_data, tmp_path / "ref", trunk=ref, layers=("blocks.0",))
    ref_g = zarr.open_group(tmp_path / "ref", mode="r")
    for g in out.values():
        assert g.attrs["weights_fingerprint"] == ref_g.attrs["weights_fingerprint"]
        np.testing.assert_array_equal(g["blocks.0"][:], ref_g["blocks.0"][:])
    save_file({"nope": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ModelError, match=r"--weights .*bad.safetensors: does not fit 'test_vit'"):
        create_trunk(TrunkSpec("test_vit", False, str(tmp_path / "bad.safetensors")))


def test_info_and_layers_cli(small_data, tmp_path):
    run_extract(small_data, tmp_path / "c", layers=("blocks.0",))
    res = runner.invoke(app, ["info", str(tmp_path / "c"), "--json", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["chunks_done"] == info["chunks_total"] == 5 and info["images"] == 74
    assert info["bytes_per_image"] == 101 * 64 * 2 and info["compression_ratio"] == pytest.approx(1, abs=0.05)
    res = runner.invoke(app, ["layers", "test_vit", "--filter", "blocks.?"])
    assert res.exit_code == 0 and "blocks.3" in res.output and "101 x 64" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "feature cache not found" in res.output


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(small_data, tmp_path):
    args = [
        "--model",
        "vit_tiny_patch16_224",
        "--no-pretrained",
        "--layers",
        "blocks.[03]",
        "--layers",
        "blocks.11",
        "--chunk-images",
        "4",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--quiet",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "blobenc", "extract", str(small_data), "--out", str(tmp_path / "killed"), *args]
    proc = subprocess.Popen(cmd, env=env)
    flags = tmp_path / "killed" / "_chunk_done" / "c"
    deadline = time.time() + 120
    while not (flags.is_dir() and len(list(flags.iterdir())) >= 3) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = FeatureCache.open(tmp_path / "killed", allow_incomplete=True)
    assert 3 <= partial.chunks_done[0] < partial.chunks_done[1]  # really killed mid-way
    subprocess.run(cmd, env=env, check=True)
    subprocess.run([*cmd[: -len(args) - 2], "--out", str(tmp_path / "whole"), *args], env=env, check=True)
    a, b = read_all(tmp_path / "killed"), read_all(tmp_path / "whole")
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()
    assert FeatureCache.open(tmp_path / "killed").complete


def test_pretrained_offline_points_to_weights_and_no_pretrained(small_data, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: the download is refused at once, as on an offline cluster
    res = runner.invoke(
        app, ["extract", str(small_data), "--model", "test_vit", "--layers", "blocks.0", "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "cannot download pretrained weights for 'test_vit'" in res.output
    assert "--weights FILE" in res.output and "--no-pretrained" in res.output
    assert not (tmp_path / "c").exists()  # nothing written before the trunk exists


def test_read_rows_few_rows_by_byte_range_many_by_chunk(small_cache):
    """A few rows of a chunk are read by byte range, most of a chunk through zarr: the same rows
    either way, in the order asked, for every layer; --profile's phases show the route taken."""
    from blobenc.profile import profiling

    cache = FeatureCache.open(small_cache)
    chunk = cache.attrs["chunk_images"]
    n = len(cache.attrs["images"])
    few = np.array([chunk + 3, 1, n - 1, chunk + 2])  # 1-2 rows of three chunks: byte ranges
    most = np.arange(chunk)[::-1]  # a whole chunk, backwards: zarr
    for rows, byte_range, whole in ((few, 3, 0), (most, 0, 1)):
        with profiling() as prof:
            for layer in cache.layers:
                arr = zarr.open_group(small_cache, mode="r")[layer]
                got = np.empty((len(rows), *arr.shape[1:]), arr.dtype)
                for positions, block in cache.read_rows(layer, rows):
                    got[positions] = block
                np.testing.assert_array_equal(got, arr[:][rows])
        calls = {name: p.calls for name, p in prof.phases.items()}
        assert calls.get("read by byte range", 0) == byte_range * len(cache.layers)
        assert calls.get("read whole chunk", 0) == whole * len(cache.layers)  # byte ranges never fell back


@pytest.mark.slow
def test_torchrun_extract_fills_one_store_equal_to_one_process(small_data, tmp_path, torchrun):
    """2 ranks each fill their chunk range of one store: the same rows as one process, every chunk
    flagged complete."""
    args = ["extract", str(small_data), "--model", "test_vit", "--no-pretrained", "--layers", "blocks.[13]"]
    args += ["--chunk-images", "8", "--device", "cpu", "--workers", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    alone = subprocess.run([sys.executable, "-m", "blobenc", *args, "-q", "--out", str(tmp_path / "alone")], env=env)
    assert alone.returncode == 0
    ranks = torchrun(*args, "--out", str(tmp_path / "ranks"), port=29520)
    one, two = FeatureCache.open(tmp_path / "alone"), FeatureCache.open(tmp_path / "ranks")
    log = ranks.stdout + ranks.stderr
    done = [int(n) for n in re.findall(r"extracting (\d+) images \(\d+ chunks of 8\)", log)]
    assert len(done) == 2 and sum(done) == len(one.keys), log[-2000:]  # each rank its half
    assert two.complete
    for layer in one.layers:
        np.testing.assert_array_equal(two.array(layer)[:], one.array(layer)[:])
