"""`blobenc compare`: which model, which layer, for which region (docs/compare.md).

For every cache, every selected layer and every subject, the leave-one-out ridge of fit-ridge
(blobenc/ridge.py, fed as blobenc/train/ridge.py feeds it) on that layer alone, plus all layers of
each cache together, scored per target on fit-head's validation split (and on the test images
where their responses exist). Optionally the variance partitioning of two feature sets: the ridge
of A, of B and the banded ridge of A and B together.

Work. Caches are read a layer at a time (its reduced features for every image a subject of this
process needs); a layer's z-scored features serve its own ridge (one SVD or one kernel
eigendecomposition for every alpha and target block, as in fit-ridge) and are then folded into the
all-layers model (its primal features, or its summed kernel) and the partition's kernels, so no
layer is read twice. A result is one *unit*, (cache, feature set, subject), written atomically to
CMP/units/: a rerun skips the units on disk (resume), and `--shard i/n` or torchrun shares the
(cache, subject) pairs and the partition's subjects among processes; the tables are merged from the
units by whichever process finds them all done (blobenc/compare_tables.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blobenc.compare_tables import ALL, PARTITION, merge, missing_units
from blobenc.data import open_dataset
from blobenc.distributed import barrier, init_from_env, is_main, rank, world_size
from blobenc.errors import CacheError, ConfigError
from blobenc.features.cache import FeatureCache
from blobenc.files import read_json, write_json
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.progress import track
from blobenc.ridge import (
    LayerScaler,
    banded_ridge,
    check_alphas,
    check_features,
    default_alphas,
    loo_ridge,
    reduce_layer,
    reduced_dim,
    set_ridge_backend,
)
from blobenc.runtime import resolve_device
from blobenc.scoring import noise_normalized_accuracy, pearson_r, r2_score
from blobenc.train.checkpoint import save_weights
from blobenc.train.ridge import image_folds

logger = logging.getLogger(__name__)

FORMAT = "blobenc-compare/1"


@dataclass(frozen=True)
class CompareConfig:
    features: str = "mean"
    layers: tuple[str, ...] | None = None  # globs over every cache's layers; None = all of them
    alphas: tuple[float, ...] | None = None  # None: default_alphas scaled to each kernel's trace
    all_layers: bool = True  # also every cache's selected layers together
    partition: tuple[str, str] | None = None  # feature sets A and B: "CACHE" or "CACHE:GLOB" (CACHE a label)
    n_iter: int = 20  # A and B together: banded ridge's random-search draws
    cv: int = 5  # A and B together: folds by image
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        check_features(self.features)
        if self.alphas is not None:
            check_alphas(self.alphas)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction}: expected a fraction in (0, 1)")
        if self.n_iter < 1 or self.cv < 2:
            raise ConfigError(f"--n-iter {self.n_iter} / --cv {self.cv}: expected n_iter >= 1 and cv >= 2")
        if self.partition is not None and len(self.partition) != 2:
            raise ConfigError(f"--partition {self.partition}: expected two feature sets, A and B")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def identity(self) -> dict:
        """What must match for a resume (the device may change)."""
        return {k: v for k, v in self.to_dict().items() if k != "device"}


@dataclass
class Source:
    """One cache in the comparison: its label (the model's name in the tables), selected layers and
    each one's relative depth ((k + 1) / L for the k-th of the cache's L layers, in trunk order)."""

    label: str
    path: Path
    cache: FeatureCache
    layers: list[str]
    depth: dict[str, float]
    dims: dict[str, int]

    def to_dict(self) -> dict:
        a = self.cache.attrs
        return {
            "label": self.label,
            "path": str(self.path.resolve()),
            "model": a.get("model"),
            "weights_fingerprint": a.get("weights_fingerprint"),
            "layers": self.layers,
            "depth": self.depth,
            "dims": self.dims,
        }


@dataclass
class FeatureSet:
    """Partition side A or B: a cache's layers (all selected ones, or those matching a glob)."""

    text: str
    source: int
    layers: list[str]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) as (i, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n")
    return i, n


def _labels(paths: list[Path]) -> list[str]:
    """Each cache's folder name, made unique with -2, -3, ... (folder names repeat across runs)."""
    out: list[str] = []
    for p in paths:
        base = p.resolve().name or "cache"
        label, k = base, 1
        while label in out:
            k += 1
            label = f"{base}-{k}"
        out.append(label)
    return out


def open_sources(paths: list[Path], features: str, layers: tuple[str, ...] | None) -> list[Source]:
    if not paths:
        raise ConfigError("no caches given")
    sources = []
    for path, label in zip(paths, _labels(paths), strict=True):
        cache = FeatureCache.open(path)
        chosen = _choose_layers(cache, layers)
        order = cache.layers
        prefix = int(cache.attrs.get("num_prefix_tokens") or 0)
        shapes = cache.attrs["layer_shapes"]
        sources.append(
            Source(
                label,
                Path(path),
                cache,
                chosen,
                {n: (order.index(n) + 1) / len(order) for n in chosen},
                {n: reduced_dim(features, shapes[n], prefix) for n in chosen},
            )
        )
    return sources


def _choose_layers(cache: FeatureCache, patterns: tuple[str, ...] | None) -> list[str]:
    """The cache's layers matching any of the globs (each glob need not match every cache)."""
    if not patterns:
        return cache.layers
    hit = [n for n in cache.layers if any(_matches(n, p) for p in patterns)]
    if not hit:
        raise ConfigError(f"--layers {' '.join(patterns)}: no layer of {cache.path} matches; it has {cache.layers}")
    return hit


def _matches(name: str, pattern: str) -> bool:
    from blobenc.features.trunk import match_modules  # fit-ridge's glob rules (trunk.py imports timm)

    return bool(match_modules([name], pattern))


def parse_set(text: str, sources: list[Source]) -> FeatureSet:
    """'LABEL' (every selected layer of that cache) or 'LABEL:GLOB' (a layer group of it)."""
    label, _, glob = text.partition(":")
    labels = [s.label for s in sources]
    if label not in labels:
        raise ConfigError(f"--partition {text!r}: no cache labelled {label!r}; the caches are {', '.join(labels)}")
    src = sources[labels.index(label)]
    layers = [n for n in src.layers if not glob or _matches(n, glob)]
    if not layers:
        raise ConfigError(f"--partition {text!r}: no selected layer of {label} matches; it has {src.layers}")
    return FeatureSet(text, labels.index(label), layers)


@dataclass
class SubjectRows:
    """A subject's responses rows and their cache-independent image keys."""

    name: str
    train: np.ndarray  # response rows of the training part
    val: np.ndarray
    keys: dict[str, list[str]]  # part -> image key per response row (train, val, and test when scored)
    test: bool  # test responses exist
    ceiling: np.ndarray | None = None  # noise ceiling per target (a fraction), for the test score


@dataclass
class Work:
    """One process's share: the (source, subject) pairs it solves, the partition subjects it owns."""

    pairs: list[tuple[int, str]]
    partition: list[str]


def share(sources: list[Source], subjects: list[str], partition: bool, shard: tuple[int, int]) -> Work:
    """Round-robin over the (cache, subject) pairs and the partition's subjects."""
    i, n = shard
    pairs = [(c, s) for c in range(len(sources)) for s in subjects]
    items = [("pair", p) for p in pairs] + ([("partition", s) for s in subjects] if partition else [])
    mine = items[i::n]
    return Work([p for kind, p in mine if kind == "pair"], [s for kind, s in mine if kind == "partition"])


def unit_path(out: Path, source: str, feature_set: str, subject: str) -> Path:
    return out / "units" / source / feature_set / f"{subject}.safetensors"


def partition_path(out: Path, subject: str) -> Path:
    return out / "units" / PARTITION / f"{subject}.safetensors"


@dataclass
class Accumulator:
    """What a subject's later fits gather layer by layer: primal features or a summed kernel (train
    x train, plus val and test rows x train) for the all-layers model, and the kernels of A and B."""

    primal: bool
    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # primal: z per layer, per part
    kernel: dict[str, torch.Tensor] = field(default_factory=dict)  # kernel: part -> (n_part, n_train)

    def add(self, z: dict[str, torch.Tensor], weight: float) -> None:
        if self.primal:
            for part, x in z.items():
                self.parts.setdefault(part, []).append(x * weight**0.5)
            return
        zt = z["train"]
        for part, x in z.items():
            k = x @ zt.T * weight
            if part in self.kernel:
                self.kernel[part] += k
            else:
                self.kernel[part] = k


def compare(
    caches: list[Path | str],
    data_root: Path | str,
    out: Path | str,
    config: CompareConfig = CompareConfig(),
    *,
    shard: tuple[int, int] | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> dict | None:
    """Score every layer of every cache (and each cache's layers together) per subject and target,
    write the units and, once every unit is done, the tables; returns the summary (None from a
    process that leaves the merge to another: a shard whose peers are not finished, torchrun's
    ranks > 0). Resumes from the units already in `out`. `shard`: (i, n) for `--shard i/n`;
    under torchrun the ranks share the work the same way."""
    config.check()
    out = Path(out)
    paths = [Path(c) for c in caches]
    device = resolve_device(config.device)
    distributed = init_from_env(device)
    if shard is None:
        shard = (rank(), world_size()) if distributed else (0, 1)
    elif distributed:
        raise ConfigError("--shard under torchrun: torchrun's RANK and WORLD_SIZE already share the work")
    if not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"--shard {shard[0]}/{shard[1]}: expected i/n with 0 <= i < n")
    if config.partition:
        set_ridge_backend(device)
    dataset = open_dataset(data_root)
    sources = open_sources(paths, config.features, config.layers)
    sets = [parse_set(t, sources) for t in config.partition] if config.partition else None
    split = dataset.validation_split(config.val_fraction, config.seed)
    subjects = list(dataset.subjects)
    rows = {}
    for name in subjects:
        subject = dataset.subjects[name]
        tr, va = split.rows(subject)
        keys = {"train": [subject.keys["train"][r] for r in tr.tolist()]}
        keys["val"] = [subject.keys["train"][r] for r in va.tolist()]
        test = subject.has_responses("test")
        if test:
            keys["test"] = list(subject.keys["test"])
        if len(tr) < 2 or len(va) < 2:
            raise ConfigError(f"{name}: the validation split left {len(tr)} training and {len(va)} validation images")
        rows[name] = SubjectRows(name, tr, va, keys, test, subject.noise_ceiling() if test else None)
    for src in sources:
        try:
            for r in rows.values():
                for k in r.keys.values():
                    src.cache.rows(k)
        except CacheError as e:
            raise CacheError(f"{e}: the cache was not extracted from this dataset ({dataset.root})") from None

    header = {
        "format": FORMAT,
        "config": config.identity,
        "data": str(data_root),
        "caches": [s.to_dict() for s in sources],
        "subjects": subjects,
        "partition": [dataclasses.asdict(fs) for fs in sets] if sets else None,
    }
    plan = compare_plan(sources, rows, dataset, config, sets)
    budget = available_memory() if max_memory is None else max_memory
    plan.check(budget, "use fewer --layers, --features mean, fewer caches per shard, or a machine with more memory")
    logger.info("%s", plan.describe())
    if is_main():
        _start(out, header)
    barrier()  # under torchrun rank 0 writes compare.json first
    if not is_main():
        _start(out, header)

    work = share(sources, subjects, sets is not None, shard)
    t0 = time.perf_counter()
    fits = 0
    for c, src in enumerate(sources):
        fits += _run_source(c, src, sources, sets, work, rows, dataset, out, config, device, progress)
    if sets:
        for name in work.partition:
            if not partition_path(out, name).is_file():
                _solve_partition(name, sets, sources, rows[name], dataset, out, config, device)
    logger.info("shard %d/%d: %d fits in %.1f s", shard[0], shard[1], fits, time.perf_counter() - t0)
    if distributed:
        barrier()
        if not is_main():
            return None
    missing = missing_units(out, header)
    if missing:
        logger.info("%d units still to do (other shards): the tables are written by the last one", len(missing))
        return None
    return merge(out, dataset)


def _start(out: Path, header: dict) -> None:
    """Write CMP/compare.json, or check that the one there describes the same comparison (resume;
    shards started together may both write it: the same content, renamed into place)."""
    file = out / "compare.json"
    if not file.is_file():
        if out.exists() and any(p.name != "units" and not p.name.startswith(".") for p in out.iterdir()):
            raise ConfigError(f"{out}: exists, is not empty and holds no comparison; choose a new --out")
        try:
            write_json(file, header)
        except FileNotFoundError:  # another shard renamed the same temporary file first
            pass
    stored = read_json(file)
    for key in ("config", "caches", "subjects", "partition"):
        if stored.get(key) != header[key]:
            raise ConfigError(
                f"{out}: holds a comparison with another {key} (stored {stored.get(key)!r}); "
                "rerun with the same caches and options to resume, or choose a new --out"
            )


def _run_source(c, src, sources, sets, work, rows, dataset, out, config, device, progress) -> int:
    """This process's units of one cache, reading each layer once. Returns the number of fits."""
    mine = [s for cc, s in work.pairs if cc == c]
    part_sets = {name: [k for k, fs in enumerate(sets or []) if fs.source == c] for name in work.partition}
    part_sets = {n: ks for n, ks in part_sets.items() if ks and not partition_path(out, n).is_file()}
    todo_layer = {
        (name, layer): not unit_path(out, src.label, layer, name).is_file() for name in mine for layer in src.layers
    }
    todo_all = {name: config.all_layers and not unit_path(out, src.label, ALL, name).is_file() for name in mine}
    users = sorted(set(mine) | set(part_sets))
    if not any(todo_layer.values()) and not any(todo_all.values()) and not part_sets:
        return 0
    n_train = {name: len(rows[name].train) for name in users}
    acc = {name: Accumulator(sum(src.dims.values()) < n_train[name]) for name in mine if todo_all[name]}
    part_acc = {name: {k: Accumulator(False) for k in ks} for name, ks in part_sets.items()}
    image_rows = {name: {p: src.cache.rows(k) for p, k in rows[name].keys.items()} for name in users}
    fits = 0
    responses = _Responses(dataset, rows, device)
    steps = [(layer, name) for layer in src.layers for name in users]
    table = None
    for layer, name in track(steps, f"compare {src.label}", progress, len(steps)):
        in_sets = [k for k in part_sets.get(name, []) if layer in sets[k].layers]
        if not todo_layer.get((name, layer), False) and name not in acc and not in_sets:
            continue
        if table is None or table[0] != layer:
            table = None  # one layer in memory at a time
            table = (layer, *_read_layer(src, layer, users, image_rows, config.features))
        x = {p: table[2][torch.as_tensor(np.searchsorted(table[1], r))].to(device) for p, r in image_rows[name].items()}
        scaler = LayerScaler.fit(x["train"])
        z = {p: scaler(v) for p, v in x.items()}
        if todo_layer.get((name, layer), False):
            _solve_unit(z, scaler.weight, rows[name], responses, config, unit_path(out, src.label, layer, name))
            fits += 1
        if name in acc:
            acc[name].add(z, scaler.weight)
        for k in in_sets:
            part_acc[name][k].add(z, scaler.weight)
    table = None
    for name in users:  # what needed every layer of the cache
        if name in acc:
            _solve_all(acc.pop(name), rows[name], responses, config, unit_path(out, src.label, ALL, name))
            fits += 1
        for k, a in part_acc.pop(name, {}).items():
            _partition_store(out, name, k, a, src)
        if name in part_sets and all(_partition_kernel_file(out, name, k).is_file() for k in range(2)):
            _solve_partition(name, sets, sources, rows[name], dataset, out, config, device)
            fits += 3
    return fits


def _read_layer(src: Source, layer: str, users, image_rows, features: str) -> tuple[np.ndarray, torch.Tensor]:
    """(sorted cache rows, (n, d) reduced float32 features) of every image the users need."""
    need = np.unique(np.concatenate([r for name in users for r in image_rows[name].values()]))
    prefix = int(src.cache.attrs.get("num_prefix_tokens") or 0)
    out = torch.empty(len(need), src.dims[layer])
    for positions, block in src.cache.read_rows(layer, need, view=0):
        out[positions] = reduce_layer(block, features, prefix, layer)
    return need, out


class _Responses:
    """The responses (train, val and test parts) of the subject being solved, read on first use:
    one subject's responses in memory at a time."""

    def __init__(self, dataset, rows: dict[str, SubjectRows], device: torch.device):
        self.dataset, self.rows, self.device = dataset, rows, device
        self.held: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.held:
            self.held.clear()
            subject, r = self.dataset.subjects[name], self.rows[name]
            y = {"train": subject.responses("train", r.train), "val": subject.responses("train", r.val)}
            if r.test:
                y["test"] = subject.responses("test")
            self.held[name] = {p: torch.as_tensor(np.asarray(v, np.float32), device=self.device) for p, v in y.items()}
        return self.held[name]


def _alphas(config: CompareConfig, trace: float) -> np.ndarray:
    return check_alphas(config.alphas) if config.alphas else default_alphas(trace)


def _solve_unit(z: dict[str, torch.Tensor], weight: float, r: SubjectRows, responses, config, path: Path) -> None:
    """One layer's ridge exactly as fit-ridge solves a one-layer model: primal from one SVD when
    the layer is narrower than the training rows, else kernel ridge from one eigendecomposition."""
    y = responses.get(r.name)
    y_mean = y["train"].mean(0)
    yc = y["train"] - y_mean
    zt = z["train"]
    if zt.shape[1] < len(zt):
        X = zt * weight**0.5
        res = loo_ridge(X, None, yc, _alphas(config, float((X * X).sum())))
        coef = res.coef * weight**0.5
        pred = {p: y_mean + v @ coef for p, v in z.items() if p != "train"}
    else:
        K = zt @ zt.T * weight
        res = loo_ridge(None, K, yc, _alphas(config, float(K.trace())))
        pred = {p: y_mean + (v @ zt.T * weight) @ res.coef for p, v in z.items() if p != "train"}
    _write_scores(path, pred, y, r, res.best_alpha, "primal" if zt.shape[1] < len(zt) else "kernel")


def _solve_all(acc: Accumulator, r: SubjectRows, responses, config, path: Path) -> None:
    """All layers of a cache together, as fit-ridge fits them: primal on the concatenated weighted
    features when they are fewer than the training rows, else kernel ridge on the summed kernels."""
    y = responses.get(r.name)
    y_mean = y["train"].mean(0)
    yc = y["train"] - y_mean
    if acc.primal:
        X = {p: torch.cat(v, 1) for p, v in acc.parts.items()}
        res = loo_ridge(X["train"], None, yc, _alphas(config, float((X["train"] ** 2).sum())))
        pred = {p: y_mean + v @ res.coef for p, v in X.items() if p != "train"}
    else:
        K = acc.kernel
        res = loo_ridge(None, K["train"], yc, _alphas(config, float(K["train"].trace())))
        pred = {p: y_mean + k @ res.coef for p, k in K.items() if p != "train"}
    _write_scores(path, pred, y, r, res.best_alpha, "primal" if acc.primal else "kernel")


def _scores(pred: dict[str, torch.Tensor], y: dict[str, torch.Tensor], r: SubjectRows) -> dict[str, torch.Tensor]:
    out = {}
    for part, p in pred.items():
        p, t = p.cpu().double().numpy(), y[part].cpu().double().numpy()
        out[f"{part}_r2"] = torch.from_numpy(r2_score(p, t).astype(np.float32))
        out[f"{part}_r"] = torch.from_numpy(pearson_r(p, t).astype(np.float32))
        if part == "test" and r.ceiling is not None:  # the devkit's noise-normalized accuracy (%)
            score = noise_normalized_accuracy(out["test_r"].double().numpy(), r.ceiling)
            out["test_score"] = torch.from_numpy(score.astype(np.float32))
    return out


def _write_scores(path: Path, pred, y, r: SubjectRows, alpha: torch.Tensor, solver: str) -> None:
    tensors = _scores(pred, y, r) | {"alpha": alpha.float().cpu()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, tensors, {"solver": solver, "n_train": len(r.train), "n_val": len(r.val)})


def _partition_kernel_file(out: Path, subject: str, k: int) -> Path:
    return out / "units" / PARTITION / f".{subject}.{'AB'[k]}.safetensors"


def _partition_store(out: Path, subject: str, k: int, acc: Accumulator, src: Source) -> None:
    """Side k's kernels (train, val rows) of a subject, kept on disk until both sides are there
    (they may come from two caches, read in turn): removed when the partition is solved."""
    path = _partition_kernel_file(out, subject, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, {p: v for p, v in acc.kernel.items() if p in ("train", "val")}, {"source": src.label})


def _solve_partition(name, sets, sources, r: SubjectRows, dataset, out, config, device) -> None:
    """Validation R² per target of A, of B (leave-one-out ridge on each side's kernel) and of both
    (banded ridge: one kernel per side, per-target weights by himalaya's random search over
    `--cv` folds by image); unique and shared variance follow in the tables."""
    from blobenc.train.checkpoint import load_weights

    files = [_partition_kernel_file(out, name, k) for k in range(2)]
    if not all(f.is_file() for f in files):
        # this process owns the partition but not (all of) its caches' pairs: read the sides here
        for k, fs in enumerate(sets):
            if not files[k].is_file():
                _gather_side(k, fs, sources[fs.source], r, out, config, device)
    K = [load_weights(f) for f in files]
    K = [{p: v.to(device) for p, v in k.items()} for k in K]
    subject = dataset.subjects[name]
    y = {"train": subject.responses("train", r.train), "val": subject.responses("train", r.val)}
    y = {p: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device) for p, v in y.items()}
    _, image = np.unique(np.asarray(r.keys["train"]), return_inverse=True)  # folds by image, not by row
    tensors = partition_r2(K, y["train"], y["val"], image, config)
    save_weights(partition_path(out, name), tensors, {"a": sets[0].text, "b": sets[1].text})
    for f in files:
        f.unlink(missing_ok=True)


def partition_r2(
    kernels: list[dict[str, torch.Tensor]],
    y_train: torch.Tensor,
    y_val: torch.Tensor,
    images: np.ndarray,
    config: CompareConfig = CompareConfig(),
) -> dict[str, torch.Tensor]:
    """Validation R² per target of feature sets A and B alone and together, from each side's
    kernels {"train": (n, n), "val": (n_val, n)} (sum over its layers of Z Z^T / d on z-scored
    features). A, B: fit-ridge's leave-one-out ridge; A and B together: banded ridge (fit-ridge
    --banded: himalaya's random search over per-target weightings of the two kernels, `config.cv`
    folds that keep each image's rows together; `images` = an image id per training row). Also the
    weight of A per target. Targets are centred by their training mean. Needs set_ridge_backend."""
    y_mean = y_train.mean(0)
    yc = y_train - y_mean

    def r2(pred: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(r2_score(pred.cpu().double().numpy(), y_val.cpu().double().numpy()).astype(np.float32))

    out = {}
    for k, side in enumerate("ab"):
        res = loo_ridge(None, kernels[k]["train"], yc, _alphas(config, float(kernels[k]["train"].trace())))
        out[f"{side}_r2"] = r2(y_mean + kernels[k]["val"] @ res.coef)
    both = torch.stack([kernels[0]["train"], kernels[1]["train"]])
    alphas = _alphas(config, float(both.sum(0).trace()))
    folds = image_folds(images, config.cv, config.seed)
    dual, weights = banded_ridge(both, yc, alphas, folds, config.n_iter, config.seed)
    out["ab_r2"] = r2(y_mean + sum((kernels[k]["val"] @ dual) * weights[k] for k in range(2)))
    out["a_weight"] = (weights[0] / weights.sum(0)).float().cpu()
    return out


def _gather_side(k: int, fs: FeatureSet, src: Source, r: SubjectRows, out: Path, config, device) -> None:
    acc = Accumulator(False)
    image_rows = {p: src.cache.rows(keys) for p, keys in r.keys.items() if p in ("train", "val")}
    for layer in fs.layers:
        need, table = _read_layer(src, layer, [r.name], {r.name: image_rows}, config.features)
        x = {p: table[np.searchsorted(need, v)].to(device) for p, v in image_rows.items()}
        scaler = LayerScaler.fit(x["train"])
        acc.add({p: scaler(v) for p, v in x.items()}, scaler.weight)
    _partition_store(out, r.name, k, acc, src)


def compare_plan(sources, rows, dataset, config: CompareConfig, sets) -> MemoryPlan:
    """compare's peak from the shapes: one layer's reduced features for every image; per subject of
    a cache pass its responses (train, val, test; float32, a centred copy), the all-layers model's
    features or kernels and the partition's kernels, held across the cache's layers for every
    subject; the largest solve (float64 decomposition, one block of 4,096 targets, coefficients)."""
    n_images = max(len(s.cache.keys) for s in sources)
    d_max = max(d for s in sources for d in s.dims.values())
    d_all = max(sum(s.dims.values()) for s in sources)
    sizes = []
    for name, r in rows.items():
        n_rows = sum(len(k) for k in r.keys.values())
        sizes.append((len(r.train), n_rows, dataset.subjects[name].n_targets))
    n = max(a for a, _, _ in sizes)
    n_rows = max(b for _, b, _ in sizes)
    v = max(c for _, _, c in sizes)
    per_subject = (min(d_all, n) * n_rows * 4) if config.all_layers else 0
    per_subject += (2 * n * n_rows * 4) if sets else 0
    held = per_subject * len(rows)
    r_ = min(n, max(d_max, min(d_all, n)))
    solve = {
        "responses": 2 * n_rows * v * 4,
        "decomposition": 3 * n * n * 8 + 2 * n * r_ * 8,
        "target blocks": 4 * n * 4096 * 8,
        "coefficients": (r_ + n) * v * 4,
    }
    return MemoryPlan(
        "compare",
        {"baseline": BASELINE, "layer features": n_images * d_max * 4, "all-layers and partition": held},
        {"solve (largest subject)": solve},
    )
