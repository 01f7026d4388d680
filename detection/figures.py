"""Figures people would rather look at than read: loss curves and the paper's overlays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures go to MLflow, never to a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .sampling import Patch  # noqa: E402


def loss_curve(train: list[tuple[int, float]], val: list[tuple[int, float]], steps_per_epoch: int):
    """Training loss per step (and its running mean) with validation loss at each epoch's end."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, values = np.array(train).T
        ax.plot(steps, values, color="tab:blue", alpha=0.3, lw=0.8, label="train/loss (step)")
        window = max(1, min(len(values), steps_per_epoch))
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.8, label=f"train/loss (mean of {window})")
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


def overlay(patch: Patch, boxes: np.ndarray, scores: np.ndarray, title: str = ""):
    """Ground truth in red, predictions in green, as in the paper's figures."""
    h, w = patch.image.shape[:2]
    fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
    ax.imshow(patch.image)
    for x1, y1, x2, y2 in patch.boxes:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
    for (x1, y1, x2, y2), s in zip(boxes, scores):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.0, alpha=float(0.4 + 0.6 * s)))
    ax.set_title(title or f"{patch.name} at {patch.origin}: ground truth red, predictions green", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
