"""Write blobenc/data/fsaverage5_patch.npz: where `blobenc synth` puts its targets on fsaverage.

For each hemisphere and each of fsaverage5's 10,242 vertices (the first 10,242 of any finer
fsaverage mesh): `dist`, an anisotropic angular distance on the registered sphere from the
occipital pole, stretched towards ventral temporal cortex (the n nearest vertices are a contiguous
occipito-temporal patch of n vertices); `theta`, the plain angle from the pole (radians: the
synthetic hierarchy runs along it, early visual areas at the pole); `phi`, the direction around
the pole (radians, 0 = towards ventral temporal cortex; its sign separates the two sides of the
axis). From the meshes nilearn ships (no download); float16, ~120 KB.

    python scripts/fsaverage_patch.py
"""

from pathlib import Path

import numpy as np
from nilearn import datasets

OUT = Path(__file__).resolve().parents[1] / "blobenc" / "data" / "fsaverage5_patch.npz"
# a point of ventral temporal cortex (fusiform gyrus) on the pial surface, lh; rh mirrors x
TEMPORAL = np.array([-38.0, -55.0, -18.0])


def main() -> None:
    meshes = datasets.load_fsaverage("fsaverage5")
    out = {}
    for hemi, part, sign in (("lh", "left", 1.0), ("rh", "right", -1.0)):
        sphere = np.asarray(meshes["sphere"].parts[part].coordinates, dtype=np.float64)
        pial = np.asarray(meshes["pial"].parts[part].coordinates, dtype=np.float64)
        u = sphere / np.linalg.norm(sphere, axis=1, keepdims=True)
        pole = u[np.argmin(pial[:, 1])]  # the most posterior point of the cortex
        target = u[np.argmin(np.linalg.norm(pial - TEMPORAL * [sign, 1, 1], axis=1))]
        axis = target - (target @ pole) * pole
        axis /= np.linalg.norm(axis)
        side = np.cross(pole, axis)
        theta = np.arccos(np.clip(u @ pole, -1, 1))
        tangent = u - (u @ pole)[:, None] * pole
        phi = np.arctan2(tangent @ side, tangent @ axis)
        along, across = theta * np.cos(phi), theta * np.sin(phi)
        dist = np.hypot(along / np.where(along > 0, 1.7, 0.8), across)
        out[f"{hemi}_dist"] = dist.astype(np.float16)
        out[f"{hemi}_theta"] = theta.astype(np.float16)
        out[f"{hemi}_phi"] = phi.astype(np.float16)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
