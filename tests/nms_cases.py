"""Generated near-threshold cases for the replay: what torchvision's RoIHeads keeps, against what
the replay keeps from the raw outputs. Shared by tests/test_replay.py and bench/replay_exactness.py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou


@dataclass
class Case:
    kind: str
    class_logits: torch.Tensor  # (N, C)
    proposals: torch.Tensor  # (N, 4)
    image_shape: tuple[int, int]
    settings: list[tuple[float, float, int]]  # (score_thresh, nms_thresh, detections_per_img)


def heads(score_thresh: float, nms_thresh: float, k: int) -> RoIHeads:
    return RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, nms_thresh, k)


def postprocess(case: Case, score_thresh: float, nms_thresh: float, k: int):
    """The model's own post-processing of the case (zero box regression: boxes are the proposals)."""
    n, c = case.class_logits.shape
    with torch.no_grad():
        b, s, lab = heads(score_thresh, nms_thresh, k).postprocess_detections(
            case.class_logits, torch.zeros(n, 4 * c), [case.proposals], [case.image_shape]
        )
    return b[0].numpy(), s[0].numpy(), lab[0].numpy()


def raw(case: Case):
    """Every candidate, as the cache holds it: threshold 0, NMS off, no top-k, sorted by score."""
    return postprocess(case, 0.0, 1.0, 100_000)


def _boxes(rng, n: int, size: float) -> np.ndarray:
    # Clusters of boxes on a half-pixel grid: many pairs overlap, some at exactly equal IoUs.
    centres = rng.uniform(30, size - 30, size=(max(1, n // 6), 2))
    xy = centres[rng.integers(0, len(centres), n)] + np.round(rng.normal(0, 6, (n, 2)) * 2) / 2
    half = np.round(rng.uniform(8, 20, (n, 2)) * 2) / 2
    return np.clip(np.concatenate([xy - half, xy + half], axis=1), 0, size).astype(np.float32)


def generate(n_cases: int, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        kind = ("small", "large", "multiclass")[0 if i % 10 < 8 else (1 if i % 10 == 8 else 2)]
        n = {
            "small": int(rng.integers(3, 80)),
            "large": int(rng.integers(1005, 1300)),
            "multiclass": int(rng.integers(520, 700)),
        }[kind]
        classes = 3 if kind == "multiclass" else 2
        size = float(rng.choice([200.0, 680.0, 1360.0]))
        proposals = torch.from_numpy(_boxes(rng, n, size))
        logits = torch.from_numpy(rng.normal(0, 2, (n, classes)).astype(np.float32))
        case = Case(kind, logits, proposals, (int(size), int(size)), [])
        b, s, _ = raw(case)
        settings = []
        for _ in range(4):
            # A threshold exactly at a float32 score, or just below it in float64 (same float32 value).
            t = float(s[int(rng.integers(0, len(s)))]) if len(s) else 0.05
            t = float(np.nextafter(t, 0.0)) if rng.uniform() < 0.5 else t
            t = float(rng.uniform(0, 0.9)) if rng.uniform() < 0.2 else t
            # An NMS IoU exactly at the float32 IoU of an overlapping pair.
            iou = box_iou(torch.from_numpy(b[:40]), torch.from_numpy(b[:40])).numpy()
            pairs = iou[np.triu_indices(len(iou), 1)] if len(iou) > 1 else np.zeros(0)
            pairs = pairs[(pairs > 0.05) & (pairs < 0.95)]
            u = float(rng.choice(pairs)) if len(pairs) else float(rng.uniform(0.2, 0.9))
            k = int(rng.choice([5, 50, 100_000]))
            settings.append((t, u, k))
        case.settings = settings
        cases.append(case)
    return cases
