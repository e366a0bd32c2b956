"""PNG figures: toy scatter plots, curves and image grids.

Figures are drawn on matplotlib's Agg canvas directly (Figure + FigureCanvasAgg), never
through pyplot, so importing or using this module leaves the user's backend and pyplot
state alone. Every function creates the parent directories of `path` and returns `path`,
which may be a local path or a URL that etils.epath writes (e.g. gs://bucket/run/x.png).
"""

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100


def _write(path: str, data: bytes) -> str:
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return path


def _save(fig: Figure, path: str) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return _write(path, buffer.getvalue())


def scatter_png(path: str, points, title: str | None = None, lim: float | None = None) -> str:
    """Scatter plot(s) of 2D points: one square 4 x 4 inch panel (400 x 400 px) per set.

    points: array [N, 2], or a dict name -> [N_i, 2] drawn side by side with shared axes.
    Rows with NaN or inf (failed ODE solves) are left out; panel titles count the rest.
    lim: show [-lim, lim]^2; None fits every panel to all the points.
    """
    sets = dict(points) if isinstance(points, Mapping) else {None: points}
    sets = {name: np.asarray(p, np.float64).reshape(-1, 2) for name, p in sets.items()}
    sets = {name: p[np.all(np.isfinite(p), axis=1)] for name, p in sets.items()}
    stacked = np.concatenate(list(sets.values()))
    if lim is None and not len(stacked):
        lim = 1.0  # Nothing finite to fit the axes to.
    if lim is None:
        lo, hi = stacked.min(axis=0), stacked.max(axis=0)
        half = 0.55 * float(np.max(hi - lo)) or 1.0
        centre = (lo + hi) / 2
        xlim, ylim = (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)
    else:
        xlim = ylim = (-lim, lim)
    fig = Figure(figsize=(4 * len(sets), 4), dpi=DPI)
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    for ax, (name, p) in zip(axes, sets.items()):
        ax.scatter(p[:, 0], p[:, 1], s=0.5, linewidths=0, alpha=0.6)
        ax.set(xlim=xlim, ylim=ylim, aspect="equal")
        if name is not None:
            ax.set_title(f"{name} ({len(p)})")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def curves_png(path: str, x: Sequence[float], curves: Mapping[str, Sequence[float]],
               xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
               title: str | None = None) -> str:
    """Line plot (6 x 4 inch, 600 x 400 px) of curves name -> y [len(x)] against x."""
    fig = Figure(figsize=(6, 4), dpi=DPI)
    ax = fig.subplots()
    for name, y in curves.items():
        ax.plot(np.asarray(x), np.asarray(y), marker="." if len(x) <= 50 else None, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if logx else "linear",
           yscale="log" if logy else "linear")
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def panels_png(path: str, panels: Mapping[str, Mapping[str, tuple]], xlabel: str,
               ylabel: str, floor: float | None = None, title: str | None = None) -> str:
    """Log-log panels side by side (4 x 3.5 inch each), one per panels key; in a panel one
    line per name -> (x [K], y [K], y_low [K], y_high [K]) with the band y_low..y_high
    shaded. floor: a dashed horizontal reference line in every panel."""
    fig = Figure(figsize=(4 * len(panels), 3.5), dpi=DPI)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (panel, lines) in zip(axes, panels.items()):
        for i, (name, (x, y, low, high)) in enumerate(lines.items()):
            ax.plot(x, y, marker=".", color=f"C{i}", label=name)
            ax.fill_between(x, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
        if floor is not None:
            ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label="noise floor")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, title=panel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def to_pixels(images, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """8-bit pixels (uint8, same shape) of images with values in value_range = (lo, hi):
    round(255 (x - lo) / (hi - lo)), clipped to [0, 255]; NaN becomes 0."""
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo; got {value_range}.")
    unit = (np.asarray(images, np.float32) - lo) / (hi - lo)
    return np.round(np.clip(np.nan_to_num(unit, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)


def image_grid_png(path: str, images, ncols: int | None = None, padding: int = 2,
                   value_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """Saves images [N, H, W, C] (C = 1 or 3) as one grid PNG.

    Values in value_range map to 0..255 (to_pixels): (0, 1) for data in [0, 1], (-1, 1)
    for centered data; values outside are clipped and NaN shows as 0.
    The grid has ncols columns (default ceil(sqrt(N))) and ceil(N / ncols) rows, with
    `padding` black pixels around every tile: (rows (H + p) + p) x (ncols (W + p) + p) pixels,
    mode 'L' for C = 1 and 'RGB' for C = 3.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be [N, H, W, C] with N >= 1 and C = 1 or 3; got "
                         f"{images.shape}.")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                    np.uint8)
    for i, image in enumerate(to_pixels(images, value_range)):
        top, left = padding + (i // ncols) * (h + padding), padding + (i % ncols) * (w + padding)
        grid[top:top + h, left:left + w] = image
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buffer, format="PNG")
    return _write(path, buffer.getvalue())
