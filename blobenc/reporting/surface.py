"""Per-vertex values on the fsaverage5 surface, the mesh the report draws on.

fsaverage meshes are icosahedral subdivisions that keep the coarser mesh's vertices first: the
first 10,242 vertices of fsaverage (163,842 per hemisphere) are fsaverage5's, the first 2,562 of
any finer mesh are fsaverage4's, and so on. A subject's native vertices (its lh mask's vertices,
then its rh ones, each in ascending fsaverage index) therefore land on fsaverage5 by index when
the index is below 10,242; so do any layout's targets on an fsaverage surface. A space coarser
than fsaverage5 (the small synthetic data uses fsaverage4's 2,562) is brought up to it: each
added vertex takes the mean of its two nearest coarse vertices on the sphere, the edge it was
inserted on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from blobenc.errors import ReportError
from blobenc.reporting.runs import HEMIS

FSAVERAGE5 = 10242
NILEARN_HEMI = {"lh": "left", "rh": "right"}


def ico_size(order: int) -> int:
    """Vertices per hemisphere of an icosahedral mesh of this order (fsaverage5: order 5)."""
    return 10 * 4**order + 2


def is_ico_size(n: int) -> bool:
    return any(ico_size(k) == n for k in range(9))


def fsaverage_targets(subject, dataset) -> tuple[np.ndarray, int] | None:
    """A subject's targets as fsaverage vertex ids (the right hemisphere's after the left's) and the
    hemisphere size; None when the dataset's targets are not on an fsaverage surface."""
    if getattr(dataset, "surface", None) != "fsaverage":
        return None
    return np.asarray(subject.targets, dtype=np.int64), int(dataset.space_size) // 2


def to_fsaverage5(
    values: np.ndarray, targets: np.ndarray, hemi_size: int, nearest: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Per-target values (targets = fsaverage ids, rh ids offset by `hemi_size`) as {hemi: (10242,)}
    on fsaverage5, NaN where there is no target. A space coarser than fsaverage5 is brought up
    through `nearest` (`coarse_neighbours(hemi_size)`, computed when not given)."""
    values = np.asarray(values, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if values.shape != targets.shape:
        raise ReportError(f"{len(values)} values for {len(targets)} vertices: scores and data do not match")
    if not is_ico_size(hemi_size):
        raise ReportError(f"a hemisphere of {hemi_size} vertices is no fsaverage mesh; cannot draw maps")
    if hemi_size < FSAVERAGE5 and nearest is None:
        nearest = coarse_neighbours(hemi_size)
    out = {}
    for k, hemi in enumerate(HEMIS):
        inside = (targets >= k * hemi_size) & (targets < (k + 1) * hemi_size)
        idx, part = targets[inside] - k * hemi_size, values[inside]
        if hemi_size >= FSAVERAGE5:
            full = np.full(FSAVERAGE5, np.nan)
            keep = idx < FSAVERAGE5
            full[idx[keep]] = part[keep]
        else:
            coarse = np.full(hemi_size, np.nan)
            coarse[idx] = part
            full = upsample(coarse, nearest[hemi])
        out[hemi] = full
    return out


def upsample(coarse: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Values on the first len(coarse) vertices of an icosahedral mesh brought to the finer one:
    finer vertex i (after the coarse ones) takes the mean of the finite values at `nearest[i]`."""
    pair = coarse[nearest]
    count = np.isfinite(pair).sum(1)
    fine = np.where(count > 0, np.nansum(pair, 1) / np.maximum(count, 1), np.nan)
    return np.concatenate([coarse, fine])


@lru_cache(maxsize=4)
def coarse_neighbours(hemi_size: int) -> dict[str, np.ndarray]:
    """hemi -> (10242 - hemi_size, 2): the two nearest of the first `hemi_size` fsaverage5 vertices
    (on the sphere) of every later one."""
    from sklearn.neighbors import KDTree

    out = {}
    for hemi, mesh in fsaverage5()["sphere"].items():
        xyz = np.asarray(mesh.coordinates, dtype=np.float64)
        out[hemi] = KDTree(xyz[:hemi_size]).query(xyz[hemi_size:], k=2)[1]
    return out


def mean_maps(maps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean over subjects per vertex, ignoring the subjects that lack the vertex (NaN)."""
    out = {}
    for hemi in HEMIS:
        stack = np.stack([m[hemi] for m in maps])
        count = np.isfinite(stack).sum(0)
        out[hemi] = np.where(count > 0, np.nansum(stack, 0) / np.maximum(count, 1), np.nan)
    return out


@lru_cache(maxsize=1)
def fsaverage5() -> dict:
    """nilearn's fsaverage5 meshes (shipped with nilearn, no download) and sulcal depth:
    {"inflated"|"flat"|"sphere": {hemi: PolyMesh part}, "sulc": {hemi: (10242,)}}."""
    from nilearn import datasets

    meshes = datasets.load_fsaverage("fsaverage5")
    sulc = datasets.load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal")
    out = {kind: {h: meshes[kind].parts[NILEARN_HEMI[h]] for h in HEMIS} for kind in ("inflated", "flat", "sphere")}
    out["sulc"] = {h: np.asarray(sulc.data.parts[NILEARN_HEMI[h]], dtype=np.float64) for h in HEMIS}
    return out


@lru_cache(maxsize=4)
def flat_raster(hemi: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat patch of `hemi` rasterized once: the face under each pixel ((height, width) ints,
    -1 off the patch; row 0 at the top) and each face's sulcal depth scaled to [0, 1]. Small maps
    are then coloured by indexing, with no polygons drawn."""
    from matplotlib.tri import Triangulation

    mesh = fsaverage5()["flat"][hemi]
    xy = np.asarray(mesh.coordinates, dtype=np.float64)[:, :2]
    faces = np.asarray(mesh.faces)
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    height = max(1, round(width * (y1 - y0) / (x1 - x0)))
    gx, gy = np.meshgrid(np.linspace(x0, x1, width), np.linspace(y1, y0, height))
    face = Triangulation(xy[:, 0], xy[:, 1], faces).get_trifinder()(gx, gy)
    sulc = fsaverage5()["sulc"][hemi][faces].mean(1)
    return face, (sulc - sulc.min()) / (np.ptp(sulc) or 1)


def face_values(values: np.ndarray, hemi: str, kind: str = "flat") -> np.ndarray:
    """A per-vertex map as per-face values (mean of a face's 3 vertices; NaN if any is missing)."""
    return np.asarray(values)[np.asarray(fsaverage5()[kind][hemi].faces)].mean(1)
