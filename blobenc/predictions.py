"""Prediction folders of any dataset layout: `predict` writes them from any run (an Encoder),
`evaluate` scores them, `submit` packages them for the challenge.

Each layout writes and reads its own files through the dataset (`write_predictions`,
`read_predictions`): the Algonauts layout `PRED/subjNN/{lh,rh}_pred_<split>.npy`, the generic
layout `PRED/<name>/pred_<split>.npy` plus `PRED/<name>/<split>.csv` with the row keys. Both hold
the subject's own target order; scoring works on the whole (rows, n_targets) array.
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from blobenc.data import open_dataset
from blobenc.data.base import Dataset, dataset_id, verify_images
from blobenc.distributed import barrier, broadcast_object, gather_objects, init_from_env, is_main, my_share
from blobenc.errors import ConfigError, DataError, PredictionError
from blobenc.files import atomic_path, read_json, write_json
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.profile import phase
from blobenc.progress import track
from blobenc.run import Encoder, load_run
from blobenc.scoring import score_subject, summarize

SUBMISSION_FOLDER = "algonauts_2023_challenge_submission"


def prediction_path(pred_dir: Path, subject: str, hemi: str, split: str = "test") -> Path:
    """An Algonauts-layout prediction file: PRED/subjNN/<hemi>_pred_<split>.npy."""
    return Path(pred_dir) / subject / f"{hemi}_pred_{split}.npy"


def evaluate(pred_dir: Path | str, dataset: Dataset, split: str = "test") -> dict:
    """Score every subject folder in `pred_dir`; the top level averages over subjects.

    Every file is read and checked before anything is scored."""
    names = dataset.prediction_subjects(Path(pred_dir))
    check_identity(Path(pred_dir), dataset_id(dataset), f"score them against {dataset.root}")
    for name in names:
        if not dataset.subjects[name].has_responses(split):
            raise DataError(f"{dataset.subjects[name].path}: no {split} responses to score {pred_dir}/{name} against")
    preds = {name: dataset.read_predictions(Path(pred_dir), name, split) for name in names}
    return summarize({name: score_subject(dataset.subjects[name], preds[name], split) for name in names})


def submit(pred_dir: Path | str, dataset: Dataset, out: Path | str) -> Path:
    """Check every subject's test predictions and zip them in the Algonauts challenge layout."""
    pred_dir, out = Path(pred_dir), Path(out)
    if dataset.layout != "algonauts":
        raise DataError(
            f"{dataset.root}: submit packages the Algonauts 2023 challenge layout; this is {dataset.layout}"
        )
    if out.suffix != ".zip":
        raise PredictionError(f"{out}: the submission file must end in .zip")
    check_identity(pred_dir, dataset_id(dataset), f"package them for {dataset.root}")
    for name in dataset.subjects:  # validate everything before writing anything
        dataset.read_predictions(pred_dir, name, "test")
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in dataset.subjects:
            for hemi in ("lh", "rh"):
                path = prediction_path(pred_dir, name, hemi, "test")
                zf.write(path, f"{SUBMISSION_FOLDER}/{name}/{path.name}")
    return out


logger = logging.getLogger(__name__)


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
    encoder = load_run(run)
    dataset = open_dataset(data_root)
    if encoder.group is not None:
        if not encoder.group.same_as(dataset.group):
            raise ConfigError(f"{data_root}: its group vertex space differs from the one the run was trained in")
    elif encoder.spec.kwargs["n_vertices"] != dataset.group.n_vertices:  # an import without --data
        raise ConfigError(
            f"{data_root}: {dataset.group.n_vertices} group vertices, the model predicts "
            f"{encoder.spec.kwargs['n_vertices']}"
        )
    else:
        encoder.group = dataset.group
    names = encoder.subjects if subjects == "all" else [subjects]
    for name in names:
        if name not in encoder.subjects:
            raise ConfigError(f"--subject {name}: the run was trained on {', '.join(encoder.subjects)}")
        if name not in dataset.subjects:
            raise ConfigError(f"--subject {name}: not in {data_root}")
        if images is None and not dataset.subjects[name].keys.get(split):
            raise ConfigError(f"--subject {name}: no {split} rows in {data_root}")
    encoder.to(device, precision)
    init_from_env(encoder.device)
    names = my_share(names)
    source = encoder.open_inputs((Path(cache) if cache else None) if use_cache else False)

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
    keys = list(wanted)
    verify_images([wanted[keys[i]] for i in source.uncached(keys)])

    block = block_images
    sizes = {n: len(image_keys) if images is not None else len(dataset.subjects[n].keys[split]) for n in names}
    plan = predict_plan(encoder, dataset, sizes, len(wanted), block)
    budget = available_memory() if max_memory is None else max_memory
    # Features depend on the image alone: when every wanted image's features fit what the plan
    # leaves, they are read (or computed) once for all subjects, who share test images (8 subjects
    # sharing a test set read it 8x before); else each subject's, a block of images at a time.
    shared = not source.takes_images and plan.resident["features"] <= budget - plan.without("features")
    if not shared:
        plan.resident["features"] = 0
    plan.check(budget, "lower --block-images or --batch-size, or predict one --subject at a time")
    plan.check_disk(Path(out), "free space or predict one --subject at a time")
    logger.info(plan.describe())
    if shared and wanted:
        everyone = encoder.inputs(keys, list(wanted.values()), batch_size)
        position = {k: i for i, k in enumerate(wanted)}

    def subject_inputs(keys: list[str], paths: list[Path]) -> list[torch.Tensor]:
        if not shared:
            return encoder.inputs(keys, paths, batch_size)
        at = torch.as_tensor([position[k] for k in keys])
        return [f[at] for f in everyone]

    scores = {}
    staging = PredictionStaging(Path(out), dataset)
    with staging:
        for name in track(names, "predicting", progress):
            subject = dataset.subjects[name]
            keys = image_keys if images is not None else list(subject.keys[split])
            paths = image_paths if images is not None else list(subject.images[split])
            native = None
            for lo in range(0, len(keys), block):
                part = encoder.predict_features(
                    subject_inputs(keys[lo : lo + block], paths[lo : lo + block]), subject, batch_size
                )
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


def predict_plan(encoder: Encoder, dataset, sizes: dict[str, int], n_wanted: int, block: int):
    """predict's memory and disk from the shapes: the model's weights and, when shared, every
    wanted image's inputs throughout; per subject its predictions (the files it writes) and one
    block of images' inputs, float32, and group-space outputs."""
    row, stored = encoder.source.row_bytes()
    # a torchrun rank beyond the subjects' count predicts none: sizes is empty
    native = max((sizes[n] * dataset.subjects[n].n_targets for n in sizes), default=0) * 4
    rows = min(block, max(sizes.values(), default=0))
    plan = MemoryPlan("predict", {"baseline": BASELINE, "model": encoder.weight_bytes(), "features": n_wanted * stored})
    plan.phases["predicting"] = {
        "predictions": native,
        "inputs": 2 * rows * row,
        "outputs": 2 * rows * dataset.group.n_vertices * 4,
    }
    plan.disk = sum(sizes[n] * dataset.subjects[n].n_targets * 4 for n in sizes)
    return plan


IDENTITY_FILE = "predictions.json"  # which dataset a prediction folder's arrays are for


class PredictionStaging:
    """Predictions are written to a hidden folder inside OUT and moved into place only when every
    subject is done: an error part-way leaves OUT as it was. With them goes IDENTITY_FILE, the
    dataset they are for (`dataset_id`), which evaluate and submit check; predictions for another
    dataset are refused in a folder that holds some. A staging folder a killed process left is
    removed by the next one."""

    def __init__(self, out: Path, dataset: Dataset):
        import uuid

        self.out = out
        self.identity = {"format": "blobenc.predictions", "dataset": dataset_id(dataset), "data": str(dataset.root)}
        # under torchrun every rank writes into rank 0's folder, and OUT's state is rank 0's, from
        # before any rank made anything
        self.created, tag = broadcast_object((not out.exists(), f"{os.getpid()}-{uuid.uuid4().hex[:8]}"))
        self.path = out / f".predict-{tag}"

    def __enter__(self) -> PredictionStaging:
        if is_main() and self.out.is_dir():
            check_identity(self.out, self.identity["dataset"], "write predictions for another dataset into it")
            for stale in self.out.glob(".predict-*"):
                if not _alive(stale.name.split("-")[1]):
                    shutil.rmtree(stale, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A rank that fails removes the staging folder itself: torchrun then stops the others,
        # rank 0 before it moves anything (it waits at the barrier), and OUT stays as it was.
        if exc_type is None:
            barrier()  # every rank's subjects are written
            if not is_main():
                return
        try:
            if exc_type is None:
                write_json(self.path / IDENTITY_FILE, self.identity)
                for src in sorted(self.path.rglob("*")):
                    if src.is_file():
                        dst = self.out / src.relative_to(self.path)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        src.replace(dst)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
            if exc_type is not None and self.created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()  # an error leaves no trace of OUT


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def check_identity(pred_dir: Path, dataset: str, action: str) -> None:
    """Predictions in `pred_dir` are for the dataset whose `dataset_id` is `dataset` (when the folder
    says which: predictions made elsewhere carry no IDENTITY_FILE); else one line."""
    path = Path(pred_dir) / IDENTITY_FILE
    if not path.is_file():
        return
    stored = read_json(path, error=PredictionError)
    if stored.get("dataset") != dataset:
        raise PredictionError(
            f"{pred_dir}: holds predictions for another dataset ({stored.get('data')}, id {stored.get('dataset')}); "
            f"cannot {action}"
        )
