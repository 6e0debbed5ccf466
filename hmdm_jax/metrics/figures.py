"""Figures for the experiments: samples per class, reconstructions, transition matrices, confusion
matrices and training curves.

Each function takes arrays and an output path, writes one PNG and returns the path. Figures are
drawn on a standalone :class:`matplotlib.figure.Figure` rendered by the Agg canvas, so importing
this module never changes the global pyplot backend and works without a display.

Images follow the project's convention: float arrays ``[..., H, W, C]`` in [−1, 1] with C = 1
(shown in grayscale) or C = 3 (RGB); values are mapped to [0, 1] and clipped.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "to_display",
    "image_grid",
    "plot_samples_per_class",
    "plot_reconstructions",
    "plot_transition_matrices",
    "plot_confusion",
    "plot_training_curves",
]

_ANNOTATE_MAX = 12  # write the numbers into heatmap cells up to this size


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas attached directly: no pyplot, no global backend switch
    return fig


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, bbox_inches="tight")
    return path


def to_display(images) -> np.ndarray:
    """``[..., H, W, C]`` in [−1, 1], C ∈ {1, 3} → float32 in [0, 1], same shape (clipped)."""
    x = np.asarray(images, np.float32)
    if x.ndim < 3 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [..., H, W, C] with C in (1, 3), got {x.shape}")
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def image_grid(images, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tiles ``[R, M, H, W, C]`` images (in [−1, 1]) into one ``[R(H+pad)−pad, M(W+pad)−pad, C]`` array in [0, 1]."""
    x = to_display(images)
    if x.ndim != 5:
        raise ValueError(f"image_grid needs [rows, cols, H, W, C], got {x.shape}")
    rows, cols, h, w, c = x.shape
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), pad_value, np.float32)
    for r in range(rows):
        for m in range(cols):
            grid[r * (h + pad):r * (h + pad) + h, m * (w + pad):m * (w + pad) + w] = x[r, m]
    return grid


def _show_grid(ax, grid: np.ndarray) -> None:
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")


def _row_ticks(ax, num_rows: int, h: int, labels: Sequence[str], pad: int = 1) -> None:
    ax.set_xticks([])
    ax.set_yticks([r * (h + pad) + h / 2 - 0.5 for r in range(num_rows)])
    ax.set_yticklabels(labels)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_samples_per_class(images, path, class_names: Sequence[str] | None = None,
                           title: str | None = None) -> str:
    """One row of samples per class.

    Args:
      images: ``[K, m, H, W, C]`` in [−1, 1]: m samples generated for each of K classes/states.
      path: output PNG path.
      class_names: optional K row labels (default "k=0", "k=1", ...).
      title: optional figure title.
    """
    x = np.asarray(images)
    if x.ndim != 5:
        raise ValueError(f"images must have shape [K, m, H, W, C], got {x.shape}")
    k, m, h, w, _ = x.shape
    names = list(class_names) if class_names is not None else [f"k={i}" for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    grid = image_grid(x)
    scale = 0.5 if h <= 16 else 0.9
    fig = _new_figure((max(2.0, 0.6 + m * scale), max(1.5, 0.4 + k * scale)))
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    _row_ticks(ax, k, h, names)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_reconstructions(originals, recon_by_t: Mapping[int, np.ndarray], path,
                         title: str | None = None) -> str:
    """Originals in the first row, then one row per noise level t of their reconstructions.

    Args:
      originals: ``[m, H, W, C]`` in [−1, 1].
      recon_by_t: ``{t: [m, H, W, C]}`` reconstructions from z_t (rows sorted by t).
      path: output PNG path.
    """
    orig = np.asarray(originals)
    if orig.ndim != 4:
        raise ValueError(f"originals must have shape [m, H, W, C], got {orig.shape}")
    rows, names = [orig], ["original"]
    for t in sorted(recon_by_t):
        r = np.asarray(recon_by_t[t])
        if r.shape != orig.shape:
            raise ValueError(f"reconstructions at t={t} have shape {r.shape}, originals {orig.shape}")
        rows.append(r)
        names.append(f"t={t}")
    x = np.stack(rows)
    m, h = orig.shape[0], orig.shape[1]
    scale = 0.5 if h <= 16 else 0.9
    fig = _new_figure((max(2.0, 0.9 + m * scale), max(1.5, 0.4 + len(rows) * scale)))
    ax = fig.add_subplot()
    _show_grid(ax, image_grid(x))
    _row_ticks(ax, len(rows), h, names)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _heatmap(fig, ax, matrix: np.ndarray, title: str, xlabel: str, ylabel: str, fmt: str,
             vmin=None, vmax=None, xticklabels=None, yticklabels=None) -> None:
    im = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    rows, cols = matrix.shape
    if max(rows, cols) <= _ANNOTATE_MAX:
        ax.set_xticks(range(cols))
        ax.set_yticks(range(rows))
        if xticklabels is not None:
            ax.set_xticklabels(xticklabels)
        if yticklabels is not None:
            ax.set_yticklabels(yticklabels)
        hi = np.nanmax(matrix) if vmax is None else vmax
        lo = np.nanmin(matrix) if vmin is None else vmin
        mid = lo + 0.5 * (hi - lo)
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="black" if matrix[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _check_transition(a, name) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square [K, K] matrix, got {a.shape}")
    if np.any(a < -1e-9) or not np.allclose(a.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{name} must hold probabilities with rows summing to 1 (pass exp(log_A), not log_A)")
    return a


def plot_transition_matrices(A_learned, A_true, path, mapping=None, title: str | None = None) -> str:
    """Learned and true transition matrices side by side (numbers written in the cells for K ≤ 12).

    Args:
      A_learned: ``[K, K]`` probabilities, ``A[i, j] = p(x_{l+1} = j | x_l = i)`` over learned states.
      A_true: ``[K', K']`` probabilities over classes, or None to plot the learned matrix alone.
      path: output PNG path.
      mapping: optional ``[K]`` state → class matching (:func:`hmdm_jax.matching.best_matching`). States
        are then reordered so that the state matched to class c sits at position c (unmatched states
        last) and axes are labelled "state→class", making the two panels directly comparable.
    """
    a = _check_transition(A_learned, "A_learned")
    labels = None
    if mapping is not None:
        mapping = np.asarray(mapping, np.int64).reshape(-1)
        if mapping.shape[0] != a.shape[0]:
            raise ValueError(f"mapping has {mapping.shape[0]} entries for {a.shape[0]} states")
        order = np.argsort(np.where(mapping >= 0, mapping, mapping.shape[0] + np.arange(mapping.shape[0])),
                           kind="stable")
        a = a[np.ix_(order, order)]
        labels = [f"{s}→{mapping[s]}" if mapping[s] >= 0 else f"{s}→?" for s in order]
    panels = [(a, "learned A", "next state", "state", labels)]
    if A_true is not None:
        panels.append((_check_transition(A_true, "A_true"), "true A", "next class", "class", None))
    fig = _new_figure((4.6 * len(panels), 4.0))
    for i, (mat, name, xl, yl, lab) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _heatmap(fig, ax, mat, name, xl, yl, ".2f", vmin=0.0, vmax=1.0, xticklabels=lab, yticklabels=lab)
        if lab is not None:
            ax.tick_params(axis="x", labelrotation=90)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(conf, path, normalize: bool = True, title: str | None = None) -> str:
    """Confusion matrix heatmap.

    Args:
      conf: ``[K_true, K_pred]`` counts (:func:`hmdm_jax.matching.confusion_matrix`), rows = true class.
      path: output PNG path.
      normalize: show row-normalised fractions (each true class sums to 1) instead of counts.
    """
    c = np.asarray(conf, np.float64)
    if c.ndim != 2:
        raise ValueError(f"conf must be a [K_true, K_pred] matrix, got {c.shape}")
    if normalize:
        totals = c.sum(axis=1, keepdims=True)
        c = np.divide(c, totals, out=np.zeros_like(c), where=totals > 0)
        fmt, vmax = ".2f", 1.0
    else:
        fmt, vmax = ".0f", None
    fig = _new_figure((1.2 + 0.45 * c.shape[1], 1.0 + 0.4 * c.shape[0]) if max(c.shape) > 8 else (5, 4))
    ax = fig.add_subplot()
    _heatmap(fig, ax, c, title or "confusion", "predicted state", "true class", fmt, vmin=0.0, vmax=vmax)
    return _save(fig, path)


def plot_training_curves(metrics: Sequence[Mapping], keys: Sequence[str], path, x_key: str = "step",
                         log_y: Sequence[str] = ()) -> str:
    """One panel per metric key against ``x_key``, from records such as the lines of metrics.jsonl.

    Args:
      metrics: list of dicts; a record lacking a key (or with a non-finite value) is skipped for that key.
      keys: metric names to plot, one panel each.
      path: output PNG path.
      x_key: the x axis (record index when a record lacks it).
      log_y: keys drawn on a log y-axis (only if all their values are positive).
    """
    keys = list(keys)
    if not keys:
        raise ValueError("no keys to plot")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = _new_figure((4.0 * cols, 3.0 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = [], []
        for j, rec in enumerate(metrics):
            if key not in rec:
                continue
            try:
                y = float(rec[key])
            except (TypeError, ValueError):
                continue
            if np.isfinite(y):
                xs.append(float(rec.get(x_key, j)))
                ys.append(y)
        if ys:
            ax.plot(xs, ys, marker="." if len(ys) < 50 else None, linewidth=1.0)
            if key in log_y and min(ys) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
