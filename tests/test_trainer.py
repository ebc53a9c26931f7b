"""The training loop (blobenc/train/trainer.py) through fit-head: Ctrl-C and kills then --resume,
early stopping, successive halving, closed-form starts, non-finite losses; seen through Callbacks."""

import json

import pytest
import torch
from helpers import assert_same_weights, cfg, load_file_meta
from safetensors.torch import load_file

from blobenc import ConfigError
from blobenc.train.checkpoint import trained_state
from blobenc.train.config import sweep_configs
from blobenc.train.fit import fit_head
from blobenc.train.trainer import Callback, halving_rungs


class InterruptAt(Callback):
    """Interrupt training at optimizer step `at` (counted over every trial): a Ctrl-C (SIGINT, which
    the loop defers to the end of the batch) or, with `raw`, a KeyboardInterrupt raised mid-batch."""

    def __init__(self, at: int, raw: bool = False):
        self.at, self.raw, self.n = at, raw, 0

    def on_step_end(self, trial, loss: float) -> None:
        import signal

        self.n += 1
        if self.n == self.at:
            if self.raw:
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)


def test_resume_after_ctrl_c_mid_epoch_equals_uninterrupted(small_cache, train_data, tmp_path):
    config = [cfg(epochs=4)]  # 6 batches an epoch
    fit_head(small_cache, train_data, tmp_path / "whole", config, progress=False)
    stop = [InterruptAt(9)]  # epoch 1 after 3 of its batches; no periodic checkpoint before it
    with pytest.raises(KeyboardInterrupt):
        fit_head(
            small_cache, train_data, tmp_path / "cut", config, checkpoint_minutes=60, progress=False, callbacks=stop
        )
    state = json.loads(load_file_meta(tmp_path / "cut" / "state.safetensors")["batch"])
    assert state == 3 and not (tmp_path / "cut" / "val_vertex.safetensors").exists()
    with pytest.raises(ConfigError, match="holds an unfinished run; --resume continues it"):
        fit_head(small_cache, train_data, tmp_path / "cut", config, progress=False)
    with pytest.raises(ConfigError, match="--resume with other settings"):
        fit_head(small_cache, train_data, tmp_path / "cut", [cfg(epochs=5)], resume=True, progress=False)
    fit_head(small_cache, train_data, tmp_path / "cut", config, resume=True, progress=False)
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(tmp_path / "whole" / name, tmp_path / "cut" / name)
    whole, cut = (
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("whole", "cut")
    )
    assert [m["epoch"] for m in cut] == [0, 1, 2, 3]
    for a, b in zip(whole, cut, strict=True):  # the interrupted epoch's loss counts the batches of both halves
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val"]["median_r2"] == pytest.approx(b["val"]["median_r2"], abs=1e-5)


def test_resume_after_a_kill_inside_a_step_goes_on_from_the_last_checkpoint(small_cache, train_data, tmp_path):
    config = [cfg(epochs=3)]
    fit_head(small_cache, train_data, tmp_path / "whole", config, progress=False)
    stop = [InterruptAt(10, raw=True)]  # inside epoch 2: its state is not written half-stepped
    with pytest.raises(KeyboardInterrupt):
        fit_head(
            small_cache, train_data, tmp_path / "cut", config, checkpoint_minutes=0, progress=False, callbacks=stop
        )
    fit_head(small_cache, train_data, tmp_path / "cut", config, resume=True, progress=False)
    assert_same_weights(tmp_path / "whole" / "last.safetensors", tmp_path / "cut" / "last.safetensors")
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_early_stopping_restores_the_best_weights(small_cache, train_data, tmp_path):
    class Scripted(Callback):
        """Validation scores from a script; the weights each epoch was judged on, and at the end."""

        def __init__(self, scores):
            self.scores, self.weights = iter(scores), {}

        def on_validation(self, epoch, trial, val):
            self.weights[epoch] = {k: v.detach().cpu().clone() for k, v in trained_state(trial.model).items()}
            return val | {"median_r2": next(self.scores)}

        def on_train_end(self, trial):
            self.weights["final"] = {k: v.detach().cpu().clone() for k, v in trained_state(trial.model).items()}

    script = Scripted([0.1, 0.3, 0.2, 0.25, 0.9, 0.9])  # best at epoch 1, then 2 epochs without a better one
    weights = script.weights
    config = [cfg(epochs=8, patience=2, init="random")]  # a random start is not validated: the script is per epoch
    summary = fit_head(small_cache, train_data, tmp_path / "r", config, progress=False, callbacks=[script])
    assert summary["best_epoch"] == 1 and summary["trials"][0]["epochs"] == 4
    assert "early stop after epoch 3" in summary["trials"][0]["stopped"]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
    best = load_file(tmp_path / "r" / "best.safetensors")
    for k, v in weights[1].items():  # the best epoch's weights: in the file and in the model at the end
        torch.testing.assert_close(best[k], v, rtol=0, atol=0)
        torch.testing.assert_close(weights["final"][k], v, rtol=0, atol=0)
    assert any(not torch.equal(weights[3][k], v) for k, v in weights[1].items())


def test_halving_stops_the_worse_half_and_the_survivor_trains_as_alone(small_cache, train_data, tmp_path):
    grid = sweep_configs(cfg(epochs=4, init="random"), ["lr=3e-4,1e-3,3e-3,1e-2"])  # ranks from the epochs alone
    summary = fit_head(small_cache, train_data, tmp_path / "h", grid, halving=2, progress=False)
    assert halving_rungs(4, 4) == {0: 1, 1: 1}  # keep 2 after epoch 0, then 1 after epoch 1
    curves = {}
    for k in range(4):
        lines = (tmp_path / "h" / f"trial-{k:02d}" / "metrics.jsonl").read_text().splitlines()
        curves[k] = [json.loads(line)["val"]["median_r2"] for line in lines]
    after_0 = sorted(range(4), key=lambda k: -curves[k][0])[:2]  # the best 2 by epoch 0
    after_1 = max(after_0, key=lambda k: max(curves[k][:2]))
    assert {k for k in range(4) if len(curves[k]) == 1} == set(range(4)) - set(after_0)
    assert {k for k in range(4) if len(curves[k]) == 2} == set(after_0) - {after_1}
    assert len(curves[after_1]) == 4
    rows = {r["dir"]: r for r in summary["trials"]}
    assert all(rows[f"trial-{k:02d}"]["stopped"].startswith("halving") for k in range(4) if k != after_1)
    steps = [r["steps"] for r in summary["trials"]]
    assert sum(steps) <= 2.5 * max(steps)  # 4 configs: (1 + 1/2 + 1/2 x 2/4 ...) of one trial's steps
    solo = fit_head(small_cache, train_data, tmp_path / "solo", [grid[after_1]], progress=False)
    assert_same_weights(
        tmp_path / "h" / f"trial-{after_1:02d}" / "last.safetensors", tmp_path / "solo" / "last.safetensors"
    )
    assert solo["trials"][0]["median_r2"] == pytest.approx(rows[f"trial-{after_1:02d}"]["median_r2"], abs=1e-6)
    for k in range(4):  # every trial's checkpoints are written, the halved ones' too
        for name in ("best.safetensors", "last.safetensors", "state.safetensors", "summary.json"):
            assert (tmp_path / "h" / f"trial-{k:02d}" / name).is_file()


def test_halving_run_resumes_after_ctrl_c(small_cache, train_data, tmp_path):
    grid = sweep_configs(cfg(epochs=4, init="random"), ["lr=3e-4,1e-3,3e-3,1e-2"])
    fit_head(small_cache, train_data, tmp_path / "whole", grid, halving=2, progress=False)
    stop = [InterruptAt(40)]  # 4 trials x 6 batches, 2 x 6, then the survivor's 4th batch of epoch 2
    with pytest.raises(KeyboardInterrupt):
        fit_head(small_cache, train_data, tmp_path / "cut", grid, halving=2, progress=False, callbacks=stop)
    fit_head(small_cache, train_data, tmp_path / "cut", grid, halving=2, resume=True, progress=False)
    for k in range(4):
        for name in ("best.safetensors", "last.safetensors"):
            assert_same_weights(
                tmp_path / "whole" / f"trial-{k:02d}" / name, tmp_path / "cut" / f"trial-{k:02d}" / name
            )


def test_a_start_no_epoch_beats_stays_the_best(small_cache, train_data, tmp_path):
    from blobenc.run import load_run

    class WorseAfterTheStart(Callback):
        def on_validation(self, epoch, trial, val):
            return val if epoch == -1 else val | {"median_r2": -1.0}

    config = [cfg(epochs=2, init="ridge")]
    summary = fit_head(
        small_cache, train_data, tmp_path / "r", config, progress=False, callbacks=[WorseAfterTheStart()]
    )
    assert summary["best_epoch"] == -1 and summary["trials"][0]["start_median_r2"] == summary["val"]["median_r2"]
    best, last = load_file(tmp_path / "r" / "best.safetensors"), load_file(tmp_path / "r" / "last.safetensors")
    assert any(not torch.equal(best[k], last[k]) for k in best)  # trained on, but the start is kept
    load_run(tmp_path / "r")


def test_non_finite_loss_stops_and_keeps_best(small_cache, train_data, tmp_path):
    from blobenc.errors import TrainingError

    class DivergeAfter(Callback):
        """Weights that turn NaN after optimizer step `step`: the next step's loss is NaN."""

        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, trial, loss):
            if trial.step >= self.step:
                with torch.no_grad():
                    next(trial.model.parameters()).fill_(float("nan"))

    config = cfg(epochs=3, batch_size=64, init="random")
    summary = fit_head(small_cache, train_data, tmp_path / "r", [config], progress=False, callbacks=[DivergeAfter(4)])
    assert "loss became nan" in summary["trials"][0]["failed"]
    assert (tmp_path / "r/best.safetensors").is_file() and summary["best_epoch"] >= 0
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "r/best.safetensors").values())
    first = [DivergeAfter(1)]  # the second step's loss is NaN: no epoch ever finishes
    with pytest.raises(TrainingError, match="every trial stopped: loss became nan at epoch 0"):
        config = [cfg(epochs=2, batch_size=64, init="random")]
        fit_head(small_cache, train_data, tmp_path / "r2", config, progress=False, callbacks=first)
    # a closed-form start was validated before any step: it stands
    summary = fit_head(
        small_cache, train_data, tmp_path / "r3", [cfg(epochs=2, batch_size=64)], progress=False, callbacks=first
    )
    assert summary["best_epoch"] == -1 and "loss became nan at epoch 0" in summary["trials"][0]["failed"]
