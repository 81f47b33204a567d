"""The figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Every function returns a :class:`~matplotlib.figure.Figure` whose axes all carry a title and
axis labels; :func:`save_figure` writes it as PNG and returns those titles so that the JSON
beside each plot records what it shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

GROUP_COLOURS = ("#4c72b0", "#dd8452", "#c44e52")  # head, mid, tail bands
DPI = 110


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def axes_titles(fig: Figure) -> list[str]:
    """Titles of the figure's axes, in drawing order (image panels included)."""
    return [ax.get_title() for ax in fig.axes]


def save_figure(fig: Figure, path: str | Path) -> dict[str, object]:
    """Write ``fig`` as PNG (atomically); returns ``{"png", "title", "axes"}`` (file name,
    figure title, axes titles)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return {"png": path.name, "title": fig.get_suptitle(), "axes": axes_titles(fig)}


def plot_attention_distance(distances: Mapping[str, np.ndarray], image_size: int) -> Figure:
    """Mean attention distance per head and block, one colour per model.

    ``distances[name]`` is ``(blocks, heads)`` in pixels. Left: every head of every block (the
    spread per block shows local vs global heads). Right: the heads of blocks 1 (solid) and 2
    (dashed), sorted, as the paper's Fig. 4b.
    """
    fig = figure(11, 4.2)
    fig.suptitle("Mean attention distance (Raghu et al.)")
    ax_all, ax_early = fig.subplots(1, 2)
    names = list(distances)
    width = 0.6 / max(len(names), 1)
    most_blocks = max((np.asarray(d).shape[0] for d in distances.values()), default=1)
    most_heads = max((np.asarray(d).shape[1] for d in distances.values()), default=1)
    for i, name in enumerate(names):
        d = np.asarray(distances[name])
        blocks, heads = d.shape
        colour = f"C{i}"
        offset = (i - (len(names) - 1) / 2) * width
        x = np.repeat(np.arange(1, blocks + 1), heads) + offset
        ax_all.scatter(x, d.reshape(-1), s=14, color=colour, alpha=0.8, label=name)
        for b, style in ((0, "-"), (1, "--")):
            if b < blocks:
                ax_early.plot(
                    np.arange(1, heads + 1),
                    np.sort(d[b]),
                    style,
                    marker="o",
                    color=colour,
                    label=f"{name}, block {b + 1}",
                )
    for ax in (ax_all, ax_early):
        ax.ticklabel_format(axis="y", useOffset=False)
    ax_all.set_xticks(np.arange(1, most_blocks + 1))
    ax_early.set_xticks(np.arange(1, most_heads + 1))
    ax_all.set_title("Every head, per block")
    ax_all.set_xlabel("block")
    ax_all.set_ylabel(f"mean attention distance (pixels of a {image_size}px input)")
    ax_all.legend(fontsize="small")
    ax_early.set_title("Early blocks: block 1 solid, block 2 dashed")
    ax_early.set_xlabel("head (sorted by distance)")
    ax_early.set_ylabel("mean attention distance (pixels)")
    ax_early.legend(fontsize="small")
    return fig


def plot_rollout(
    images: np.ndarray, maps: Mapping[str, np.ndarray], captions: Sequence[str]
) -> Figure:
    """Sample images with their rollout maps overlaid, one row per image.

    ``images`` is ``(n, H, W, 3)`` in ``[0, 1]``; ``maps[token]`` is ``(n, H, W)`` (already
    upsampled to the image), each scaled to its own maximum for display.
    """
    n = len(images)
    cols = 1 + len(maps)
    fig = figure(2.3 * cols, 2.3 * n + 0.4)
    fig.suptitle("Attention rollout (Abnar & Zuidema)")
    grid = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    for r in range(n):
        ax = grid[r, 0]
        ax.imshow(images[r])
        ax.set_title(captions[r], fontsize="small")
        for c, (token, m) in enumerate(maps.items(), start=1):
            ax = grid[r, c]
            heat = m[r] / max(float(m[r].max()), 1e-12)
            ax.imshow(images[r])
            ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f"{token} rollout", fontsize="small")
        for ax in grid[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c in range(cols):
        grid[-1, c].set_xlabel("image" if c == 0 else "patch share (max = 1)")
    return fig


def plot_divergence(
    history: Sequence[tuple[int, float]] | None,
    per_group: Mapping[str, float],
    metric: str,
) -> Figure:
    """Cosine distance between the final CLS and DIST features.

    Left: over training (``(step, distance)`` from the tracked metric), or a note when the run
    tracked none. Right: mean per class group on the eval images.
    """
    fig = figure(10, 4)
    fig.suptitle("CLS/DIST divergence: cosine distance of the final features")
    ax_t, ax_g = fig.subplots(1, 2)
    ax_t.set_title("Over training")
    ax_t.set_xlabel("optimizer step")
    ax_t.set_ylabel("1 - cos(CLS, DIST)")
    if history:
        steps, values = zip(*history)
        ax_t.plot(steps, values, color="C0")
    else:
        ax_t.text(0.5, 0.5, f"no tracked {metric!r}", ha="center", va="center")
    names = list(per_group)
    ax_g.bar(names, [per_group[k] for k in names], color=GROUP_COLOURS[: len(names)])
    ax_g.set_title("Eval images, mean per class group")
    ax_g.set_xlabel("class group")
    ax_g.set_ylabel("1 - cos(CLS, DIST)")
    return fig


def plot_rank(ranks: Mapping[str, Sequence[int]], threshold: float, images: int) -> Figure:
    """PCA rank of token features per block for tail-class images, one line per series."""
    fig = figure(6.5, 4.2)
    fig.suptitle("Feature rank on tail-class images")
    ax = fig.subplots()
    for i, (name, values) in enumerate(ranks.items()):
        style = "--" if name.endswith("CLS") else "-"
        ax.plot(np.arange(1, len(values) + 1), values, style, marker="o", color=f"C{i}", label=name)
    longest = max((len(v) for v in ranks.values()), default=1)
    ax.set_xticks(np.arange(1, longest + 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Components for {threshold:.0%} of the variance ({images} images)")
    ax.set_xlabel("block")
    ax.set_ylabel("rank")
    ax.legend(fontsize="small")
    return fig


def plot_entropy(entropies: Mapping[str, np.ndarray], num_classes: int) -> Figure:
    """Histogram of teacher output entropy per kind of view, with the uniform maximum marked."""
    fig = figure(6.5, 4.2)
    fig.suptitle("Teacher output entropy")
    ax = fig.subplots()
    top = float(np.log(num_classes))
    bins = np.linspace(0, top, 31)
    for i, (kind, values) in enumerate(entropies.items()):
        label = f"{kind} (mean {np.mean(values):.3f})" if len(values) else f"{kind} (none)"
        ax.hist(values, bins=bins, alpha=0.55, color=f"C{i}", label=label)
    ax.axvline(top, color="k", linestyle=":", label=f"log {num_classes}")
    ax.set_title("In-distribution (eval transform) vs OOD (strong aug + mixup)")
    ax.set_xlabel("entropy (nats)")
    ax.set_ylabel("images")
    ax.legend(fontsize="small")
    return fig


def plot_per_class(
    train_counts: Sequence[int],
    accuracy: Mapping[str, np.ndarray],
    bands: Sequence[tuple[float, float] | None],
    group_names: Sequence[str],
) -> Figure:
    """Per-class accuracy against training count (log scale), with Head/Mid/Tail bands."""
    fig = figure(7.5, 4.5)
    fig.suptitle("Per-class accuracy vs training images")
    ax = fig.subplots()
    for band, name, colour in zip(bands, group_names, GROUP_COLOURS):
        if band is not None:
            ax.axvspan(band[0], band[1], color=colour, alpha=0.12, label=name.capitalize())
    counts = np.asarray(train_counts, dtype=np.float64)
    order = np.argsort(counts)
    markers = {"cls": "s", "dist": "^", "mean": "o"}
    for i, (pred, acc) in enumerate(accuracy.items()):
        a = np.asarray(acc, dtype=np.float64) * 100
        ax.plot(
            counts[order],
            a[order],
            marker=markers.get(pred, "o"),
            linestyle="-" if pred == "mean" else ":",
            color=f"C{i}",
            label=pred.upper() if pred != "mean" else "mean of logits",
        )
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_title("CLS vs DIST vs averaged logits, per class")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("eval accuracy (%)")
    ax.legend(fontsize="small", ncol=2)
    return fig


def plot_reliability(
    edges: Sequence[float],
    counts: Sequence[int],
    accuracy: Sequence[float],
    confidence: Sequence[float],
    title: str,
) -> Figure:
    """A reliability diagram: accuracy per equal-width confidence bin against the diagonal of
    perfect calibration (left), and how many samples each bin holds (right). Bins are those of
    :func:`deitlt_scale.engine.posthoc.reliability`; empty bins (NaN) are not drawn."""
    fig = figure(9, 4.0)
    left, right = fig.subplots(1, 2)
    lo, hi = np.asarray(edges[:-1]), np.asarray(edges[1:])
    width = hi - lo
    acc = np.asarray(accuracy, dtype=float)
    conf = np.asarray(confidence, dtype=float)
    filled = np.isfinite(acc)
    left.bar(lo[filled], acc[filled], width=width[filled], align="edge", edgecolor="black",
             color=GROUP_COLOURS[0], label="accuracy")  # fmt: skip
    left.bar(lo[filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled],
             align="edge", color="#c44e52", alpha=0.35, label="gap to confidence")  # fmt: skip
    left.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.set_xlabel("confidence (top-1 softmax probability)")
    left.set_ylabel("accuracy")
    left.set_title("reliability")
    left.legend(loc="upper left", fontsize=8)
    right.bar(lo, np.asarray(counts), width=width, align="edge", edgecolor="black", color="#8c8c8c")
    right.set_xlim(0, 1)
    right.set_xlabel("confidence (top-1 softmax probability)")
    right.set_ylabel("samples")
    right.set_title("samples per bin")
    fig.suptitle(title)
    return fig


def plot_group_bars(rows: Mapping[str, Mapping[str, tuple[float, float]]], title: str) -> Figure:
    """Grouped bars: one group of bars per row, one bar per column (e.g. Overall/Head/Mid/Tail).

    ``rows[name][column] = (mean, std)`` in percent; a NaN std (one seed) draws no error bar.
    """
    names = list(rows)
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    fig = figure(max(6.0, 1.1 * len(names) + 2), 4.4)
    fig.suptitle(title)
    ax = fig.subplots()
    width = 0.8 / max(len(columns), 1)
    x = np.arange(len(names))
    for i, column in enumerate(columns):
        mean = np.array([rows[n].get(column, (np.nan, np.nan))[0] for n in names], dtype=float)
        std = np.array([rows[n].get(column, (np.nan, np.nan))[1] for n in names], dtype=float)
        yerr = None if np.isnan(std).all() else np.nan_to_num(std)
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, mean, width, yerr=yerr, capsize=3,
               color=f"C{i}", label=column.capitalize())  # fmt: skip
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize="small")
    ax.set_ylim(0, 105)
    ax.set_title("Top-1 accuracy per class group")
    ax.set_xlabel("row (head reported)")
    ax.set_ylabel("eval accuracy (%)")
    ax.legend(fontsize="small", ncol=len(columns))
    return fig
