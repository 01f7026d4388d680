"""Match detections to annotated cells and score them, as pure numpy.

A detection matches a cell when its box centre lies within `radius` pixels of the cell's point,
one-to-one, greedily in score order: each detection takes the nearest cell still unmatched (the
COCO and OCELOT convention). A detection's fate never depends on lower-scored ones, so one pass
gives the counts at every score threshold. Two alternatives: `hungarian` (the most pairs within
the radius, for one set of detections at a time) and `iou` (box IoU >= 0.5, greedy like COCO).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from torchvision.ops import box_iou

from .choices import MATCHERS

IOU_MATCH = 0.5


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1y1x2y2 px -> (N, 2) float64 x/y px."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])


def greedy_match(centres: np.ndarray, scores: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """(D,) int: the cell each detection takes, or -1.

    centres: (D, 2) x/y px; scores: (D,); points: (P, 2) x/y px; radius in px (0 matches only
    coincident points). Detections are visited by descending score (stable, so ties keep their
    given order); each takes the nearest cell still free within the radius (of equally near ones,
    the first). All pairs within the radius are sorted once, so the visit is one pass over them.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    matched = np.full(len(centres), -1, dtype=np.int64)
    if len(centres) == 0 or len(points) == 0:
        return matched
    pairs = cKDTree(centres).sparse_distance_matrix(cKDTree(points), radius, output_type="ndarray")
    rank = np.empty(len(centres), np.int64)
    rank[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(len(centres))
    order = np.lexsort((pairs["j"], pairs["v"], rank[pairs["i"]]))
    taken = np.zeros(len(points), dtype=bool)
    for i, j in zip(pairs["i"][order].tolist(), pairs["j"][order].tolist()):
        if matched[i] < 0 and not taken[j]:
            matched[i], taken[j] = j, True
    return matched


def hungarian_match(centres: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """(D,) int: the cell of each detection under the one-to-one pairing within `radius` px with the
    most pairs (then the least total distance), or -1."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    matched = np.full(len(centres), -1, dtype=np.int64)
    if len(centres) == 0 or len(points) == 0:
        return matched
    dist = np.linalg.norm(centres[:, None] - points[None], axis=2)
    within = dist <= radius
    # An out-of-radius pair costs more than all in-radius pairs together (strictly, also at radius 0),
    # so pairs are maximised first.
    cost = np.where(within, dist, (radius + 1.0) * (min(len(centres), len(points)) + 1))
    rows, cols = linear_sum_assignment(cost)
    ok = within[rows, cols]
    matched[rows[ok]] = cols[ok]
    return matched


def iou_match(boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray, threshold: float = IOU_MATCH) -> np.ndarray:
    """(D,) int, COCO-style: in score order, each detection takes the free ground-truth box of highest
    IoU >= threshold, or -1. boxes (D, 4), gt_boxes (G, 4): x1y1x2y2 px."""
    matched = np.full(len(boxes), -1, dtype=np.int64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return matched
    iou = box_iou(torch.as_tensor(boxes, dtype=torch.float64), torch.as_tensor(gt_boxes, dtype=torch.float64)).numpy()
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        row = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(row))
        if row[j] >= threshold:
            taken[j] = True
            matched[i] = j
    return matched


def match(
    method: str, boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, gt_boxes: np.ndarray, radius: float
) -> np.ndarray:
    """(D,) int: each detection's cell (index into points) by the chosen matcher, or -1."""
    if method == "greedy":
        return greedy_match(box_centres(boxes), scores, points, radius)
    if method == "hungarian":
        return hungarian_match(box_centres(boxes), points, radius)
    if method == "iou":
        return iou_match(boxes, scores, gt_boxes)
    raise ValueError(f"matching={method!r} must be one of {', '.join(MATCHERS)}")


@dataclass(frozen=True)
class Counts:
    """Matched detections (tp), unmatched detections (fp) and cells no detection took (fn)."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def detection_rate(self) -> float:
        """Recall: the share of annotated cells found (the paper's 99.02%). NaN (undefined) when there
        are no cells: an image without cells says nothing about how many cells are found."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def false_discovery_rate(self) -> float:
        """FP / detections. 0 when nothing is detected: no detection is a false one."""
        return self.fp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def precision(self) -> float:
        """TP / detections = 1 - FDR, so 1 when nothing is detected (where a precision-recall curve
        starts, as scikit-learn's does)."""
        return 1.0 - self.false_discovery_rate

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else 0.0


def count_at(scores: np.ndarray, tp: np.ndarray, n_cells: int, score_thresh: float) -> Counts:
    """Counts when only detections scoring above `score_thresh` are kept (torchvision keeps s > t)."""
    keep = np.asarray(scores) > score_thresh
    n_tp = int(np.count_nonzero(np.asarray(tp)[keep]))  # tp: (D,) bool
    return Counts(n_tp, int(np.count_nonzero(keep)) - n_tp, n_cells - n_tp)
