"""A learned second look: the paper's score-level fusion of two networks, to drop false positives.

The detector keeps what it keeps (its post-processing, and the fused flips where the version has
them). A small classifier, ResNet-18 on a `second_look.crop`-pixel square centred on each kept
detection, says how much the crop looks like a tumour cell. The version reports

    fused score = (1 - weight) x detector score + weight x classifier probability

above `second_look.thresh`. The classifier learns from the detector's own true and false positives
on the training split (a detection is true when it matches a cell within the match radius). Weight
and threshold are chosen on the val split: the weight whose fused score has the lowest FDR at the
detection rate the version reaches alone, and the highest threshold that still reaches that rate,
so the second look removes false positives and keeps the true positives.

This module is the stage (crops, classifier, fused scores, choosing the weight), which the served
model and the evaluation use; `second_look_train.py` is the command, `python -m detection
second-look --model models:/NAME/V`, which trains it as a nested run of the version's run and
registers a new version holding both networks (one pyfunc runs both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchvision.ops import roi_align

from .config import Config, SecondLookConfig
from .errors import DetectionError
from .inference import Cache, Runtime
from .postprocess import PostProcess
from .progress import Bar
from .sampling import chw
from .tta import fused_postprocess, kept_cache, kept_in_view

# The served model imports this module for `probabilities`; what only training and choosing the
# weight need (MLflow logging, figures, metrics) is imported where it is used.

# Per-channel statistics of the shared sample's training split (as smoke.yaml's image_mean/std):
# crops are normalised the same way whatever the detector's config uses.
CROP_MEAN = (0.798, 0.719, 0.849)
CROP_STD = (0.149, 0.179, 0.112)
WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)  # candidate fusion weights, 0 = the detector alone
BATCH = 256  # crops per inference pass


class SecondLookError(DetectionError, ValueError):
    """A second look that cannot be trained or used; the message names the fix."""


def build_classifier() -> torch.nn.Module:
    """ResNet-18 from scratch with one logit: P(tumour cell | crop)."""
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=1)


def crops(image: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8 squares of an RGB uint8 (H, W, 3) image centred on each box's centre
    (boxes (N, 4) x1, y1, x2, y2 in image pixels), zero more than a pixel outside the image:
    roi_align with one sample per output pixel, so a crop is the image's own pixels when the centre
    has integer coordinates, and bilinear between them otherwise."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    centres = torch.from_numpy((boxes[:, :2] + boxes[:, 2:]) / 2)
    rois = torch.cat([torch.zeros(len(boxes), 1), centres - size / 2, centres + size / 2], 1)
    img = chw(image)[None].float()
    out = [
        roi_align(img, rois[k : k + BATCH], output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
        for k in range(0, len(rois), BATCH)
    ]
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    x = F.to_dtype(batch, torch.float32, scale=True)
    return F.normalize(x, CROP_MEAN, CROP_STD)


def probabilities(net: torch.nn.Module, image: np.ndarray, boxes: np.ndarray, size: int, rt: Runtime) -> np.ndarray:
    """(N,) float32: the classifier's probability that each box's crop is a tumour cell."""
    patches = crops(image, boxes, size)
    out = []
    with torch.inference_mode(), torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype is not None):
        for k in range(0, len(patches), BATCH):
            x = _normalise(patches[k : k + BATCH].to(rt.device))
            out.append(torch.sigmoid(net(x).float()[:, 0]).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def fused_score(scores: np.ndarray, probs: np.ndarray, weight: float) -> np.ndarray:
    return ((1.0 - weight) * np.asarray(scores, np.float64) + weight * np.asarray(probs, np.float64)).astype(np.float32)


# --- on caches (evaluate, and choosing the weight) ----------------------------------------------


def above(cache: Cache, thresh: float) -> Cache:
    """A kept cache reduced to detections scoring above `thresh`."""
    parts = []
    for i in range(len(cache)):
        lo, hi = cache.det_range(i)
        k = slice(lo, hi)
        sel = cache.det_scores[k] > np.float32(thresh)
        parts.append((cache.det_boxes[k][sel], cache.det_scores[k][sel], cache.det_labels[k][sel]))
    return kept_cache(cache, parts, {})


def kept(cache: Cache, pp: PostProcess, radius: float) -> Cache:
    """What `pp` keeps of a cache, as a kept cache (one pseudo-tile per item): a raw cache is
    post-processed as the deployed detector does it, a kept one (fused flips) thresholded."""
    if cache.meta.get("kept"):
        return above(cache, pp.score_thresh)
    return kept_cache(
        cache, [kept_in_view(cache, i, "none", pp, radius) for i in range(len(cache))], {"postprocess": pp.__dict__}
    )


def item_probabilities(
    net: torch.nn.Module, cache: Cache, images: list[np.ndarray], size: int, rt: Runtime, progress: bool = True
) -> list[np.ndarray]:
    """The classifier's probabilities of each item's kept detections, item by item."""
    out = []
    with Bar(len(cache), f"second look ({rt.device})", every=max(1, len(cache) // 10), quiet=not progress) as bar:
        for i in range(len(cache)):
            lo, hi = cache.det_range(i)
            out.append(probabilities(net, images[i], cache.det_boxes[lo:hi], size, rt))
            bar.advance()
    return out


def rescored(cache: Cache, probs: list[np.ndarray], weight: float) -> Cache:
    """A kept cache with each detection's score fused with the classifier's (re-sorted per item)."""
    parts = []
    for i in range(len(cache)):
        lo, hi = cache.det_range(i)
        parts.append(
            (cache.det_boxes[lo:hi], fused_score(cache.det_scores[lo:hi], probs[i], weight), cache.det_labels[lo:hi])
        )
    return kept_cache(cache, parts, {"second_look_weight": weight})


def apply(
    cache: Cache, images: list[np.ndarray], net: torch.nn.Module, cfg: Config, rt: Runtime, progress: bool = True
) -> tuple[Cache, PostProcess]:
    """The version's second look over a kept cache: the rescored cache and what judges it."""
    probs = item_probabilities(net, cache, images, cfg.second_look.crop, rt, progress)
    return rescored(cache, probs, cfg.second_look.weight), fused_postprocess(cfg.second_look.thresh)


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Examples:
    crops: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) float32: 1 a true positive, 0 a false positive

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    def __len__(self) -> int:
        return len(self.labels)


def examples(cache: Cache, images: list[np.ndarray], radius: float, size: int, limit: int, seed: int) -> Examples:
    """The kept detections' crops, labelled by greedy matching to the annotated cells (detections in
    a don't-care band left out), at most `limit`: drawn at random, each class keeping all its crops
    when it has fewer than half of them."""
    from .metrics import score

    scored = score(cache, fused_postprocess(0.0), "greedy", radius)
    rows = [
        (i, k, bool(t))
        for i, (kept, tp, counted) in enumerate(zip(scored.kept, scored.tp, scored.counted))
        for k, t in zip(kept[counted], tp[counted])
    ]
    pos, neg = [r for r in rows if r[2]], [r for r in rows if not r[2]]
    n_pos = min(len(pos), max(limit - len(neg), limit // 2))
    n_neg = min(len(neg), limit - n_pos)
    rng = np.random.default_rng(seed)
    picked = [pos[j] for j in rng.permutation(len(pos))[:n_pos]] + [neg[j] for j in rng.permutation(len(neg))[:n_neg]]
    all_crops = [
        crops(images[i], cache.det_boxes[[k for j, k, _ in picked if j == i]], size) for i in range(len(cache))
    ]
    labels = [torch.tensor([float(t) for j, _, t in picked if j == i]) for i in range(len(cache))]
    return Examples(torch.cat(all_crops), torch.cat(labels).float())


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a true positive outscores a false positive), Mann-Whitney U."""
    from scipy import stats

    pos, neg = probs[labels > 0.5], probs[labels <= 0.5]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips and quarter turns: a cell has no orientation."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def fit(
    train: Examples, val: Examples, sl: SecondLookConfig, seed: int, rt: Runtime, on_epoch=lambda epoch, values: None
) -> torch.nn.Module:
    """Train the classifier; the epoch with the best val AUC is kept."""
    if train.positives == 0 or train.positives == len(train):
        raise SecondLookError(
            f"the detector's {len(train)} kept detections on the training split are all "
            f"{'false' if train.positives == 0 else 'true'} positives: nothing to tell apart"
        )
    torch.manual_seed(seed)
    net = build_classifier().to(rt.device)
    opt = torch.optim.AdamW(net.parameters(), lr=sl.lr, weight_decay=1e-4)
    pos_weight = torch.tensor((len(train) - train.positives) / train.positives, device=rt.device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(seed)
    best, best_auc = copy.deepcopy(net.state_dict()), -1.0
    steps = (len(train) + sl.batch_size - 1) // sl.batch_size
    with Bar(sl.epochs * steps, "second look: train", every=max(1, steps)) as bar:
        for epoch in range(sl.epochs):
            net.train()
            order = torch.randperm(len(train), generator=gen)
            total = 0.0
            for k in range(steps):
                idx = order[k * sl.batch_size : (k + 1) * sl.batch_size]
                x = _dihedral(_normalise(train.crops[idx].to(rt.device)), int(torch.randint(8, (1,), generator=gen)))
                loss = loss_fn(net(x)[:, 0], train.labels[idx].to(rt.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                bar.advance(epoch=epoch + 1, loss=loss.item())
            net.eval()
            val_auc = auc(_predict(net, val.crops, rt), val.labels.numpy()) if len(val) else float("nan")
            on_epoch(epoch, {"second_look/train_loss": total / len(train), "second_look/val_auc": val_auc})
            if not np.isfinite(val_auc) or val_auc > best_auc:
                best, best_auc = copy.deepcopy(net.state_dict()), val_auc if np.isfinite(val_auc) else best_auc
    net.load_state_dict(best)
    return net.eval().cpu()


def _predict(net: torch.nn.Module, batch: torch.Tensor, rt: Runtime) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for k in range(0, len(batch), BATCH):
            out.append(torch.sigmoid(net(_normalise(batch[k : k + BATCH].to(rt.device)))[:, 0]).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


@dataclass(frozen=True)
class Choice:
    weight: float
    thresh: float
    detection_rate: float  # what the version reaches alone on val, and keeps
    fdr_alone: float
    fdr: float
    table: pd.DataFrame  # per candidate weight: FDR at that detection rate
    curves: dict[str, pd.DataFrame]


def choose(cache: Cache, probs: list[np.ndarray], radius: float, weights=WEIGHTS) -> Choice:
    """Of `weights`, the one with the lowest val FDR at the detection rate the version reaches alone
    (ties: the smaller weight), and the highest threshold that keeps that rate."""
    from .metrics import SWEEP, fdr_at, rates, threshold_counts

    def counts(weight: float) -> np.ndarray:
        return threshold_counts(rescored(cache, probs, weight), fused_postprocess(0.0), "greedy", radius, SWEEP)[2].sum(
            0
        )

    alone = counts(0.0)
    target = float(rates(alone)[0][0])  # every kept detection: the version's own operating point
    if not np.isfinite(target) or target <= 0:
        raise SecondLookError(
            "the version finds no cell on the val split, so there is no detection rate to keep; "
            "train the detector longer or lower its score threshold"
        )
    rows, curves, by_weight = [], {}, {0.0: alone}
    for w in weights:
        c = counts(float(w))
        by_weight[float(w)] = c
        rows.append({"weight": float(w), "fdr": float(fdr_at(c, target))})
    table = pd.DataFrame(rows)
    best = float(table.loc[table.fdr.idxmin(), "weight"])
    for label, w in (("detector alone", 0.0), (f"second look, weight {best:g}", best)):
        dr, fdr = rates(by_weight[w])
        curves[label] = pd.DataFrame({"threshold": SWEEP, "detection_rate": dr, "fdr": fdr})
    dr = rates(by_weight[best])[0]
    thresh = float(SWEEP[np.flatnonzero(dr >= target - 1e-12).max()])
    return Choice(best, thresh, target, float(table.fdr.iloc[0]), float(table.fdr.min()), table, curves)
