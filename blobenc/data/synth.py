"""A synthetic dataset in the Algonauts 2023 layout, from a known generative model.

The model (docs/synthetic.md has the full description):

* Images: 1/f^alpha coloured noise with a few flat-coloured ellipses and
  rectangles, so they have natural-image-like spectra and edges.
* Image features: six 16x16 maps per image (luminance, red-green, blue-yellow,
  local contrast, horizontal and vertical edge energy).
* Vertices: the group vertices are a contiguous occipito-temporal patch of
  fsaverage; each has a depth s in [0, 1] (its angle from the occipital pole)
  and a direction phi around the pole. Its Gaussian receptive field (centre at
  polar angle phi, size growing with s) and feature tuning vary smoothly with
  (s, phi). Early vertices (small s) are linear in local features; late ones
  in nonlinear, spatially pooled features, so early and late ROIs prefer early
  and late layers of a trunk. Each ROI group has its own labels on the patch.
  Subjects share these tunings plus a smaller subject-specific smooth
  perturbation, and each vertex has a signal gain (some are pure noise, giving
  zero noise ceilings).
* Responses: three noisy repeats per image; the files hold their average, and
  the noise ceiling is computed from the test repeats as the NSD papers do.
* Images: a pool shared by all subjects (as NSD's shared 1000) plus images
  unique to each subject; the test images are shared images.

`layout="generic"` writes the same model in the generic layout (docs/data.md): one
row per presentation (single-trial responses, images repeated across rows), one
subject with fewer targets (targets.npy), noise ceilings of single trials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from blobenc.data.algonauts import HEMIS, ROI_GROUPS
from blobenc.data.generic import GENERIC_FORMAT
from blobenc.errors import DataError

logger = logging.getLogger(__name__)

N_REPEATS = 3
_GRID = 16
_N_FEATURES = 6
_N_UNITS = (16, 24)  # late features: units of the first and second nonlinear stage
N_OBJECT = 7  # object_features
# The most of a vertex's signal from what the image's objects are (the deepest vertices): features
# that no random-init trunk encodes, so kept to the deepest quarter of the patch: with them in the
# deepest 40% the tests' tiny random-init trunks no longer beat ridge on the 60-image data.
OBJECT_SHARE = 1.0
# The most of a vertex's signal from the late (nonlinear) features: at 0.7 the tests' tiny random-init
# trunks no longer learned the 60-image data (fit-head's and fit-ridge's median R² fell below 0).
LATE_SHARE = 0.5
_FS5 = 10242  # fsaverage5's vertices: the first of any finer fsaverage mesh
PATCH_FILE = Path(__file__).with_name("fsaverage5_patch.npz")  # scripts/fsaverage_patch.py writes it
# Real per-hemisphere vertex counts of the Algonauts 2023 challenge data; subjects 6 and 8 drop some.
_FULL = {"fsaverage": 163842, "group": (19004, 20544), "subj06": (18978, 20220), "subj08": (18981, 20530)}
_SMALL = {"fsaverage": 2562, "group": (300, 340), "subj06": (292, 322), "subj08": (294, 331)}
_ROI_NAMES = {
    "prf-visualrois": ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"],
    "floc-bodies": ["EBA", "FBA-1", "FBA-2", "mTL-bodies"],
    "floc-faces": ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"],
    "floc-places": ["OPA", "PPA", "RSC"],
    "floc-words": ["OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"],
    "streams": ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"],
}


@dataclass(frozen=True)
class SynthConfig:
    subjects: int = 8
    train_images: int = 120
    test_images: int = 40
    vertices: str = "small"
    image_size: int = 192
    seed: int = 0
    layout: str = "algonauts"  # or "generic"


def make_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8: 1/f coloured noise with a few flat shapes on top; and what those
    shapes are (object_features)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    alpha = rng.uniform(1.6, 2.4)
    channels = []
    for _ in range(3):
        spectrum = f ** (-alpha / 2) * np.exp(2j * np.pi * rng.random(f.shape))
        spectrum[0, 0] = 0
        channels.append(np.fft.irfft2(spectrum, s=(size, size)))
    img = np.stack(channels, -1)
    img = img @ rng.normal(0.6, 0.3, (3, 3))  # correlated colour channels, as in natural scenes
    img = (img - img.mean()) / (img.std() + 1e-8) * 0.18 + rng.uniform(0.3, 0.7, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    owner = np.full((size, size), -1)  # which shape each pixel shows (later shapes cover earlier ones)
    shapes = []
    for k in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        ry, rx = rng.uniform(0.05, 0.25, 2)
        ellipse = rng.random() < 0.5
        inside = (
            (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
            if ellipse
            else ((np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx))
        )
        img[inside] = rng.uniform(0, 1, 3)
        owner[inside] = k
        shapes.append((ellipse, max(ry / rx, rx / ry)))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), object_features(shapes, owner)


def object_features(shapes: list[tuple[bool, float]], owner: np.ndarray) -> np.ndarray:
    """(N_OBJECT,) what an image's shapes are, wherever they are and whatever their colour: the
    number of ellipses and of rectangles, the visible area of each kind and its square root, and
    the shapes' mean elongation. Object-level properties: a trained network's late layers encode
    them, its early layers (and a random-init network's layers) hardly (docs/synthetic.md)."""
    area = {kind: sum((owner == k).mean() for k, (e, _) in enumerate(shapes) if e == kind) for kind in (True, False)}
    n_ellipses = sum(e for e, _ in shapes)
    return np.array(
        [
            *(n_ellipses, len(shapes) - n_ellipses, area[True], area[False]),
            *(np.sqrt(area[True]), np.sqrt(area[False]), np.mean([el for _, el in shapes])),
        ]
    )


def image_features(img: np.ndarray) -> np.ndarray:
    """(6, 16, 16) feature maps the responses are a linear function of."""
    x = img.astype(np.float64) / 255
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    lum = (r + g + b) / 3
    dy = np.abs(np.diff(lum, axis=0, append=lum[-1:]))
    dx = np.abs(np.diff(lum, axis=1, append=lum[:, -1:]))
    maps = np.stack([lum, r - g, b - (r + g) / 2, np.abs(lum - lum.mean()), dy, dx])
    size = img.shape[0] - img.shape[0] % _GRID
    block = size // _GRID
    return maps[:, :size, :size].reshape(_N_FEATURES, _GRID, block, _GRID, block).mean((2, 4))


def _smooth(rng: np.random.Generator, s: np.ndarray, n: int, n_basis: int = 6) -> np.ndarray:
    """(len(s), n) random functions of s, smooth along the sheet."""
    basis = np.cos(np.pi * np.arange(n_basis)[None, :] * s[:, None])
    coef = rng.normal(0, 1, (n_basis, n)) / (1 + np.arange(n_basis))[:, None]
    return basis @ coef


def _vertex_weights(rng: np.random.Generator, s: np.ndarray, hemi_phase: float) -> np.ndarray:
    """(n_vertices, 6 * 16 * 16) linear weights on the feature maps: receptive field x tuning."""
    cy = 0.5 + 0.35 * np.sin(2 * np.pi * 2 * s + hemi_phase) + 0.05 * _smooth(rng, s, 1)[:, 0]
    cx = 0.5 + 0.35 * np.cos(2 * np.pi * 3 * s) + 0.05 * _smooth(rng, s, 1)[:, 0]
    sigma = 0.07 + 0.2 * s
    grid = (np.arange(_GRID) + 0.5) / _GRID
    rf = np.exp(
        -((grid[None, :, None] - cy[:, None, None]) ** 2 + (grid[None, None, :] - cx[:, None, None]) ** 2)
        / (2 * sigma[:, None, None] ** 2)
    )
    rf /= rf.sum((1, 2), keepdims=True)
    tuning = _smooth(rng, s, _N_FEATURES)
    return (tuning[:, :, None, None] * rf[:, None]).reshape(len(s), -1)


def _noise_ceiling(repeats: np.ndarray, n_avg: int | None = None) -> np.ndarray:
    """NSD-style ceiling (a fraction) of the mean of `n_avg` repeats (default: all of them):
    (n_images, n_reps, n_vertices) in."""
    n_reps = repeats.shape[1]
    n_avg = n_reps if n_avg is None else n_avg
    noise_var = repeats.var(axis=1, ddof=1).mean(0)
    total_var = repeats.reshape(-1, repeats.shape[2]).var(0)
    signal_var = np.maximum(total_var - noise_var, 0)
    ncsnr2 = signal_var / np.maximum(noise_var, 1e-12)
    return (ncsnr2 / (ncsnr2 + 1 / n_avg)).astype(np.float32)


def _masks(rng: np.random.Generator, n_subjects: int, spec: dict) -> tuple[dict, list[dict]]:
    """Group fsaverage indices per hemi and each subject's 0/1 fsaverage mask (the generic layout's
    random scatter; the Algonauts layout places its group vertices with `_patch_vertices`)."""
    group = {
        h: np.sort(rng.choice(spec["fsaverage"], n, replace=False)) for h, n in zip(HEMIS, spec["group"], strict=True)
    }
    return group, _subject_masks(rng, n_subjects, spec, group)


def _subject_masks(rng: np.random.Generator, n_subjects: int, spec: dict, group: dict) -> list[dict]:
    """Each subject's 0/1 fsaverage mask: a subset of the group vertices (subjects 6 and 8 lack some)."""
    subject_masks = []
    for k in range(1, n_subjects + 1):
        counts = spec.get(f"subj{k:02d}", spec["group"])
        masks = {}
        for hemi, n in zip(HEMIS, counts, strict=True):
            keep = np.sort(rng.choice(len(group[hemi]), n, replace=False))
            mask = np.zeros(spec["fsaverage"], dtype=np.int32)
            mask[group[hemi][keep]] = 1
            masks[hemi] = mask
        subject_masks.append(masks)
    return subject_masks


def _roi_labels(n: int) -> dict[str, np.ndarray]:
    """Contiguous ROI segments along a sheet of n targets (label 0 = Unknown between them): the
    generic layout's ROIs, which have no surface."""
    out = {}
    s = np.arange(n) / max(n, 1)
    for g, names in _ROI_NAMES.items():
        k = len(names)
        segment = np.minimum((s * k).astype(int), k - 1)
        within = s * k - segment
        out[g] = np.where(within < 0.8, segment + 1, 0).astype(np.int32)
    return out


def _patch_vertices(rng: np.random.Generator, spec: dict) -> tuple[dict, dict, dict]:
    """The group vertices as a contiguous occipito-temporal patch of fsaverage (the n vertices
    nearest the occipital pole in PATCH_FILE's stretched distance), with each one's depth s in
    [0, 1] (angle from the pole over the patch's largest) and direction phi around the pole.

    Only fsaverage5's vertices (the first 10,242 of any finer mesh) have positions here: on a finer
    mesh the patch takes its share of them and the rest of its vertices from the finer mesh's others,
    each with the place (plus a little jitter) of a random patch vertex. Maps are drawn on
    fsaverage5, so they show the patch whole."""
    size = spec["fsaverage"]
    group, depth, phi = {}, {}, {}
    with np.load(PATCH_FILE) as z:
        known = {k: z[k].astype(np.float64) for k in z.files}
    for hemi, n in zip(HEMIS, spec["group"], strict=True):
        n_known = n if size <= _FS5 else max(1, round(n * _FS5 / size))
        if n_known > min(size, _FS5):
            raise DataError(f"a patch of {n} vertices does not fit a {size}-vertex hemisphere")
        idx = np.argsort(known[f"{hemi}_dist"][: min(size, _FS5)], kind="stable")[:n_known]
        theta, direction = known[f"{hemi}_theta"][idx], known[f"{hemi}_phi"][idx]
        if n > n_known:
            extra = rng.choice(np.arange(_FS5, size), n - n_known, replace=False)
            src = rng.integers(0, n_known, n - n_known)
            idx = np.concatenate([idx, extra])
            theta = np.concatenate([theta, theta[src] * (1 + 0.02 * rng.standard_normal(len(src)))])
            direction = np.concatenate([direction, direction[src] + 0.05 * rng.standard_normal(len(src))])
        order = np.argsort(idx)
        group[hemi], depth[hemi], phi[hemi] = idx[order], theta[order] / theta.max(), direction[order]
    return group, depth, phi


def _blob(xy: np.ndarray, centre: int, size: int, taken: np.ndarray) -> np.ndarray:
    """The `size` free vertices nearest vertex `centre` (in the patch's plane): a contiguous blob."""
    d = np.linalg.norm(xy - xy[centre], axis=1)
    d[taken] = np.inf
    return np.argsort(d, kind="stable")[:size]


def _patch_rois(seed: int, s: np.ndarray, phi: np.ndarray) -> dict[str, np.ndarray]:
    """Labels of each ROI group on a hemisphere's patch (0 = Unknown), each group its own:
    prf-visualrois in bands of depth at the pole (V1 < V2 < V3, ventral and dorsal halves, hV4 on
    the ventral side beyond V3); streams by depth (early, mid, late) and side (ventral, lateral,
    parietal); each category-selective group (floc-*) as blobs at depths beyond the early areas,
    placed by a generator of its own, so faces, words, bodies and places lie apart."""
    n = len(s)
    ventral = np.cos(phi)
    out = {}
    v = np.zeros(n, np.int32)
    for k, (lo, hi) in enumerate(((0.0, 0.15), (0.15, 0.26), (0.26, 0.36))):
        band = (s >= lo) & (s < hi)
        v[band & (ventral >= 0)] = 2 * k + 1
        v[band & (ventral < 0)] = 2 * k + 2
    v[(s >= 0.36) & (s < 0.48) & (ventral > 0.3)] = 7
    out["prf-visualrois"] = v
    side = np.where(ventral > 0.5, 0, np.where(ventral < -0.5, 2, 1))  # ventral, lateral, parietal
    out["streams"] = np.where(s < 0.3, 1, np.where(s < 0.55, 2 + side, 5 + side)).astype(np.int32)
    xy = np.stack([s * np.cos(phi), s * np.sin(phi)], 1)
    late = np.flatnonzero(s >= 0.35)
    for j, g in enumerate(("floc-bodies", "floc-faces", "floc-places", "floc-words")):
        rng = np.random.default_rng([seed, 77, j])
        labels = np.zeros(n, np.int32)
        for k in range(len(_ROI_NAMES[g])):
            size = max(1, round(n * rng.uniform(0.02, 0.05)))
            if len(late):
                labels[_blob(xy, int(rng.choice(late)), size, labels > 0)] = k + 1
        out[g] = labels
    return out


def _smooth2(rng: np.random.Generator, s: np.ndarray, phi: np.ndarray, n: int, n_basis: int = 4) -> np.ndarray:
    """(len(s), n) random functions smooth in depth s and direction phi on the patch."""
    basis = np.stack(
        [np.cos(np.pi * k * s) * t for k in range(n_basis) for t in (np.ones_like(phi), np.cos(phi), np.sin(phi))], 1
    )
    scale = np.repeat(1 / (1 + np.arange(n_basis)), 3)
    return basis @ (rng.normal(0, 1, (basis.shape[1], n)) * scale[:, None])


def _early_weights(rng: np.random.Generator, s: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """(n_vertices, 6 * 16 * 16) linear weights on the local feature maps: a receptive field at
    polar angle phi whose eccentricity and size grow with depth, times a tuning over the maps."""
    ecc = np.clip(0.06 + 0.3 * s + 0.03 * _smooth2(rng, s, phi, 1)[:, 0], 0, 0.45)
    cy, cx = 0.5 + ecc * np.cos(phi), 0.5 + ecc * np.sin(phi)
    sigma = 0.1 + 0.17 * s
    grid = (np.arange(_GRID) + 0.5) / _GRID
    rf = np.exp(
        -((grid[None, :, None] - cy[:, None, None]) ** 2 + (grid[None, None, :] - cx[:, None, None]) ** 2)
        / (2 * sigma[:, None, None] ** 2)
    )
    rf /= rf.sum((1, 2), keepdims=True)
    tuning = _smooth2(rng, s, phi, _N_FEATURES)
    return (tuning[:, :, None, None] * rf[:, None]).reshape(len(s), -1)


def late_features(x: np.ndarray, units: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(n, 24) nonlinear, spatially pooled features of standardized local features x
    (n, 6 * 16 * 16): two stages of random linear units, each rectified (the second squared) and
    pooled (2 x 2 blocks, then the whole image), as deeper layers of a network compute."""
    a1, a2 = units
    maps = x.reshape(len(x), _N_FEATURES, _GRID, _GRID)
    h = np.maximum(np.einsum("jc,nchw->njhw", a1, maps), 0)
    h = h.reshape(len(x), len(a1), _GRID // 2, 2, _GRID // 2, 2).mean((3, 5))
    h = (h - h.mean((0, 2, 3), keepdims=True)) / (h.std((0, 2, 3), keepdims=True) + 1e-8)
    return (np.maximum(np.einsum("kj,njhw->nkhw", a2, h), 0) ** 2).mean((2, 3))


def _late_share(s: np.ndarray) -> np.ndarray:
    """How much of a vertex's signal comes from the late features: 0 up to depth 0.2, rising to
    LATE_SHARE beyond 0.7 (the rest stays linear in the local features, with large receptive fields)."""
    t = np.clip((s - 0.2) / 0.5, 0, 1)
    return LATE_SHARE * t * t * (3 - 2 * t)


def _object_share(s: np.ndarray) -> np.ndarray:
    """How much of a vertex's signal comes from the object features: 0 up to depth 0.55 (where the
    late streams start), rising to OBJECT_SHARE (all of it) at 0.85 (the rest split between the
    local and the nonlinear pooled features as _late_share says)."""
    t = np.clip((s - 0.55) / 0.3, 0, 1)
    return OBJECT_SHARE * t * t * (3 - 2 * t)


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-8)


def write_synthetic(out: Path | str, config: SynthConfig = SynthConfig(), *, progress: bool = False) -> Path:
    """Write a synthetic dataset in the Algonauts 2023 layout (or, with `config.layout="generic"`,
    the generic layout) to `out` and return it."""
    from blobenc.progress import track  # lazy: rich is only needed when writing

    out = Path(out)
    if config.layout not in ("algonauts", "generic"):
        raise DataError(f"--layout must be 'algonauts' or 'generic', got {config.layout!r}")
    if config.vertices not in ("small", "full"):
        raise DataError(f"--vertices must be 'small' or 'full', got {config.vertices!r}")
    if not 1 <= config.subjects <= 99:
        raise DataError(f"--subjects must be between 1 and 99, got {config.subjects}")
    if config.train_images < 2 or config.test_images < 2:
        raise DataError("--train-images and --test-images must be at least 2")
    if config.image_size < _GRID:
        raise DataError(f"--image-size must be at least {_GRID}, got {config.image_size}")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: folder exists and is not empty; choose a new folder")
    spec = _FULL if config.vertices == "full" else _SMALL
    if config.layout == "generic":
        return _write_generic(out, config, spec, progress)
    rng = np.random.default_rng(config.seed)

    # Image pools: a shared pool seen by every subject (train part + test part) and per-subject images.
    n_shared_train = config.train_images // 3
    n_unique = config.train_images - n_shared_train
    n_total = n_shared_train + config.test_images + config.subjects * n_unique
    nsd_ids = rng.choice(73000, size=n_total, replace=False)
    shared_train = nsd_ids[:n_shared_train]
    test_ids = nsd_ids[n_shared_train : n_shared_train + config.test_images]
    unique = nsd_ids[n_shared_train + config.test_images :].reshape(config.subjects, n_unique)

    features: dict[int, np.ndarray] = {}
    objects: dict[int, np.ndarray] = {}
    image_dir = out / ".images"  # render each unique image once, then hard-link or copy it
    image_dir.mkdir(parents=True)
    for nsd in track(nsd_ids.tolist(), "rendering images", progress):
        img, objects[nsd] = make_image(np.random.default_rng([config.seed, nsd]), config.image_size)
        Image.fromarray(img).save(image_dir / f"{nsd}.png", compress_level=1)
        features[nsd] = image_features(img).ravel()

    group, depth, phi = _patch_vertices(rng, spec)
    subject_masks = _subject_masks(rng, config.subjects, spec, group)
    fs_labels = {}  # ROI labels over the fsaverage vertices, per hemi and group
    for hemi in HEMIS:
        for g, labels in _patch_rois(config.seed, depth[hemi], phi[hemi]).items():
            fs_labels.setdefault(hemi, {})[g] = np.zeros(spec["fsaverage"], np.int32)
            fs_labels[hemi][g][group[hemi]] = labels
    # Shared weights and gains over the group vertices; subjects add a smaller perturbation.
    shared_early, shared_late, shared_objects, gain = {}, {}, {}, {}
    for hemi in HEMIS:
        s, ph = depth[hemi], phi[hemi]
        shared_early[hemi] = _early_weights(rng, s, ph)
        shared_late[hemi] = _smooth2(rng, s, ph, _N_UNITS[1])
        shared_objects[hemi] = _smooth2(rng, s, ph, N_OBJECT)
        gain[hemi] = np.clip(0.2 + 0.9 * _smooth2(rng, s, ph, 1)[:, 0] ** 2, 0, 1.5) * (rng.random(len(s)) > 0.05)
    all_feats = np.stack([features[i] for i in nsd_ids.tolist()])
    feat_mean, feat_std = all_feats.mean(0), all_feats.std(0) + 1e-8
    units = (rng.normal(0, 1, (_N_UNITS[0], _N_FEATURES)), rng.normal(0, 1, (_N_UNITS[1], _N_UNITS[0])))
    late = late_features((all_feats - feat_mean) / feat_std, units)
    late = dict(zip(nsd_ids.tolist(), _standardize(late), strict=True))
    shapes = _standardize(np.stack([objects[i] for i in nsd_ids.tolist()]))
    objects = dict(zip(nsd_ids.tolist(), shapes, strict=True))

    for k, masks in enumerate(track(subject_masks, "writing subjects", progress), start=1):
        sdir = out / f"subj{k:02d}"
        srng = np.random.default_rng([config.seed, 1000 + k])
        train_ids = np.concatenate([shared_train, unique[k - 1]])
        srng.shuffle(train_ids)
        for split, ids in (("train", train_ids), ("test", test_ids)):
            folder = sdir / ("training_split/training_images" if split == "train" else "test_split/test_images")
            folder.mkdir(parents=True)
            for row, nsd in enumerate(ids.tolist(), start=1):
                _link(image_dir / f"{nsd}.png", folder / f"{split}-{row:04d}_nsd-{nsd:05d}.png")
        (sdir / "training_split/training_fmri").mkdir(parents=True)
        (sdir / "test_split/test_fmri").mkdir(parents=True)
        (sdir / "test_split/noise_ceiling").mkdir(parents=True)
        (sdir / "roi_masks").mkdir(parents=True)
        for hemi in HEMIS:
            keep = np.searchsorted(group[hemi], np.flatnonzero(masks[hemi]))
            s, ph = depth[hemi][keep], phi[hemi][keep]
            w_early = shared_early[hemi][keep] + 0.35 * _early_weights(srng, s, ph)
            w_late = shared_late[hemi][keep] + 0.35 * _smooth2(srng, s, ph, _N_UNITS[1])
            w_objects = shared_objects[hemi][keep] + 0.35 * _smooth2(srng, s, ph, N_OBJECT)
            share = _late_share(s)
            object_share = _object_share(s)
            for split, ids in (("train", train_ids), ("test", test_ids)):
                x = (np.stack([features[j] for j in ids.tolist()]) - feat_mean) / feat_std
                xl = np.stack([late[j] for j in ids.tolist()])
                xo = np.stack([objects[j] for j in ids.tolist()])
                # early vertices from the local features, later ones from the nonlinear pooled ones,
                # the deepest from the objects
                signal = np.cos(np.pi / 2 * share) * _standardize(x @ w_early.T)
                signal += np.sin(np.pi / 2 * share) * _standardize(xl @ w_late.T)
                signal = np.sqrt(1 - object_share) * signal + np.sqrt(object_share) * _standardize(xo @ w_objects.T)
                signal = _standardize(signal) * gain[hemi][keep]
                if split == "test":  # its repeats give the noise ceiling
                    repeats = signal[:, None, :] + srng.normal(0, 1, (len(ids), N_REPEATS, len(keep)))
                    fmri = repeats.mean(1).astype(np.float32)
                else:
                    fmri = _mean_of_repeats(srng, signal)
                name = (
                    "training_split/training_fmri/{}_training_fmri.npy"
                    if split == "train"
                    else "test_split/test_fmri/{}_test_fmri.npy"
                )
                np.save(sdir / name.format(hemi), fmri)
                if split == "test":
                    np.save(sdir / f"test_split/noise_ceiling/{hemi}_noise_ceiling.npy", _noise_ceiling(repeats))
            np.save(sdir / f"roi_masks/{hemi}.all-vertices_fsaverage_space.npy", masks[hemi])
            for g in ROI_GROUPS:
                labels = fs_labels[hemi][g]
                np.save(sdir / f"roi_masks/{hemi}.{g}_fsaverage_space.npy", labels * masks[hemi])
                np.save(sdir / f"roi_masks/{hemi}.{g}_challenge_space.npy", labels[masks[hemi] == 1])
        for g in ROI_GROUPS:
            mapping = {0: "Unknown"} | {j + 1: n for j, n in enumerate(_ROI_NAMES[g])}
            np.save(sdir / f"roi_masks/mapping_{g}.npy", mapping)
    for path in image_dir.iterdir():
        path.unlink()
    image_dir.rmdir()
    logger.info("wrote %d subjects, %d unique images to %s", config.subjects, n_total, out)
    return out


def _mean_of_repeats(rng: np.random.Generator, signal: np.ndarray, rows: int = 256) -> np.ndarray:
    """float32 mean of N_REPEATS noisy repeats of each row of `signal`, drawn a block of rows at a
    time: the same draws as one (n, N_REPEATS, V) call, whose float64 array is 4.7 GB per
    hemisphere at the full NSD size."""
    out = np.empty(signal.shape, np.float32)
    for i in range(0, len(signal), rows):
        block = signal[i : i + rows]
        out[i : i + rows] = (block[:, None, :] + rng.normal(0, 1, (len(block), N_REPEATS, block.shape[1]))).mean(1)
    return out


def _link(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:  # filesystems without hard links
        dst.write_bytes(src.read_bytes())


def _write_generic(out: Path, config: SynthConfig, spec: dict, progress: bool) -> Path:
    """The generative model above in the generic layout: rows are single presentations."""
    import csv
    import json

    import yaml

    from blobenc.progress import track

    rng = np.random.default_rng(config.seed)
    names = [f"sub-{k:02d}" for k in range(1, config.subjects + 1)]
    n_shared = config.train_images // 3
    n_unique = config.train_images - n_shared
    n_total = n_shared + config.test_images + config.subjects * n_unique
    ids = rng.choice(73000, size=n_total, replace=False).tolist()
    shared = [f"shared/img-{i:05d}.png" for i in ids[:n_shared]]
    test = [f"test/img-{i:05d}.png" for i in ids[n_shared : n_shared + config.test_images]]
    start = n_shared + config.test_images
    unique = [
        [f"{name}/img-{i:05d}.png" for i in ids[start + k * n_unique : start + (k + 1) * n_unique]]
        for k, name in enumerate(names)
    ]
    features: dict[str, np.ndarray] = {}
    all_keys = shared + test + [key for keys in unique for key in keys]  # in the order of `ids`
    for key, i in track(list(zip(all_keys, ids, strict=True)), "rendering images", progress):
        img, _ = make_image(np.random.default_rng([config.seed, i]), config.image_size)
        path = out / "images" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, compress_level=1)
        features[key] = image_features(img).ravel()
    all_feats = np.stack(list(features.values()))
    feat_mean, feat_std = all_feats.mean(0), all_feats.std(0) + 1e-8

    space = sum(spec["group"])
    s = np.arange(space) / space
    shared_w = _vertex_weights(rng, s, 0.0)
    gain = np.clip(0.2 + 0.9 * _smooth(rng, s, 1)[:, 0] ** 2, 0, 1.5) * (rng.random(space) > 0.05)
    roi_names = _ROI_NAMES["streams"]
    rois = _roi_labels(space)["streams"]
    meta = {"format": GENERIC_FORMAT, "name": f"blobenc synthetic (seed {config.seed})", "images": "images"}
    meta["space"] = space
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))

    for k, name in enumerate(track(names, "writing subjects", progress), start=1):
        sdir = out / "subjects" / name
        sdir.mkdir(parents=True)
        srng = np.random.default_rng([config.seed, 2000 + k])
        targets = np.arange(space)
        if k == 2:  # one subject lacks some targets, as subjects 6 and 8 of NSD do
            targets = np.sort(srng.choice(space, space - max(1, space // 12), replace=False))
            np.save(sdir / "targets.npy", targets.astype(np.int64))
        w = shared_w[targets] + 0.35 * _vertex_weights(srng, s[targets], 0.3 * k)
        train_keys = shared + unique[k - 1]
        # presentations: each training image 1 to 3 times, each test image N_REPEATS times; shuffled
        train_rows = [key for key in train_keys for _ in range(int(srng.integers(1, 4)))]
        train_rows = [train_rows[i] for i in srng.permutation(len(train_rows))]
        test_rows = [key for key in test for _ in range(N_REPEATS)]
        test_rows = [test_rows[i] for i in srng.permutation(len(test_rows))]
        x = (np.stack([features[key] for key in train_keys + test]) - feat_mean) / feat_std
        sig = x @ w.T
        sig = (sig - sig.mean(0)) / (sig.std(0) + 1e-8) * gain[targets]
        signal = dict(zip(train_keys + test, sig, strict=True))
        for split, rows in (("train", train_rows), ("test", test_rows)):
            y = (np.stack([signal[key] for key in rows]) + srng.normal(0, 1, (len(rows), len(targets)))).astype(
                np.float32
            )
            np.save(sdir / f"{split}.npy", y)
            with (sdir / f"{split}.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image"])
                writer.writerows([key] for key in rows)
        # the ceiling of a single presentation, from the test rows grouped by image (N_REPEATS each)
        order = np.argsort(np.asarray(test_rows), kind="stable")
        repeats = y[order].reshape(len(test), N_REPEATS, len(targets)).astype(np.float64)
        np.save(sdir / "noise_ceiling.npy", _noise_ceiling(repeats, n_avg=1))
        np.save(sdir / "rois.npy", rois[targets])
        (sdir / "rois.json").write_text(json.dumps({str(j + 1): n for j, n in enumerate(roi_names)}, indent=1))
    logger.info("wrote %d subjects, %d unique images to %s (generic layout)", config.subjects, n_total, out)
    return out
