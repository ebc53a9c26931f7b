"""Run folders as the report reads them: what a folder holds is loaded, what it lacks is noted.

Needs numpy and safetensors only (no plotting), so a run can be checked before anything is drawn.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blobenc.errors import ModelError, ReportError
from blobenc.files import read_json
from blobenc.train.checkpoint import ModelSpec

RUN_FORMAT = "blobenc.run"
HEMIS = ("lh", "rh")


@dataclass
class Trial:
    """One trial of a run: its per-epoch metrics rows and config."""

    name: str
    path: Path
    metrics: list[dict]
    config: dict | None
    best: bool = False
    failed: str | None = None


@dataclass
class Run:
    """Everything the report shows about one run folder; missing files leave fields empty."""

    path: Path
    label: str
    kind: str
    info: dict  # run.json ({} for an imported run)
    spec: ModelSpec | None  # model.json of the best trial (None when absent or unreadable)
    summary: dict | None
    trials: list[Trial]
    ridge_rows: list[dict]  # fit-ridge: one metrics line per subject
    vertex: dict[str, dict[str, np.ndarray]]  # subject -> {"r", "r2"}: validation, native order
    layer_weights: dict[str, np.ndarray]  # subject -> (n_vertices, n_layers), banded ridge
    notes: list[str] = field(default_factory=list)
    incomplete: bool = False
    test: dict | None = None  # filled by score_predictions

    @property
    def best_trial(self) -> Trial | None:
        return next((t for t in self.trials if t.best), None)

    @property
    def val(self) -> dict | None:
        """Validation scores of the best epoch: from summary.json, else the best metrics row."""
        if self.summary and isinstance(self.summary.get("val"), dict):
            return self.summary["val"]
        trial = self.best_trial
        rows = [m for m in trial.metrics if isinstance(m.get("val"), dict)] if trial else []
        rows = [m for m in rows if _finite(m["val"].get("median_r2"))]
        return max(rows, key=lambda m: m["val"]["median_r2"])["val"] if rows else None

    @property
    def val_rois(self) -> dict | None:
        return (self.summary or {}).get("val_rois") or None

    @property
    def command(self) -> str | None:
        cmd = self.info.get("command") or self.info.get("argv")
        if isinstance(cmd, list):
            return shlex.join(str(c) for c in cmd)
        return str(cmd) if cmd else None

    @property
    def data_path(self) -> str | None:
        return self.info.get("data")

    def group_ids(self) -> tuple[np.ndarray, int] | None:
        """The run's group space as (sorted target ids, space size), from model.json."""
        return group_ids(self.spec.group if self.spec else None)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def group_ids(group: dict | None) -> tuple[np.ndarray, int] | None:
    """A model.json `group` in either form ({index, size} or per-hemisphere) as (ids, size);
    fsaverage ids put the right hemisphere after the left one."""
    if not isinstance(group, dict):
        return None
    if "index" in group:
        return np.asarray(group["index"], dtype=np.int64), int(group["size"])
    if all(h in group for h in HEMIS):
        size = int(group["lh"]["fsaverage_size"])
        ids = [np.asarray(group["lh"]["fsaverage_index"], np.int64)]
        ids.append(np.asarray(group["rh"]["fsaverage_index"], np.int64) + size)
        return np.concatenate(ids), size + int(group["rh"]["fsaverage_size"])
    return None


def _read_json(path: Path) -> dict | None:
    """A run file's JSON object, None where the run does not have that file."""
    if not path.is_file():
        return None
    obj = read_json(path, ReportError)
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return obj


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """metrics.jsonl rows; an unreadable line (a write cut off) is skipped and reported."""
    if not path.is_file():
        return [], []
    rows, problems = [], []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            problems.append(f"{path}: line {i} is not valid JSON (a write cut off?); skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, problems


def _load_tensors(path: Path, keys: str | None = None) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keys is None or k == keys}
    except (SafetensorError, OSError) as e:
        raise ReportError(f"{path}: not a readable safetensors file ({e})") from None


def _label(path: Path, taken: set[str]) -> str:
    label = path.name or str(path)
    if label in taken:
        label = f"{path.parent.name}/{path.name}"
    while label in taken:
        label += "'"
    return label


def read_run(path: Path | str, taken: set[str] | None = None) -> Run:
    """Read a run folder (fit-head, finetune, fit-ridge, a sweep, an imported run)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: run folder not found")
    info = _read_json(path / "run.json")
    sweep = _read_json(path / "sweep.json")
    if info is None and sweep is None and not (path / "model.json").is_file():
        raise ReportError(f"{path}: not a blobenc run (no run.json, model.json or sweep.json)")
    info = info or {}
    if info and info.get("format") != RUN_FORMAT:
        raise ReportError(f"{path / 'run.json'}: format {info.get('format')!r}, expected {RUN_FORMAT!r}")
    kind = str(info.get("kind") or ("import" if (path / "model.json").is_file() else "unknown"))
    notes: list[str] = []
    incomplete = False
    configs = info.get("configs") if isinstance(info.get("configs"), list) else []

    trial_dirs = sorted(p for p in path.glob("trial-*") if p.is_dir())
    if sweep is not None or len(configs) > 1 or trial_dirs:
        trials = []
        for k, tdir in enumerate(trial_dirs):
            rows, problems = read_metrics(tdir / "metrics.jsonl")
            notes += problems
            trials.append(Trial(tdir.name, tdir, rows, configs[k] if k < len(configs) else None))
        if len(trial_dirs) < len(configs):
            notes.append(f"{len(trial_dirs)} of {len(configs)} trial folders exist")
            incomplete = True
    else:
        rows, problems = read_metrics(path / "metrics.jsonl")
        notes += problems
        trials = [Trial("run", path, rows, configs[0] if configs else None)]
    incomplete |= bool(notes)

    ridge_rows = [r for t in trials for r in t.metrics if "subject" in r and "epoch" not in r]
    for t in trials:
        t.metrics = [r for r in t.metrics if "epoch" in r]
        t.failed = next((r["failed"] for r in t.metrics if r.get("failed")), None)
        want = (t.config or {}).get("epochs")
        if kind != "fit-ridge" and not t.failed and isinstance(want, int) and len(t.metrics) < want:
            notes.append(f"{t.name}: {len(t.metrics)} of {want} epochs recorded")
            incomplete = True
        if t.failed:
            notes.append(f"{t.name} stopped: {t.failed}")

    summary = _read_json(path / "summary.json")
    best_name = (sweep or {}).get("best") or (summary or {}).get("trial")
    best = next((t for t in trials if best_name in (t.name, str(t.path.relative_to(path)) or ".")), None)
    if best is None and trials:
        best = max(trials, key=_best_score)
    if best is not None:
        best.best = True
    spec = None
    where = next((p for p in ((best.path if best else path) / "model.json", path / "model.json") if p.is_file()), None)
    if where is None:
        notes.append("no model.json: the model is not described")
    else:
        try:
            spec = ModelSpec.read(where)
        except ModelError as e:
            notes.append(f"the model is not described: {e}")
    if info and (summary is None or "seconds" not in summary):
        notes.append("no final summary.json: the run did not finish (interrupted?); showing what was written")
        incomplete = True

    vertex: dict[str, dict[str, np.ndarray]] = {}
    vpath = path / "val_vertex.safetensors"
    if vpath.is_file():
        for key, arr in _load_tensors(vpath).items():
            subject, _, what = key.rpartition(".")
            vertex.setdefault(subject, {})[what] = np.asarray(arr, dtype=np.float64)
    elif info:
        notes.append("no val_vertex.safetensors: no per-vertex validation scores for maps and histograms")

    layer_weights = {}
    for wpath in sorted((path / "weights").glob("*.safetensors")):
        found = _load_tensors(wpath, "layer_weights")
        if "layer_weights" in found:
            layer_weights[wpath.stem] = np.asarray(found["layer_weights"], dtype=np.float64)
    return Run(
        path,
        _label(path, taken or set()),
        kind,
        info,
        spec,
        summary,
        trials,
        ridge_rows,
        vertex,
        layer_weights,
        notes,
        incomplete,
    )


def _best_score(trial: Trial) -> float:
    scores = [m["val"]["median_r2"] for m in trial.metrics if _finite((m.get("val") or {}).get("median_r2"))]
    return max(scores, default=-math.inf)


def check_comparable(runs: list[Run]) -> None:
    """Runs compared on one page must share a target space (the same dataset and subjects)."""
    first = None
    for run in runs:
        ids = run.group_ids()
        if ids is None:
            continue
        if first is None:
            first = (run, ids)
            continue
        a, (ia, sa) = first
        ib, sb = ids
        if sa != sb or not np.array_equal(ia, ib):
            raise ReportError(
                f"{a.path} and {run.path} were fit on different datasets (their vertex spaces differ: "
                f"{len(ia)} vs {len(ib)} vertices); compare runs of one dataset"
            )
