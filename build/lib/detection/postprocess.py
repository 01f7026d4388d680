"""Replay torchvision's detection post-processing on cached raw predictions.

`RoIHeads.postprocess_detections` keeps `score > box_score_thresh`, runs per-class
`batched_nms(boxes, scores, labels, box_nms_thresh)` and keeps the first `box_detections_per_img`.
Running the model once with those switched off (`raw_outputs`) and replaying them here gives the
model's own output for any setting, without another inference pass.

Greedy NMS never lets a lower-scored box change the fate of a higher-scored one, so for one NMS
IoU the survivors above a score threshold are a prefix of the survivors of all boxes, and the
top-k cut is a prefix too: `NmsOrder` runs NMS once per IoU value and answers every threshold
and k by a binary search.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms, nms

RAW_DETECTIONS_PER_IMG = 100_000


@dataclass(frozen=True)
class PostProcess:
    """The settings that decide what the detector keeps (the tune study's search space)."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.8
    detections_per_img: int = 200
    class_agnostic: bool = False

    @classmethod
    def of_config(cls, m) -> PostProcess:
        """The post-processing a ModelConfig asks for."""
        return cls(m.box_score_thresh, m.box_nms_thresh, m.box_detections_per_img, m.box_nms_class_agnostic)

    def as_overrides(self) -> list[str]:
        """The same settings as config overrides, for a model version that carries them."""
        return [f"model.box_score_thresh={self.score_thresh}", f"model.box_nms_thresh={self.nms_thresh}",
                f"model.box_detections_per_img={self.detections_per_img}",
                f"model.box_nms_class_agnostic={str(self.class_agnostic).lower()}"]


@contextlib.contextmanager
def raw_outputs(model):
    """Switch the model's score threshold, NMS and top-k off: every candidate box comes out."""
    r = model.roi_heads
    saved = (r.score_thresh, r.nms_thresh, r.detections_per_img)
    r.score_thresh, r.nms_thresh, r.detections_per_img = 0.0, 1.0, RAW_DETECTIONS_PER_IMG
    try:
        yield model
    finally:
        r.score_thresh, r.nms_thresh, r.detections_per_img = saved


def apply(model, pp: PostProcess):
    """Set a model's own post-processing to `pp` (class-agnostic NMS is replay-only)."""
    if pp.class_agnostic:
        raise ValueError("torchvision's RoIHeads only runs per-class NMS; class_agnostic exists in replay only")
    r = model.roi_heads
    r.score_thresh, r.nms_thresh, r.detections_per_img = pp.score_thresh, pp.nms_thresh, pp.detections_per_img


def _nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float, agnostic: bool) -> torch.Tensor:
    return nms(boxes, scores, iou) if agnostic else batched_nms(boxes, scores, labels, iou)


def replay(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, pp: PostProcess) -> np.ndarray:
    """Indices of the raw detections the model would have kept with `pp`, best first."""
    idx = np.flatnonzero(scores > pp.score_thresh)
    keep = _nms(torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]), torch.from_numpy(labels[idx]),
                pp.nms_thresh, pp.class_agnostic)
    return idx[keep.numpy()][: pp.detections_per_img]


class NmsOrder:
    """NMS survivors of all raw boxes of one item for one IoU, in descending score."""

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, agnostic: bool):
        keep = _nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), iou, agnostic).numpy()
        self.index = keep
        self.neg_scores = -scores[keep]  # ascending, for searchsorted

    def kept(self, score_thresh: float, detections_per_img: int) -> int:
        """How many leading survivors `replay` keeps: those with score > thresh, at most k."""
        above = int(np.searchsorted(self.neg_scores, -score_thresh, side="left"))
        return min(above, detections_per_img)
