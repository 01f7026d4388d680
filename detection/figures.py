"""Figures people would rather look at than read: loss curves and the paper's overlays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures go to MLflow, never to a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.colors import to_rgba_array  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def loss_curve(train: list[tuple[int, float]], val: list[tuple[int, float]], steps_per_epoch: int):
    """Training loss per step (and its running mean) with validation loss at each epoch's end."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, values = np.array(train).T
        ax.plot(steps, values, color="tab:blue", alpha=0.3, lw=0.8, label="train/loss (step)")
        window = max(1, min(len(values), steps_per_epoch))
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=1.8, label=f"train/loss (mean of {window})")
    if val:
        epochs, values = np.array(val).T
        ax.plot((epochs + 1) * steps_per_epoch - 1, values, "o-", color="tab:orange", label="val/loss (epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def overlay(image: np.ndarray, gt_boxes: np.ndarray, boxes: np.ndarray, scores: np.ndarray, title: str):
    """Ground truth in red, predictions in green, as in the paper's figures; without ground truth
    (predict's overlays) the title names predictions only."""
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
    ax.imshow(image)
    ax.add_collection(_outlines(gt_boxes, "red", 1.2), autolim=False)
    ax.add_collection(_outlines(boxes, "lime", 1.0, alpha=0.4 + 0.6 * np.asarray(scores, dtype=float)), autolim=False)
    legend = "ground truth red, predictions green" if len(gt_boxes) else "predictions green"
    ax.set_title(f"{title}: {legend}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def _outlines(boxes: np.ndarray, colour: str, lw: float, alpha: np.ndarray | float = 1.0) -> PatchCollection:
    """(N, 4) x1y1x2y2 px boxes as one collection of outlines: an untrained model's thousands of
    boxes draw in a fraction of a second, where one patch per box took seconds."""
    rects = [Rectangle((x1, y1), x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes]
    edges = to_rgba_array(colour, alpha if rects else 1.0)  # no boxes: an empty alpha has no colour
    return PatchCollection(rects, facecolors="none", edgecolors=edges, linewidths=lw, joinstyle="miter")


def threshold_curve(table: pd.DataFrame, operating: float, title: str):
    """The paper's Fig. 4: detection rate (TPR) and false discovery rate against the score threshold."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(table.threshold, table.detection_rate, color="tab:green", lw=2, label="detection rate (TPR)")
    ax.plot(table.threshold, table.fdr, color="tab:red", lw=2, label="false discovery rate")
    ax.axvline(operating, color="grey", ls="--", lw=1, label=f"operating point {operating:g}")
    ax.set_xlabel("score threshold")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    return fig


def pr_curve(table: pd.DataFrame, operating: float, title: str):
    """Precision against recall over the score thresholds, the operating point marked."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    has = (table.tp + table.fp) > 0
    ax.plot(table.detection_rate[has], table.precision[has], color="tab:blue", lw=2)
    at = table.iloc[(table.threshold - operating).abs().argmin()]
    ax.plot([at.detection_rate], [at.precision], "o", color="black", label=f"threshold {at.threshold:g}")
    ax.set_xlabel("recall (detection rate)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def froc(table: pd.DataFrame, metrics: dict[str, float], title: str):
    """FROC: detection rate against false positives per mm² over the score thresholds at or above the
    operating one, with the detection rate read at each target density (the MONKEY challenge's)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = table.sort_values("threshold", ascending=False)
    has = order.fp_per_mm2 > 0
    ax.step(order.fp_per_mm2[has], order.detection_rate[has], where="post", color="tab:purple", lw=2)
    targets = sorted(float(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("froc_dr_at_"))
    for t in targets:
        ax.plot([t], [metrics[f"froc_dr_at_{t:g}"]], "o", color="black", ms=4)
    ax.axvspan(min(targets, default=1), max(targets, default=1), color="grey", alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("false positives per mm²")
    ax.set_ylabel("detection rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}; FROC {metrics.get('froc', float('nan')):.3f}")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def tradeoff(trials: list[dict], chosen: int, title: str):
    """Every trial as (FDR, detection rate), coloured by F1, the chosen one ringed."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    fdr = [t["fdr"] for t in trials]
    dr = [t["detection_rate"] for t in trials]
    points = ax.scatter(fdr, dr, c=[t["f1"] for t in trials], cmap="viridis", s=18)
    fig.colorbar(points, ax=ax, label="F1")
    pick = next(t for t in trials if t["trial"] == chosen)
    ax.scatter(
        [pick["fdr"]],
        [pick["detection_rate"]],
        s=160,
        facecolors="none",
        edgecolors="red",
        lw=2,
        label=f"chosen: trial {chosen}",
    )
    ax.set_xlabel("false discovery rate (validation)")
    ax.set_ylabel("detection rate (validation)")
    ax.set_title(f"study {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def side_by_side(table: pd.DataFrame, metric: str, decision: str):
    """The candidate's and the champion's metrics as grouped bars, the deciding one outlined."""
    columns = [c for c in table.columns if c != "metric"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(columns)
    x = np.arange(len(table))
    for k, col in enumerate(columns):
        values = table[col].astype(float).fillna(0.0)
        bars = ax.bar(x + k * width, values, width, label=col)
        for i, m in enumerate(table.metric):
            if m == metric:
                bars[i].set_edgecolor("black")
                bars[i].set_linewidth(2)
    ax.set_xticks(x + width * (len(columns) - 1) / 2, table.metric, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{decision} on {metric}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return fig


def dr_vs_fdr(curves: dict[str, pd.DataFrame], targets: list[float], title: str):
    """Detection rate against FDR over the score threshold, one curve per version, with the
    detection rates the comparison reads the FDR at."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, c in curves.items():
        ax.plot(c.fdr, c.detection_rate, lw=1.6, marker=".", ms=3, label=label)
    for t in targets:
        ax.axhline(t, color="grey", lw=0.7, ls=":")
    # The targets on an axis of their own at the right: inside the plot their labels sat on the
    # curves that start at FDR 0.
    right = ax.secondary_yaxis("right")
    right.set_yticks(targets, [f"{t:g}" for t in targets], color="grey", fontsize=8)
    right.set_ylabel("FDR read at", color="grey", fontsize=8)
    ax.set_xlabel("false discovery rate (lower is better)")
    ax.set_ylabel("detection rate")
    ax.set_xlim(-0.02, 1)  # a curve at FDR 0 (no false positive) stays off the spine
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def froc_versions(curves: dict[str, pd.DataFrame], targets: list[float], title: str):
    """Detection rate against false positives per mm² over the score threshold, one curve per
    version, with the densities the comparison reads the detection rate at."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, c in curves.items():
        c = c.sort_values("threshold", ascending=False)
        has = c.fp_per_mm2 > 0
        ax.step(c.fp_per_mm2[has], c.detection_rate[has], where="post", lw=1.6, label=label)
    for t in targets:
        ax.axvline(t, color="grey", lw=0.7, ls=":")
        ax.annotate(f"{t:g}", (t, 0.01), color="grey", fontsize=8, ha="left")
    ax.set_xscale("log")
    ax.set_xlabel("false positives per mm² (lower is better)")
    ax.set_ylabel("detection rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def density(thumb: np.ndarray, x: np.ndarray, y: np.ndarray, px_mm: float, title: str, summary: dict):
    """A slide's thumbnail beside its detections (x, y in thumbnail px of `px_mm` mm) per mm² of
    tissue, as a heatmap over the same view."""
    h, w = thumb.shape[:2]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6 * h / max(w, 1) + 1))
    left.imshow(thumb)
    left.set_title(title)
    bins = (max(1, round(h / 16)), max(1, round(w / 16)))  # 16 thumbnail px a bin
    counts, _, _ = np.histogram2d(y, x, bins=bins, range=[[0, h], [0, w]])
    bin_mm2 = (16 * px_mm) ** 2
    right.imshow(thumb, alpha=0.35)
    shown = right.imshow(
        np.ma.masked_equal(counts, 0) / bin_mm2, extent=(0, w, h, 0), cmap="magma", alpha=0.85, interpolation="nearest"
    )
    fig.colorbar(shown, ax=right, fraction=0.046, label="detections per mm²")
    per = ", ".join(f"{k} {v:.0f}/mm²" for k, v in summary["per_mm2"].items()) or "no detection"
    right.set_title(f"{summary['detections']} detections, {summary['tissue_mm2']:.2f} mm² tissue: {per}")
    for ax in (left, right):
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
