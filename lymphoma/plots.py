"""PNG figures: confusion matrix, ROC curves, reliability diagram, image grids, first-layer kernels, activation
maps (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lymphoma.png import write_png  # noqa: E402


def save_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Counts with row-normalised shading; rows are the truth, columns the prediction."""
    confusion = np.asarray(confusion)
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{confusion[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(rows: Sequence[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per ``(label, images [N, H, W, 3] floats in [0, 1])``."""
    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.8 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(np.clip(images[c], 0, 1))
        axes[r][0].set_title(label, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_kernels(weights: np.ndarray, path: Path) -> None:
    """First-layer kernels ``[out, 3, k, k]``, each scaled to [0, 1], as RGB patches."""
    kernels = weights.transpose(0, 2, 3, 1)
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    high = kernels.max(axis=(1, 2, 3), keepdims=True)
    kernels = (kernels - low) / np.maximum(high - low, 1e-8)
    cols = 8
    rows = -(-len(kernels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(kernels):
            ax.imshow(kernels[i], interpolation="nearest")
    fig.suptitle(f"first-layer kernels ({weights.shape[0]} x {weights.shape[2]}x{weights.shape[3]})")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_activations(tile: np.ndarray, maps: np.ndarray, layer: str, path: Path, n: int = 15) -> None:
    """An input tile and the first ``n`` channels of a layer's activation ``[C, h, w]`` for it."""
    cols = 4
    shown = min(n, len(maps))
    rows = -(-(shown + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(np.clip(tile, 0, 1))
    axes.flat[0].set_title("input", fontsize=8)
    for i in range(shown):
        axes.flat[i + 1].imshow(maps[i], cmap="viridis")
        axes.flat[i + 1].set_title(f"{layer}[{i}]", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240)]


def save_heatmap(overview: np.ndarray, coords: np.ndarray, tile_class: np.ndarray, classes: Sequence[str],
                 coord_scale: float, extent: float, step: float, path: Path) -> None:
    """A small picture of the input with each tile's class painted over the area it owns (its ``step``
    square at the tile's centre) and a legend; ``coords * coord_scale`` are overview pixels, ``extent`` and
    ``step`` a tile's size and stride in coordinate units. Drawn with PIL: cheap enough for every slide."""
    from PIL import Image, ImageDraw

    overlay = Image.new("RGBA", (overview.shape[1], overview.shape[0]), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    half = (extent - step) / 2
    for (x, y), k in zip(coords, tile_class):
        box = [(x + half) * coord_scale, (y + half) * coord_scale, (x + half + step) * coord_scale,
               (y + half + step) * coord_scale]
        draw.rectangle(box, fill=CLASS_COLOURS[int(k) % len(CLASS_COLOURS)] + (110,))
    overlay.alpha_composite(_legend(tuple(classes)))
    picture = Image.alpha_composite(Image.fromarray(overview).convert("RGBA"), overlay).convert("RGB")
    write_png(path, np.asarray(picture))  # stored, by lymphoma.png: 14x faster than PIL's encoder


@lru_cache(maxsize=8)
def _legend(classes: tuple[str, ...]) -> Any:
    """The heatmap's legend, each class's colour and name, on a transparent RGBA picture: drawn once per class list
    (the text alone took 1.5 ms of a slide's 2 ms heatmap)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = 18 + max((int(font.getlength(name)) for name in classes), default=0) + 4
    legend = Image.new("RGBA", (width, 4 + 14 * len(classes)), (0, 0, 0, 0))
    draw = ImageDraw.Draw(legend)
    for i, name in enumerate(classes):
        draw.rectangle([4, 4 + 14 * i, 14, 14 + 14 * i], fill=CLASS_COLOURS[i % len(CLASS_COLOURS)] + (255,))
        draw.text((18, 3 + 14 * i), name, fill=(0, 0, 0, 255), font=font)
    return legend


def save_attention(overview: np.ndarray, coords: np.ndarray, attention: np.ndarray, coord_scale: float, extent: float,
                   step: float, path: Path) -> None:
    """Each tile's attention painted over the area it owns, red with opacity rising from the least to the most
    attended tile of the picture (drawn as ``save_heatmap`` draws tile classes)."""
    from PIL import Image, ImageDraw

    overlay = Image.new("RGBA", (overview.shape[1], overview.shape[0]), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    low, high = float(np.min(attention, initial=0.0)), float(np.max(attention, initial=1.0))
    share = (attention - low) / max(high - low, 1e-12)
    half = (extent - step) / 2
    for (x, y), a in zip(coords, share):
        box = [(x + half) * coord_scale, (y + half) * coord_scale, (x + half + step) * coord_scale,
               (y + half + step) * coord_scale]
        draw.rectangle(box, fill=(220, 30, 30, int(20 + 200 * a)))
    picture = Image.alpha_composite(Image.fromarray(overview).convert("RGBA"), overlay).convert("RGB")
    write_png(path, np.asarray(picture))  # stored, by lymphoma.png: 14x faster than PIL's encoder


def save_roc(truth_index: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """One-vs-rest ROC curve of each class that occurs with others in the truth (scikit-learn), AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for k, name in enumerate(classes):
        positive = truth_index == k
        if 0 < positive.sum() < len(positive):
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probs[:, k]):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_reliability(reliability: dict[str, object], ece: float, path: Path, title: str) -> None:
    """Reliability diagram: accuracy against mean confidence per confidence bin, bar width by bin, the diagonal
    a perfectly calibrated model would follow."""
    bins = int(reliability["bins"])  # type: ignore[call-overload]
    edges = np.linspace(0, 1, bins + 1)
    accuracy = [a if a is not None else 0.0 for a in reliability["accuracy"]]  # type: ignore[union-attr]
    counts = reliability["count"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.bar(edges[:-1], accuracy, width=1 / bins, align="edge", edgecolor="black", color="#4c72b0", alpha=0.8,
           label="accuracy per bin")
    for left, n, a in zip(edges[:-1], counts, accuracy):  # type: ignore[arg-type]
        if n:
            ax.text(left + 0.5 / bins, a + 0.02, str(n), ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {ece:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probability_grid(shape: tuple[int, int], coords: np.ndarray, probs: np.ndarray, coord_scale: float, extent: float,
                     step: float) -> np.ndarray:
    """``[classes, h, w]`` at overview size: each tile's probabilities over the area it owns (its ``step``
    square at the tile's centre, as the class map), NaN where no tile is."""
    grid = np.full((probs.shape[1], *shape), np.nan, dtype=np.float32)
    half = (extent - step) / 2
    for (x, y), p in zip(np.asarray(coords, dtype=np.float64), probs):
        x0, y0 = int(round((x + half) * coord_scale)), int(round((y + half) * coord_scale))
        x1, y1 = int(round((x + half + step) * coord_scale)), int(round((y + half + step) * coord_scale))
        grid[:, max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)] = p[:, None, None]
    return grid


def save_probability_maps(overview: np.ndarray, coords: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                          coord_scale: float, extent: float, step: float, path: Path) -> None:
    """One panel per class: its tile probabilities in a perceptual colour map (viridis, 0 to 1, with a colour bar)
    over the thumbnail."""
    grid = probability_grid(overview.shape[:2], coords, probs, coord_scale, extent, step)
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.0), squeeze=False)
    for ax, name, layer in zip(axes[0], classes, grid):
        ax.imshow(overview)
        shown = ax.imshow(np.ma.masked_invalid(layer), cmap="viridis", vmin=0, vmax=1, alpha=0.65)
        ax.set_title(f"P({name})", fontsize=9)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
