"""Generated near-threshold cases for the replay: what the model's RoI heads keep, against what the
replay keeps from the raw outputs. Shared by tests/test_replay.py and bench/replay_exactness.py.

Kinds: `small` (a few boxes, one class), `large` (over 1,000 candidates, where torchvision switches
NMS paths), `multiclass`, `ties` (two or three classes over 1,000 candidates with many exactly tied
scores), each in float32 or with the head's outputs in bf16 or fp16 as autocast makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou

from detection.postprocess import ExactRoIHeads

KINDS = ("small", "large", "multiclass", "ties")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    kind: str
    dtype: str  # fp32 | bf16 | fp16: the autocast dtype the head ran under
    class_logits: torch.Tensor  # (N, C) in that dtype
    box_regression: torch.Tensor  # (N, 4C) in that dtype
    proposals: torch.Tensor  # (N, 4) in that dtype (the RPN's decode runs under autocast too)
    image_shape: tuple[int, int]
    settings: list[tuple[float, float, int]]  # (score_thresh, nms_thresh, detections_per_img)


def heads(score_thresh: float, nms_thresh: float, k: int, cls=ExactRoIHeads) -> RoIHeads:
    return cls(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, nms_thresh, k)


def postprocess(case: Case, score_thresh: float, nms_thresh: float, k: int, cls=ExactRoIHeads):
    """The RoI heads' own post-processing of the case, under the case's autocast dtype."""
    dtype = DTYPES[case.dtype]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        b, s, lab = heads(score_thresh, nms_thresh, k, cls).postprocess_detections(
            case.class_logits, case.box_regression, [case.proposals], [case.image_shape]
        )
    return b[0].float().numpy(), s[0].float().numpy(), lab[0].numpy()


def raw(case: Case, cls=ExactRoIHeads):
    """Every candidate, as the cache holds it: threshold 0, NMS off, no top-k, in canonical order."""
    return postprocess(case, 0.0, 1.0, 100_000, cls)


def _boxes(rng, n: int, size: float) -> np.ndarray:
    # Clusters of boxes on a half-pixel grid: many pairs overlap, some at exactly equal IoUs.
    centres = rng.uniform(30, size - 30, size=(max(1, n // 6), 2))
    xy = centres[rng.integers(0, len(centres), n)] + np.round(rng.normal(0, 6, (n, 2)) * 2) / 2
    half = np.round(rng.uniform(8, 20, (n, 2)) * 2) / 2
    return np.clip(np.concatenate([xy - half, xy + half], axis=1), 0, size).astype(np.float32)


def _size_of(kind: str, rng) -> tuple[int, int]:
    """(proposals, classes including background) of a kind."""
    return {
        "small": (int(rng.integers(3, 80)), 2),
        "large": (int(rng.integers(1005, 1300)), 2),
        "multiclass": (int(rng.integers(520, 700)), 3),
        "ties": (int(rng.integers(560, 800)), int(rng.choice([3, 4]))),
    }[kind]


def generate(n_cases: int, seed: int = 0, dtypes=tuple(DTYPES)) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        kind = ("small",) * 6 + ("large", "multiclass", "ties", "ties")
        kind = kind[i % 10]
        dtype = dtypes[(i // 10) % len(dtypes)]
        n, classes = _size_of(kind, rng)
        size = float(rng.choice([200.0, 680.0, 1360.0]))
        if kind == "ties":  # few distinct logit rows: many candidates score exactly alike
            logits = rng.integers(-2, 3, (n, classes)).astype(np.float32) / 2
        else:
            logits = rng.normal(0, 2, (n, classes)).astype(np.float32)
        regression = (rng.normal(0, 0.05, (n, 4 * classes)) * (kind != "ties")).astype(np.float32)
        low = DTYPES[dtype] or torch.float32
        case = Case(
            kind,
            dtype,
            torch.from_numpy(logits).to(low),
            torch.from_numpy(regression).to(low),
            torch.from_numpy(_boxes(rng, n, size)).to(low),
            (int(size), int(size)),
            [],
        )
        b, s, _ = raw(case)
        case.settings = [_setting(rng, b, s) for _ in range(4)]
        cases.append(case)
    return cases


def _setting(rng, b: np.ndarray, s: np.ndarray) -> tuple[float, float, int]:
    # A threshold exactly at a float32 score, or just below it in float64 (same float32 value).
    t = float(s[int(rng.integers(0, len(s)))]) if len(s) else 0.05
    t = float(np.nextafter(t, 0.0)) if rng.uniform() < 0.5 else t
    t = float(rng.uniform(0, 0.9)) if rng.uniform() < 0.2 else t
    # An NMS IoU exactly at the float32 IoU of an overlapping pair.
    iou = box_iou(torch.from_numpy(b[:40]), torch.from_numpy(b[:40])).numpy()
    pairs = iou[np.triu_indices(len(iou), 1)] if len(iou) > 1 else np.zeros(0)
    pairs = pairs[(pairs > 0.05) & (pairs < 0.95)]
    u = float(rng.choice(pairs)) if len(pairs) else float(rng.uniform(0.2, 0.9))
    return t, u, int(rng.choice([5, 50, 100_000]))
