"""One trial under training (its model, optimizer, schedule, dropout stream and record) and its
optimizer step on the masked group-space loss; the loop that drives them is train/trainer.py."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from blobenc.heads import by_subject
from blobenc.profile import phase
from blobenc.runtime import autocast
from blobenc.train.config import HeadConfig

if TYPE_CHECKING:
    from timm.scheduler import CosineLRScheduler


@dataclass
class EmbeddedTargets:
    """Training targets seen through a frozen linear embedding y = W z + c (the group PCA).

    For subject s with vertex mask M_s, the masked squared error of a sample expands to

        ||M_s (W z + c - y)||² = z·G_s z - 2 z·r + q,
        G_s = Wᵀ M_s W,   r = Wᵀ M_s (y - c),   q = ||M_s (y - c)||²,

    so the group-space masked MSE and its gradient come from P-dimensional quantities: per sample
    P + 1 numbers instead of V targets, and P² instead of 2·V·P multiply-adds per step (V = 39548,
    P = 2048 at the reference scale). Missing vertices enter neither G_s, r nor q.
    """

    r: torch.Tensor  # (N, P)
    q: torch.Tensor  # (N,)
    gram: torch.Tensor  # (S, P, P)
    counts: torch.Tensor  # (S,) observed vertices per subject


def embedded_mse(
    z: torch.Tensor, subject: torch.Tensor, r: torch.Tensor, q: torch.Tensor, targets: EmbeddedTargets
) -> torch.Tensor:
    """Mean squared error over every observed (sample, vertex) of the group-space prediction W z + c,
    computed from the latent z (B, P) and the batch's rows r (B, P), q (B,) of `targets`."""
    gz = by_subject(z, subject, lambda s, x: x @ targets.gram[s], z.shape[1])
    sse = (z * (gz - 2 * r)).sum(1) + q
    return sse.sum() / targets.counts[subject].sum().clamp_min(1)


def configure_optimizer(model: nn.Module, config: HeadConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases or norm parameters).

    Fused (one kernel over every parameter) where torch has it: on a 2-core CPU 4-7x faster per
    step than the default multi-tensor path at the reference head sizes, and equal to it within
    one float32 ulp per step (docs/benchmarks.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params) or None
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=fused,
    )


def configure_scheduler(optimizer, config: HeadConfig, total_steps: int) -> CosineLRScheduler:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to min_lr_fraction x lr."""
    from timm.scheduler import CosineLRScheduler  # imports timm and torchvision (~2 s): not at predict time

    warmup = round(config.warmup_fraction * total_steps)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup),
        lr_min=config.lr * config.min_lr_fraction,
        warmup_t=warmup,
        warmup_lr_init=0.0 if warmup else config.lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def steps_per_epoch(n: int, batch_size: int, min_last: int = 2) -> int:
    return n // batch_size + (n % batch_size >= min_last)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, min_last: int = 2) -> Iterator[np.ndarray]:
    """A shuffled pass over n samples; the order depends only on (seed, epoch), so a resume repeats it.

    A last batch smaller than `min_last` is skipped: batch norm needs two samples on every rank.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, steps_per_epoch(n, batch_size, min_last) * batch_size, batch_size):
        yield order[start : start + batch_size]


def head_seed(config: HeadConfig) -> int:
    """The seed of a head's random init and dropout: `init_seed`, else `seed`."""
    return config.seed if config.init_seed is None else config.init_seed


@dataclass
class Best:
    """A trial's best so far: its validation score (median R²) and epoch (-1: its closed-form
    start), the scores, and the trained weights, kept in memory until `written` to best.safetensors."""

    score: float = -math.inf
    epoch: int = -1
    val: dict | None = None
    state: dict[str, torch.Tensor] | None = None
    written: bool = True

    def update(self, score: float, epoch: int, val: dict, weights: dict[str, torch.Tensor]) -> None:
        self.score, self.epoch, self.val, self.written = score, epoch, val, False
        self.state = {k: v.detach().clone() for k, v in weights.items()}


@dataclass
class Trial:
    """One model under training with its own optimizer, schedule and dropout RNG stream."""

    name: str
    config: HeadConfig
    model: nn.Module
    layer_idx: list[int]
    optimizer: torch.optim.Optimizer = None
    scheduler: CosineLRScheduler = None
    rng_state: torch.Tensor = None
    step: int = 0
    best: Best = field(default_factory=lambda: Best())
    start_val: dict | None = None  # validation scores of a closed-form start, before any step
    validate_start: bool = False  # validate the weights before any step (fit-head's closed-form starts)
    written_step: int = -1  # the step of the last weights written (last.safetensors)
    failed: str | None = None  # a non-finite loss: not trained further
    stopped: str | None = None  # early stopping or a halving rung: not trained further
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's, so far
    history: list[dict] = field(default_factory=list)
    net: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
    keep_embedding: bool = False  # checkpoints hold the frozen embedding (the run has no PCA file)

    @property
    def active(self) -> bool:
        return not self.failed and not self.stopped

    def setup(self, total_steps: int, device: torch.device, seed_offset: int = 0) -> None:
        self.optimizer = configure_optimizer(self.model, self.config)
        self.scheduler = configure_scheduler(self.optimizer, self.config, total_steps)
        self.scheduler.step_update(0)
        # the state of the generator dropout draws from on `device`: on CUDA the device's own,
        # whose state has another format than the CPU's
        self.rng_state = torch.Generator(device).manual_seed(head_seed(self.config) + seed_offset).get_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def train_step(
    trial: Trial,
    feats: Sequence[torch.Tensor],
    subject: torch.Tensor,
    r: torch.Tensor,
    q: torch.Tensor,
    targets: EmbeddedTargets,
    device: torch.device,
    amp: torch.dtype | None,
) -> float:
    """One optimizer step of one trial, over `config.accumulate` micro-batches. Each trial draws
    dropout from its own RNG state, so trials trained together in one pass equal the same configs
    trained alone."""
    _set_rng_state(trial.rng_state, device)
    trial.model.train()
    net = trial.net or trial.model
    trial.optimizer.zero_grad(set_to_none=True)
    n, total = len(subject), 0.0
    for rows in np.array_split(np.arange(n), trial.config.accumulate):
        part = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)  # views, not copies
        with phase("forward"):
            with autocast(device, amp):
                z = net([feats[i][part] for i in trial.layer_idx], subject[part], latent=True)
            loss = embedded_mse(z.float(), subject[part], r[part], q[part], targets) * (len(rows) / n)
            value = float(loss.detach())
        if not math.isfinite(value):
            return value
        with phase("backward"):
            loss.backward()
        total += value
    with phase("optimizer"):
        if trial.config.grad_clip:
            nn.utils.clip_grad_norm_(trial.model.parameters(), trial.config.grad_clip)
        trial.optimizer.step()
    trial.step += 1
    trial.scheduler.step_update(trial.step)
    trial.rng_state = _get_rng_state(device)
    return total


@torch.no_grad()
def predict_group(
    model: nn.Module,
    batches: Iterator[tuple[list[torch.Tensor], torch.Tensor]],
    device: torch.device,
    amp: torch.dtype | None,
) -> torch.Tensor:
    """Group-space predictions (N, V) in eval mode, float32 on the CPU."""
    model.eval()
    out = []
    for feats, subject in batches:
        with autocast(device, amp):
            out.append(model(feats, subject).float().cpu())
    return torch.cat(out)
