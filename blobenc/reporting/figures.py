"""Figure functions: each takes plain data and returns a matplotlib Figure (Agg, no pyplot state).

The page (blobenc.reporting.page) decides what to draw; nothing here reads files except the fsaverage5
meshes nilearn ships.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from blobenc.reporting.runs import HEMIS
from blobenc.reporting.surface import face_values, flat_raster, fsaverage5

# inflated views drawn left to right: the left hemisphere's outside, inside, underside, then the right's mirrored
INFLATED_VIEWS = (
    ("lh", "lateral"),
    ("lh", "medial"),
    ("lh", "ventral"),
    ("rh", "ventral"),
    ("rh", "medial"),
    ("rh", "lateral"),
)
FLAT_VIEW = (90, 270)  # looking down on the flat patch: dorsal up, occipital pole towards the midline
FLAT_ZOOM = 1.3  # the flat patch fills its panel at this 3D-axes zoom
SUBJECT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def to_png(fig: Figure, dpi: int = 100) -> tuple[str, int, int]:
    """A figure as a PNG `data:` URI and its pixel size."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    width, height = (round(float(v) * dpi) for v in fig.get_size_inches())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), width, height


def curves_figure(
    trials: Sequence[tuple[str, list[dict], bool]], limits: dict[str, tuple[float, float]] | None = None
) -> Figure:
    """Train loss, validation median R² and mean r per epoch: every trial faint, the best bold.

    `trials`: (name, metrics rows, is_best); `limits`: y range per panel key, shared across runs.
    """
    fig = Figure(figsize=(9.6, 2.9), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (
        ("train_loss", "train loss", lambda m: m.get("train_loss")),
        ("median_r2", "validation median R²", lambda m: (m.get("val") or {}).get("median_r2")),
        ("mean_r", "validation mean r", lambda m: (m.get("val") or {}).get("mean_r")),
    )
    ordered = sorted(trials, key=lambda t: t[2])  # the best drawn last, on top
    for ax, (key, title, get) in zip(axes, panels, strict=True):
        for name, rows, best in ordered:
            xs = [m["epoch"] + 1 for m in rows if _num(get(m))]
            ys = [get(m) for m in rows if _num(get(m))]
            style = {"color": "C0", "lw": 2.2, "zorder": 3} if best else {"color": "0.45", "lw": 1, "alpha": 0.45}
            ax.plot(xs, ys, marker="o" if len(xs) <= 3 else None, ms=4, label=name if best else None, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        last = max((m["epoch"] + 1 for _, rows, _ in trials for m in rows), default=1)
        ax.set_xlim(0.7, last + 0.3)
        if limits and key in limits:
            ax.set_ylim(*limits[key])
    if len(trials) > 1:
        axes[0].legend(
            handles=[
                Patch(color="C0", label="best trial"),
                Patch(color="0.6", label=f"other trials ({len(trials) - 1})"),
            ],
            fontsize=8,
            loc="upper right",
        )
    return fig


def _num(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def histogram_figure(values: dict[str, np.ndarray], xlabel: str, bins: np.ndarray) -> Figure:
    """Histogram of per-vertex scores, one outline per subject (`values`: subject -> scores)."""
    fig = Figure(figsize=(4.8, 3.0), layout="constrained")
    ax = fig.subplots()
    for k, (name, v) in enumerate(values.items()):
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, histtype="step", lw=1.3, color=SUBJECT_COLORS[k % len(SUBJECT_COLORS)], label=name)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("vertices", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2 if len(values) > 4 else 1, frameon=False)
    return fig


def _draw(ax, kind: str, hemi: str, data: np.ndarray, view, cmap, vmin: float, vmax: float, avg="mean") -> None:
    from nilearn import plotting

    fs = fsaverage5()
    plotting.plot_surf_stat_map(
        fs[kind][hemi],
        data,
        bg_map=fs["sulc"][hemi],
        hemi="left" if hemi == "lh" else "right",
        view=view,
        axes=ax,
        figure=ax.figure,
        colorbar=False,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        symmetric_cbar=False,
        avg_method=avg,  # a face's colour from its 3 vertices; "median" keeps labels whole
    )
    ax.set_box_aspect(None, zoom=1.3 if view == "ventral" else 1.5)  # fill the panel, clip nothing


def surface_figure(
    maps: dict[str, np.ndarray],
    *,
    label: str,
    cmap="inferno",
    vmin: float = 0.0,
    vmax: float = 1.0,
    legend: Sequence[tuple[str, str]] | None = None,
    avg: str = "mean",
) -> Figure:
    """One fsaverage5 map (`maps`: hemi -> (10242,) values, NaN = no data) on the inflated surface
    (lateral, medial, ventral views of each hemisphere) and on the flat patches below.

    A colour bar labelled `label`, or with `legend` ((name, colour) pairs) a legend instead."""
    from matplotlib.gridspec import GridSpec

    fig = Figure(figsize=(10.5, 5.2))
    grid = GridSpec(2, 6, fig, left=0, right=1, top=0.97, bottom=0.13, wspace=0, hspace=0, height_ratios=(1, 1.5))
    for k, (hemi, view) in enumerate(INFLATED_VIEWS):
        ax = fig.add_subplot(grid[0, k], projection="3d")
        _draw(ax, "inflated", hemi, maps[hemi], view, cmap, vmin, vmax, avg)
        fig.text((k + 0.5) / 6, 0.985, f"{hemi} {view}", ha="center", va="top", fontsize=8)
    for k, hemi in enumerate(HEMIS):
        ax = fig.add_subplot(grid[1, 3 * k : 3 * k + 3], projection="3d")
        _draw(ax, "flat", hemi, maps[hemi], FLAT_VIEW, cmap, vmin, vmax, avg)
        ax.set_box_aspect(None, zoom=FLAT_ZOOM)
        fig.text(0.02 + 0.5 * k, 0.6, f"{hemi} flat", ha="left", va="top", fontsize=8)
    if legend:
        fig.legend(
            handles=[Patch(color=c, label=n) for n, c in legend],
            loc="lower center",
            ncols=min(len(legend), 8),
            fontsize=8,
            frameon=False,
            title=label,
            title_fontsize=8,
        )
    else:
        cax = fig.add_axes((0.3, 0.085, 0.4, 0.022))
        bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=cax, orientation="horizontal")
        bar.set_label(label, fontsize=8, labelpad=2)
        bar.ax.tick_params(labelsize=7)
    return fig


def flat_image(values: np.ndarray, hemi: str, cmap, vmin: float, vmax: float, width: int = 240) -> np.ndarray:
    """(height, width, 4) RGBA picture of a per-vertex map on the flat patch: data through `cmap`,
    faces without data in the grey of their sulcal depth, transparent off the patch."""
    from matplotlib import colormaps

    face, sulc = flat_raster(hemi, width)
    data = face_values(values, hemi)
    colormap = colormaps[cmap] if isinstance(cmap, str) else cmap
    colors = colormap(Normalize(vmin, vmax, clip=True)(data))
    grey = 0.35 + 0.5 * (1 - sulc)  # deep sulci dark, gyri light, as nilearn draws the background
    missing = ~np.isfinite(data)
    colors[missing, :3] = grey[missing, None]
    colors[missing, 3] = 1
    img = colors[np.maximum(face, 0)]
    img[face < 0] = 0
    return img


def flat_grid_figure(
    per_subject: dict[str, dict[str, np.ndarray]], *, label: str, cmap="inferno", vmin: float = 0.0, vmax: float = 1.0
) -> Figure:
    """Small flat maps of both hemispheres for every subject (`per_subject`: name -> hemi -> values),
    drawn as pictures of the flat patches (fast enough for any number of subjects)."""
    n = len(per_subject)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 1.5 * rows + 0.62))
    bottom = 0.62 / fig.get_figheight()
    w, h = 1 / cols / 2, (1 - bottom) / rows
    for k, (name, maps) in enumerate(per_subject.items()):
        r, c = divmod(k, cols)
        for j, hemi in enumerate(HEMIS):
            ax = fig.add_axes((c / cols + j * w + 0.005, 1 - (r + 1) * h, w - 0.01, h - 0.12 / fig.get_figheight()))
            ax.imshow(flat_image(maps[hemi], hemi, cmap, vmin, vmax), interpolation="nearest")
            ax.set_axis_off()
        fig.text((c + 0.5) / cols, 1 - r * h - 0.005, name, ha="center", va="top", fontsize=8)
    cax = fig.add_axes((0.3, bottom * 0.62, 0.4, bottom * 0.13))
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=cax, orientation="horizontal")
    bar.set_label(label, fontsize=7, labelpad=1)
    bar.ax.tick_params(labelsize=6)
    return fig


def layer_figure(labels: dict[str, np.ndarray], layer_names: Sequence[str]) -> Figure:
    """Each vertex coloured by its dominant layer (`labels`: hemi -> layer index, NaN = none)."""
    colors = [f"C{k % 10}" for k in range(len(layer_names))]
    cmap = ListedColormap(colors)
    return surface_figure(
        labels,
        label="dominant layer",
        cmap=cmap,
        vmin=-0.5,
        vmax=len(layer_names) - 0.5,
        legend=list(zip(layer_names, colors, strict=True)),
        avg="median",
    )


def depth_heatmap_figure(panels: Sequence[tuple[str, dict[str, list[tuple[float, float]]]]], label: str) -> Figure:
    """Model x relative depth heatmaps, one panel per ROI (`panels`: (roi, {model: [(depth, value)]})).
    A model's k-th of L layers fills the depth interval ((k - 1) / L, k / L], so trunks of any depth
    share one axis. Each cell shows its value below the panel's best (ROIs differ more in their
    level than layers do within one), on one colour scale; the panel's title gives its best value,
    and each model's best layer is outlined."""
    from matplotlib import colormaps

    gaps, tops = [], {}
    for roi, rows in panels:
        vals = [v for cells in rows.values() for _, v in cells if _num(v)]
        tops[roi] = max(vals, default=math.nan)
        gaps += [tops[roi] - v for v in vals]
    spread = float(np.percentile(gaps, 95)) if gaps else 1.0
    norm, cmap = Normalize(-(spread or 1.0), 0), colormaps["viridis"]
    cols = min(len(panels), 4)
    rows_n = math.ceil(len(panels) / cols)
    models = list(dict.fromkeys(m for _, rows in panels for m in rows))
    fig = Figure(figsize=(3.3 * cols + 0.8, 0.42 * len(models) * rows_n + 0.9 * rows_n + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False).ravel())
    for ax, (roi, rows) in zip(axes, panels, strict=False):
        for y, model in enumerate(models):
            cells = rows.get(model, [])
            best = max((v for _, v in cells if _num(v)), default=None)
            width = 1 / len(cells) if cells else 1
            for depth, v in cells:
                face = cmap(norm(v - tops[roi])) if _num(v) else (0.9, 0.9, 0.9, 1)
                edge = "red" if best is not None and v == best else "white"
                ax.add_patch(
                    Rectangle(
                        (depth - width, y - 0.4), width, 0.8, facecolor=face, edgecolor=edge, lw=1.4, clip_on=False
                    )
                )
        ax.set_xlim(0, 1)
        ax.set_ylim(len(models) - 0.5, -0.5)
        ax.set_yticks(range(len(models)), models, fontsize=7)
        ax.set_xlabel("relative depth", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{roi} (best {tops[roi]:.3f})", fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes.tolist(), shrink=0.8, pad=0.01)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def category_figure(labels: dict[str, np.ndarray], names: Sequence[str], title: str) -> Figure:
    """Each vertex coloured by a category index (`labels`: hemi -> index, NaN = none), with a legend."""
    colors = [f"C{k % 10}" for k in range(len(names))]
    return surface_figure(
        labels,
        label=title,
        cmap=ListedColormap(colors),
        vmin=-0.5,
        vmax=len(names) - 0.5,
        legend=list(zip(names, colors, strict=True)),
        avg="median",
    )
