"""Match detections to annotated cells and score them, as pure numpy.

A detection matches a cell when its box centre lies within `radius` pixels of the cell's point,
one-to-one, greedily in score order: each detection takes the nearest cell still unmatched (the
COCO and OCELOT convention). A detection's fate never depends on lower-scored ones, so one pass
gives the counts at every score threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


def box_centres(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])


def greedy_match(centres: np.ndarray, scores: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """For each detection (in the given order), whether it is a true positive.

    Detections are visited by descending score (stable, so ties keep their given order).
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    tp = np.zeros(len(centres), dtype=bool)
    if len(centres) == 0 or len(points) == 0:
        return tp
    tree = cKDTree(points)
    taken = np.zeros(len(points), dtype=bool)
    candidates = tree.query_ball_point(centres, r=radius)
    for i in np.argsort(-np.asarray(scores), kind="stable"):
        near = [j for j in candidates[i] if not taken[j]]
        if near:
            d = np.linalg.norm(points[near] - centres[i], axis=1)
            j = near[int(np.argmin(d))]
            taken[j] = True
            tp[i] = True
    return tp


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    fn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def detection_rate(self) -> float:
        """Recall: the share of annotated cells found (the paper's 99.02%). 0 when there are no cells."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def false_discovery_rate(self) -> float:
        """FP / detections. 0 when nothing is detected: no detection is a false one."""
        return self.fp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def precision(self) -> float:
        return 1.0 - self.false_discovery_rate if self.tp + self.fp else 0.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else 0.0


def count_at(scores: np.ndarray, tp: np.ndarray, n_cells: int, score_thresh: float) -> Counts:
    """Counts when only detections scoring above `score_thresh` are kept (torchvision keeps s > t)."""
    keep = np.asarray(scores) > score_thresh
    n_tp = int(np.count_nonzero(np.asarray(tp)[keep]))
    return Counts(n_tp, int(np.count_nonzero(keep)) - n_tp, n_cells - n_tp)
