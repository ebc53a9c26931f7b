"""`blobenc predict`: a subject's predictions in its own vertex space, from a fit-head run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from blobenc.data.base import open_dataset, verify_images
from blobenc.distributed import barrier, broadcast_object, gather_objects, init_from_env, is_main, my_share
from blobenc.errors import CacheError, ConfigError, ModelError
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.predictions import score_subject
from blobenc.profile import phase, timed
from blobenc.progress import track
from blobenc.run import group_of, load_model
from blobenc.runtime import autocast, resolve_device, resolve_precision

logger = logging.getLogger(__name__)


class FeatureSource:
    """Layer features for image keys: cache rows where the cache has them, the trunk for the rest."""

    def __init__(self, spec: dict, cache_path: Path | None, device: torch.device, amp):
        from blobenc.features.cache import FeatureCache

        self.spec, self.device, self.amp = spec, device, amp
        self.layers = spec["layers"]
        self.cache = None
        path = cache_path or spec.get("cache")
        if path is not None and Path(path).exists():
            cache = FeatureCache.open(path)
            if cache.attrs["weights_fingerprint"] != spec["features"]["weights_fingerprint"]:
                raise CacheError(f"{path}: made with other trunk weights than the run was trained on")
            check_cache_fits(cache, spec)
            self.cache = cache
        self._trunk = None

    @timed("trunk")
    def _trunk_features(self, paths: list[Path], batch_size: int) -> list[np.ndarray]:
        from blobenc.features.images import ImageViews
        from blobenc.features.trunk import LayerCapture, TrunkSpec, create_trunk, eval_transform, pool_features
        from blobenc.features.trunk import weights_fingerprint as fingerprint

        feats = self.spec["features"]
        if self._trunk is None:
            trunk = create_trunk(TrunkSpec(**feats["trunk"]))
            if fingerprint(trunk) != feats["weights_fingerprint"]:
                raise ModelError(
                    f"the rebuilt trunk {feats['model']} does not match the weights the run was "
                    "trained on (fingerprint differs); give --cache or the same --weights"
                )
            self._trunk = trunk.to(self.device)
        prep = feats["preprocessing"]
        ds = ImageViews(paths, range(len(paths)), eval_transform(prep), prep["input_size"])
        capture = LayerCapture(self._trunk, self.layers)
        out: list[list[np.ndarray]] = [[] for _ in self.layers]
        try:
            with torch.inference_mode():
                for _, x, errs in DataLoader(ds, batch_size=batch_size):
                    bad = [e for e in errs if e]
                    if bad:
                        raise CacheError(bad[0])
                    with autocast(self.device, self.amp):
                        got = capture(x.flatten(0, 1).to(self.device))
                    for j, name in enumerate(self.layers):
                        f = got[name]
                        if feats["pool"]:
                            f = pool_features(f, feats["pool"], feats["num_prefix_tokens"])
                        # the head was trained on the cache's dtype: round the same way
                        out[j].append(f.to(getattr(torch, feats["dtype"])).cpu().numpy())
        finally:
            capture.remove()
        return [np.concatenate(o) for o in out]

    @timed("features")
    def features(self, keys: list[str], paths: list[Path], batch_size: int) -> list[torch.Tensor]:
        n = len(keys)
        result = None
        in_cache = np.zeros(n, bool)
        if self.cache is not None:
            rows = np.asarray([self.cache.row_of.get(k, -1) for k in keys])
            in_cache = rows >= 0
            if in_cache.any():
                at = np.flatnonzero(in_cache)
                result = []
                for name in self.layers:  # each chunk touched, read once
                    out = None
                    for positions, block in self.cache.read_rows(name, rows[at], view=0):
                        if out is None:
                            out = np.empty((n, *block.shape[1:]), block.dtype)
                        out[at[positions]] = block
                    result.append(out)
        if (~in_cache).any():
            missing = np.flatnonzero(~in_cache)
            logger.info("running the trunk on %d images not in the cache", len(missing))
            computed = self._trunk_features([paths[i] for i in missing], batch_size)
            if result is None:
                result = [np.empty((n, *c.shape[1:]), c.dtype) for c in computed]
            for r, c in zip(result, computed, strict=True):
                r[missing] = c
        return [torch.from_numpy(r) for r in result]


def predict(
    run: Path | str,
    data_root: Path | str,
    out: Path | str,
    subjects: str = "all",
    split: str = "test",
    cache: Path | str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    use_cache: bool = True,
    images: Path | str | None = None,
    progress: bool = True,
    max_memory: int | None = None,
    block_images: int = 2048,
) -> dict:
    """Write PRED/subjNN/{lh,rh}_pred_<split>.npy; returns scores per subject where fMRI exist.

    With `images` (any folder of images) it writes PRED/subjNN/{lh,rh}_pred_images.npy instead,
    rows in the order PRED/images.txt lists, for every subject.

    Subjects are predicted `block_images` images at a time; the plan (predict_plan) is logged and
    refused beyond `max_memory` (bytes; None: the memory available) or the disk's free space.

    Under torchrun the subjects are shared over the ranks, each rank writes its own, and rank 0
    moves them into place once all are written and returns the scores; other ranks return None.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"--split {split!r}: expected train or test")
    if block_images < 1:
        raise ConfigError(f"--block-images {block_images}: expected at least 1")
    if images is not None:
        from blobenc.features.images import list_images

        image_keys, image_paths = list_images(Path(images))
        split = "images"
    model, spec = load_model(run)
    dataset = open_dataset(data_root)
    if spec.get("group") is not None:
        if not group_of(spec).same_as(dataset.group):
            raise ConfigError(f"{data_root}: its group vertex space differs from the one the run was trained in")
    elif spec["kwargs"]["n_vertices"] != dataset.group.n_vertices:  # an import without --data
        raise ConfigError(
            f"{data_root}: {dataset.group.n_vertices} group vertices, the model predicts {spec['kwargs']['n_vertices']}"
        )
    names = spec["subjects"] if subjects == "all" else [subjects]
    for name in names:
        if name not in spec["subjects"]:
            raise ConfigError(f"--subject {name}: the run was trained on {', '.join(spec['subjects'])}")
        if name not in dataset.subjects:
            raise ConfigError(f"--subject {name}: not in {data_root}")
        if images is None and not dataset.subjects[name].keys.get(split):
            raise ConfigError(f"--subject {name}: no {split} rows in {data_root}")
    dev = resolve_device(device)
    init_from_env(dev)
    names = my_share(names)
    amp = resolve_precision(precision, dev)
    model.to(dev)
    finetuned = bool(spec.get("finetuned"))  # the model takes images: cached features do not apply
    if not finetuned:
        source = (
            FeatureSource(spec, Path(cache) if cache else None, dev, amp)
            if use_cache
            else FeatureSource(spec | {"cache": None}, None, dev, amp)
        )

    def inputs(keys: list[str], paths: list[Path]) -> list[torch.Tensor]:
        if finetuned:
            return [_images(paths, spec["features"]["preprocessing"])]
        return source.features(keys, paths, batch_size)

    # every image the trunk will read opens, before any prediction is made
    wanted = (
        dict(zip(image_keys, image_paths, strict=True))
        if images is not None
        else {
            k: p
            for n in names
            for k, p in zip(dataset.subjects[n].keys[split], dataset.subjects[n].images[split], strict=True)
        }
    )
    verify_images([p for k, p in wanted.items() if finetuned or source.cache is None or k not in source.cache.row_of])

    block = block_images
    sizes = {n: len(image_keys) if images is not None else len(dataset.subjects[n].keys[split]) for n in names}
    plan = predict_plan(model, spec, dataset, sizes, len(wanted), block, finetuned)
    budget = available_memory() if max_memory is None else max_memory
    # Features depend on the image alone: when every wanted image's features fit what the plan
    # leaves, they are read (or computed) once for all subjects, who share test images (8 subjects
    # sharing a test set read it 8x before); else each subject's, a block of images at a time.
    shared = not finetuned and plan.resident["features"] <= budget - plan.without("features")
    if not shared:
        plan.resident["features"] = 0
    plan.check(budget, "lower --block-images or --batch-size, or predict one --subject at a time")
    plan.check_disk(Path(out), "free space or predict one --subject at a time")
    logger.info(plan.describe())
    if shared and wanted:
        everyone = inputs(list(wanted), list(wanted.values()))
        position = {k: i for i, k in enumerate(wanted)}

    def subject_features(keys: list[str], paths: list[Path]) -> list[torch.Tensor]:
        if not shared:
            return inputs(keys, paths)
        at = torch.as_tensor([position[k] for k in keys])
        return [f[at] for f in everyone]

    scores = {}
    staging = PredictionStaging(Path(out))
    with staging:
        for name in track(names, "predicting", progress):
            subject = dataset.subjects[name]
            keys = image_keys if images is not None else list(subject.keys[split])
            paths = image_paths if images is not None else list(subject.images[split])
            native = None
            for lo in range(0, len(keys), block):
                feats = subject_features(keys[lo : lo + block], paths[lo : lo + block])
                if spec.get("kind") == "ridge":  # one model per subject, in its own vertex space
                    part = model.predict_subject(name, feats, source.cache)
                else:
                    part = _group_predictions(model, feats, spec["subjects"].index(name), batch_size, dev, amp)
                    part = part[:, dataset.group_index(name)]
                if native is None:
                    native = np.empty((len(keys), part.shape[1]), np.float32)
                native[lo : lo + len(part)] = part
            with phase("write"):
                dataset.write_predictions(staging.path, name, native, split, image_keys if images is not None else None)
            if split == "test" and subject.has_responses(split):
                with phase("score"):
                    scores[name] = score_subject(subject, native, split)
        if images is not None and is_main():
            (staging.path / "images.txt").write_text("\n".join(image_keys) + "\n")
    scores = {k: v for part in gather_objects(scores) for k, v in part.items()}
    return scores if is_main() else None


def predict_plan(model, spec: dict, dataset, sizes: dict[str, int], n_wanted: int, block: int, finetuned: bool):
    """predict's memory and disk from the shapes: the model's weights and, when shared, every
    wanted image's features throughout; per subject its predictions (the files it writes) and one
    block of images' inputs, float32, and group-space outputs."""
    feats = spec["features"]
    if finetuned:
        row = 4 * int(np.prod(feats["preprocessing"]["input_size"]))
        stored = 0
    else:
        shapes = [int(np.prod(feats["layer_shapes"][n])) for n in spec["layers"]]
        row = 4 * sum(shapes)
        stored = np.dtype(feats["dtype"]).itemsize * sum(shapes)
    params = model.parameters() if isinstance(model, torch.nn.Module) else []
    weights = sum(t.numel() * t.element_size() for t in params)
    # a torchrun rank beyond the subjects' count predicts none: sizes is empty
    native = max((sizes[n] * dataset.subjects[n].n_targets for n in sizes), default=0) * 4
    rows = min(block, max(sizes.values(), default=0))
    plan = MemoryPlan("predict", {"baseline": BASELINE, "model": weights, "features": n_wanted * stored})
    plan.phases["predicting"] = {
        "predictions": native,
        "inputs": 2 * rows * row,
        "outputs": 2 * rows * dataset.group.n_vertices * 4,
    }
    plan.disk = sum(sizes[n] * dataset.subjects[n].n_targets * 4 for n in sizes)
    return plan


class PredictionStaging:
    """Predictions are written to a hidden folder inside OUT and moved into place only when every
    subject is done: an error part-way leaves OUT as it was."""

    def __init__(self, out: Path):
        import uuid

        self.out = out
        # under torchrun every rank writes into rank 0's folder, and OUT's state is rank 0's, from
        # before any rank made anything
        self.created, tag = broadcast_object((not out.exists(), uuid.uuid4().hex[:8]))
        self.path = out / f".predict-{tag}"

    def __enter__(self) -> PredictionStaging:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        # A rank that fails removes the staging folder itself: torchrun then stops the others,
        # rank 0 before it moves anything (it waits at the barrier), and OUT stays as it was.
        if exc_type is None:
            barrier()  # every rank's subjects are written
            if not is_main():
                return
        try:
            if exc_type is None:
                for src in sorted(self.path.rglob("*")):
                    if src.is_file():
                        dst = self.out / src.relative_to(self.path)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        src.replace(dst)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
            if exc_type is not None and self.created and not any(self.out.iterdir()):
                self.out.rmdir()  # an error leaves no trace of OUT


def check_cache_fits(cache, spec: dict) -> None:
    """The run's layers, pooling, preprocessing and layer shapes are what the cache holds."""
    feats = spec["features"]
    missing = [n for n in spec["layers"] if n not in cache.layers]
    if missing:
        raise CacheError(f"{cache.path}: no layer {missing[0]!r}; the run needs {', '.join(spec['layers'])}")
    for key in ("pool", "preprocessing", "num_prefix_tokens"):
        if cache.attrs.get(key) != feats.get(key):
            raise CacheError(
                f"{cache.path}: {key} is {cache.attrs.get(key)!r}, the run was trained with {feats.get(key)!r}"
            )
    for name in spec["layers"]:
        have, want = list(cache.attrs["layer_shapes"][name]), list(feats["layer_shapes"][name])
        if have != want:
            raise CacheError(f"{cache.path}: layer {name} has shape {have}, the run was trained on {want}")


@timed("predict")
@torch.no_grad()
def _group_predictions(model, feats: list[torch.Tensor], subject: int, batch_size: int, dev, amp) -> np.ndarray:
    """(n, group vertices) predictions of a head (or finetuned encoder) for one subject, by batches."""
    idx = torch.full((batch_size,), subject, device=dev)
    preds = []
    for start in range(0, len(feats[0]), batch_size):
        chunk = [f[start : start + batch_size].to(dev).float() for f in feats]
        with autocast(dev, amp):
            preds.append(model(chunk, idx[: len(chunk[0])]).float().cpu())
    return torch.cat(preds).numpy()


def _images(paths: list[Path], prep: dict) -> torch.Tensor:
    """Eval-transformed images (N, 3, H, W) for a finetuned model, which takes images."""
    from blobenc.features.images import ImageViews
    from blobenc.features.trunk import eval_transform

    ds = ImageViews(paths, range(len(paths)), eval_transform(prep), prep["input_size"])
    out = []
    for _, x, errs in DataLoader(ds, batch_size=64):
        bad = [e for e in errs if e]
        if bad:
            raise CacheError(bad[0])
        out.append(x[:, 0])
    return torch.cat(out)
