"""`blobenc finetune` (phase 2): trunk and head end to end, images streamed with augmentation."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from blobenc.data import open_dataset
from blobenc.data.base import Dataset, ValidationSplit, dataset_id, verify_images
from blobenc.errors import ConfigError, DataError, ModelError
from blobenc.features.extract import default_workers
from blobenc.features.images import ImageViews
from blobenc.features.trunk import (
    LayerCapture,
    all_layer_shapes,
    augment_transform,
    eval_transform,
    layer_features,
    match_modules,
)
from blobenc.files import write_json
from blobenc.heads import create_head
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.train.checkpoint import (
    PCA_FILE,
    ModelSpec,
    RunSpec,
    load_state,
    load_weights,
    resolve_run,
)
from blobenc.train.config import FinetuneConfig
from blobenc.train.data import SplitTargets
from blobenc.train.step import epoch_batches
from blobenc.train.trainer import (
    Callback,
    add_trial,
    finish_run,
    finished_summary,
    start_run,
    total_steps,
    train_trials,
)

logger = logging.getLogger(__name__)


class ImageEncoder(nn.Module):
    """Trunk + head as one module: images in, group-space predictions out. Its state dict holds
    `trunk.*` and `head.*`."""

    def __init__(self, trunk: nn.Module, head: nn.Module, layers: list[str], pool: int | None, prefix: int):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.layers, self.pool, self.prefix = list(layers), pool, prefix
        self.capture = LayerCapture(trunk, self.layers)

    def train(self, mode: bool = True) -> ImageEncoder:
        """The trunk's batch norms keep their running statistics (eval mode): fine-tuning batches
        are small, and the pretrained statistics are what the head was fitted on."""
        super().train(mode)
        for module in self.trunk.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, inputs: list[torch.Tensor], subject: torch.Tensor, latent: bool = False) -> torch.Tensor:
        feats = self.capture(inputs[0])
        return self.head(layer_features(feats, self.layers, self.pool, self.prefix), subject, latent=latent)


def build_encoder(spec: ModelSpec) -> ImageEncoder:
    """Trunk + head of a run: a fit-head run's trunk rebuilt and checked against its weights'
    fingerprint; a finetune run's architecture only (its own weights are loaded next)."""
    feats = spec.features
    if spec.finetuned:
        feats = dataclasses.replace(feats, trunk=feats.trunk | {"pretrained": False, "weights": None})
    trunk = feats.create_trunk(checked=not spec.finetuned)
    head = create_head(spec.head, **spec.kwargs)
    return ImageEncoder(trunk, head, spec.layers, feats.pool, feats.num_prefix_tokens)


ATTENTION = "blocks.*.attn.**"


def _is_norm(module: nn.Module) -> bool:
    """Normalization layers of any kind (torch's, timm's BatchNormAct2d, RmsNorm, LayerNorm2d...)."""
    return (
        isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
        or "Norm" in type(module).__name__
    )


def resolve_unfreeze(trunk: nn.Module, layers: list[str], unfreeze: tuple[str, ...]) -> tuple[str, ...]:
    """`auto`: the attention blocks where the trunk has them (a ViT, as the reference's phase 2),
    else the parameters of the deepest cached layer's module (a CNN's last cached stage)."""
    if tuple(unfreeze) != ("auto",):
        return tuple(unfreeze)
    if match_modules([n for n, _ in trunk.named_parameters()], ATTENTION):
        return (ATTENTION,)
    return (f"{layers[-1]}.**",)  # layers come in model order


def set_trainable(encoder: ImageEncoder, unfreeze: tuple[str, ...], freeze: tuple[str, ...]) -> int:
    """Trunk parameters: all frozen, then `unfreeze` globs trainable, then `freeze` globs frozen again;
    normalization layers' parameters always stay frozen, whatever their names (a CNN's `bn1`). The head
    trains except its frozen PCA embedding. Returns the trainable parameter count."""
    names = [n for n, _ in encoder.trunk.named_parameters()]
    for pattern in unfreeze + freeze:
        if not match_modules(names, pattern):
            raise ModelError(f"--unfreeze/--freeze {pattern!r} matches no trunk parameter (e.g. {names[0]})")
    trainable = set()
    for pattern in unfreeze:
        trainable |= set(match_modules(names, pattern))
    for pattern in freeze:
        trainable -= set(match_modules(names, pattern))
    for module_name, module in encoder.trunk.named_modules():
        if _is_norm(module):
            trainable -= {f"{module_name}.{n}".lstrip(".") for n, _ in module.named_parameters(recurse=False)}
    for name, p in encoder.trunk.named_parameters():
        p.requires_grad_(name in trainable)
    for name, p in encoder.head.named_parameters():
        p.requires_grad_(not name.startswith("embed."))
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


class ImageData(SplitTargets):
    """Training images streamed through a DataLoader with augmentation; validation with the eval transform."""

    def __init__(
        self,
        dataset: Dataset,
        split: ValidationSplit,
        prep: dict,
        config: FinetuneConfig,
        device: torch.device,
    ):
        super().__init__(dataset, split, device)
        self.augment = augment_transform(prep, config.crop_scale)
        self.eval = eval_transform(prep)
        self.workers = default_workers(device) if config.num_workers is None else config.num_workers
        self.pin = device.type == "cuda"
        self.input_size = prep["input_size"]

    def _loader(self, part: str, transform, batches: list[np.ndarray], seed: int, epoch: int) -> Iterator:
        # crops drawn from (seed, epoch, sample) only: a resumed epoch draws the same ones
        paths = self.sets[part].path
        ds = ImageViews(paths, range(len(paths)), transform, self.input_size, seed=(seed, epoch))
        for _, x, errs in DataLoader(ds, batch_sampler=batches, num_workers=self.workers, pin_memory=self.pin):
            bad = [e for e in errs if e]
            if bad:
                raise DataError(f"{bad[0]}; the last finished epoch is kept: fix the file and rerun with --resume")
            yield x[:, 0]

    def train_batches(
        self, batch_size: int, seed: int, epoch: int, min_last: int = 2, start: int = 0
    ) -> Iterator[tuple]:
        batches = list(epoch_batches(len(self.sets["train"]), batch_size, seed, epoch, min_last))[start:]
        for idx, x in zip(batches, self._loader("train", self.augment, batches, seed, epoch), strict=True):
            yield self.training_batch(idx, [x.to(self.device, non_blocking=True)])

    def val_batches(self, batch_size: int) -> Iterator[tuple]:
        n = len(self.sets["val"])
        batches = np.array_split(np.arange(n), max(1, -(-n // batch_size)))
        for idx, x in zip(batches, self._loader("val", self.eval, batches, 0, 0), strict=True):
            yield idx, [x.to(self.device, non_blocking=True)], self._subjects("val", idx)


def finetune(
    run: Path | str,
    data_root: Path | str,
    out: Path | str,
    config: FinetuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_minutes: float = 10.0,
    progress: bool = True,
    max_memory: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict | None:
    """Fine-tune a fit-head run's trunk (attention blocks by default) and head end to end. The plan
    (finetune_plan) is logged and refused beyond `max_memory` (bytes; None: the memory available)
    before any image is read. `resume` and `overwrite` as for fit_head."""
    source = resolve_run(run)
    spec = ModelSpec.read(source / "model.json")
    if spec.kind == "ridge":
        raise ConfigError(f"{run}: a fit-ridge run has no head to fine-tune; give a fit-head run")
    out = Path(out)
    dataset = open_dataset(data_root)
    if list(dataset.subjects) != spec.subjects:
        raise ModelError(f"{data_root}: subjects {list(dataset.subjects)} differ from the run's {spec.subjects}")
    verify_images([p for s in dataset.subjects.values() for p in s.images["train"]])  # before anything is written
    start = start_run(out, [config], resume, config, overwrite, checkpoint_minutes)
    if start.finished:
        return finished_summary(out)
    device, amp, distributed, main, resume = start.device, start.amp, start.distributed, start.main, start.resume
    data_id = dataset_id(dataset)  # once: it hashes every image key
    if resume:
        start.check_inputs(None, spec.layers, data_id)
    encoder = build_encoder(spec)
    load_state(encoder.head, load_weights(source / "best.safetensors"), spec.pca_path(source))
    unfreeze = resolve_unfreeze(encoder.trunk, spec.layers, config.unfreeze)
    n_trainable = set_trainable(encoder, unfreeze, config.freeze)
    if config.grad_checkpointing:
        encoder.trunk.set_grad_checkpointing(True)
    split_file = out / "split.json"
    # the fit-head run's split (a sweep keeps it one level up), so validation images stay unseen
    origin = source / "split.json" if (source / "split.json").is_file() else source.parent / "split.json"
    split = ValidationSplit.load(split_file if resume else origin)
    plan = finetune_plan(encoder, spec, dataset, split, config)
    plan.check(
        available_memory() if max_memory is None else max_memory,
        "raise accumulate (--set accumulate=4), use --grad-checkpointing, or unfreeze fewer blocks",
    )
    logger.info(plan.describe())
    logger.info("trainable parameters: %d of %d", n_trainable, sum(p.numel() for p in encoder.parameters()))
    start.claim()
    if main:
        split.save(split_file)
    data = ImageData(dataset, split, spec.features.preprocessing, config, device)
    data.embed(*encoder.head.embedding())
    new_spec = dataclasses.replace(
        spec,
        finetuned=True,
        finetune={"from": str(source), "unfreeze": list(unfreeze), "trainable_parameters": n_trainable},
    )
    if spec.pca:  # the embedding lives in the PCA file: the new run gets its own copy, once
        new_spec.pca = PCA_FILE
        if main and not (resume and (out / PCA_FILE).is_file()):
            shutil.copyfile(spec.pca_path(source), out / PCA_FILE)
    if main:
        RunSpec(
            kind="finetune",
            source=str(source),
            data=str(data_root),
            configs=[config.to_dict()],
            features=spec.features.to_dict(),
            dataset=data_id,
        ).write(out / "run.json")
    trials: list = []
    add_trial(
        trials,
        "run",
        out,
        config,
        encoder.to(device),
        [0],
        new_spec,
        total_steps(data, config),
        device,
        distributed,
        main,
    )
    trials[0][0].validate_start = True  # phase 1's weights: the best until an epoch beats them
    summary = train_trials(
        out, trials, data, config, device, amp, resume, progress, "finetune", checkpoint_minutes, callbacks=callbacks
    )
    if summary is not None:
        summary["trainable_parameters"] = n_trainable
        write_json(out / "summary.json", summary)
        finish_run(out)
    return summary


def finetune_plan(
    encoder: ImageEncoder, spec: ModelSpec, dataset: Dataset, split: ValidationSplit, config
) -> MemoryPlan:
    """finetune's memory from the shapes: the encoder's weights, and gradients with AdamW's two
    moments for the trainable ones, and the validation targets throughout; per step the images of
    a micro-batch (in the loader's prefetch too) and the activations autograd keeps: the outputs of
    the trunk's leaf modules from its first trainable one on (each is the next one's saved input;
    measured within 25%, docs/benchmarks.md), with --grad-checkpointing roughly a block's."""
    n_train = n_val = 0
    for subject in dataset.subjects.values():
        train, val = split.rows(subject)
        n_train, n_val = n_train + len(train), n_val + len(val)
    prep = spec.features.preprocessing
    trunk = encoder.trunk
    leaves = {n for n, m in trunk.named_modules() if not list(m.children())}
    trainable = [n for n, p in trunk.named_parameters() if p.requires_grad]
    last = spec.layers[-1]  # the encoder's forward stops there
    kept, started, past = [], False, False
    for name, shape in all_layer_shapes(trunk, prep):
        inside = name == last or name.startswith(f"{last}.")
        if past and not inside:
            break
        past = past or inside
        started = started or any(t.startswith(f"{name}.") for t in trainable)
        if started and name in leaves and shape:
            kept.append(4 * int(np.prod(shape)))
    activations = sum(kept)
    if config.grad_checkpointing:  # a block's activations at a time, roughly
        activations = max(kept, default=0) * 16
    micro = -(-config.batch_size // config.accumulate)
    image = 4 * int(np.prod(prep["input_size"]))
    workers = default_workers(torch.device("cpu")) if config.num_workers is None else config.num_workers
    params = [(p.numel() * p.element_size(), p.requires_grad) for p in encoder.parameters()]
    v = dataset.group.n_vertices
    plan = MemoryPlan(
        "finetune",
        {
            "baseline": BASELINE,
            "weights": sum(b for b, _ in params) + sum(b.numel() * b.element_size() for b in encoder.buffers()),
            "gradients and optimizer": 3 * sum(b for b, trains in params if trains),
            "validation targets": n_val * v * 5,
            "embedded targets": n_train * (encoder.head.embedding()[0].shape[1] + 1) * 4,
        },
    )
    plan.phases["training"] = {"images": (2 * workers + 1) * micro * image, "activations": micro * activations}
    plan.phases["validation"] = {"images": (2 * workers + 1) * micro * image, "predictions": 2 * n_val * v * 4}
    return plan
