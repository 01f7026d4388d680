"""Replay torchvision's detection post-processing on cached raw predictions, exactly.

Per model input (a tile of a whole image, or a patch), `RoIHeads.postprocess_detections` keeps
`score > box_score_thresh` (compared in float32), runs `batched_nms(boxes, scores, labels,
box_nms_thresh)` on that set in the model's own (resized) coordinates, and keeps the first
`box_detections_per_img`. So `box_detections_per_img` counts **per model input** everywhere in
this project: in both evaluation protocols, in `predict` and in the served model. A whole image
of 1360x1024 with 512x680 tiles is 9 model inputs, and the cap grows with the image's area.

Running the model once with those switched off (`raw_outputs`) and replaying them here gives the
model's own output for any setting without another inference pass. `replay_tile` calls the same
torchvision functions on the same float32 set, so it agrees with the model exactly.

`TileNms` answers every threshold at once. `batched_nms` has two paths: above 1,000 boxes (CPU;
25,000 on CUDA) it runs NMS class by class on the raw coordinates; below, it shifts each class by
(largest coordinate of the set + 1) x label, so the coordinates NMS sees depend on the thresholded
set. Thresholds are grouped by that path and offset. Within a group NMS sees identical coordinates,
and greedy NMS never lets a lower-scored box change a higher-scored box's fate, so each threshold
of a group is a prefix of one NMS run: exact, not approximate.

Remaining differences, both below float32 resolution: boxes of exactly equal score may be ordered
differently from the model (torchvision sorts its unordered candidates, we sort the cached ones);
and a cache made on CUDA is replayed with the CPU NMS kernel, whose IoU can differ from the CUDA
kernel's in the last bit, so a pair whose IoU is within 1 ulp of the threshold may be decided
the other way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import nms
from torchvision.ops.boxes import _batched_nms_coordinate_trick, _batched_nms_vanilla

RAW_DETECTIONS_PER_IMG = 100_000


@dataclass(frozen=True)
class PostProcess:
    """The settings that decide what the detector keeps (the tune study's search space)."""

    score_thresh: float = 0.05  # keep scores > this (torchvision's rule), in [0, 1]
    nms_thresh: float = 0.8  # box IoU above which NMS drops the lower-scored box
    detections_per_img: int = 200  # per model input (tile or patch)
    class_agnostic: bool = False

    @classmethod
    def of_config(cls, m) -> PostProcess:
        """The post-processing a ModelConfig asks for."""
        return cls(m.box_score_thresh, m.box_nms_thresh, m.box_detections_per_img, m.box_nms_class_agnostic)

    def as_overrides(self) -> list[str]:
        """The same settings as config overrides, for a model version that carries them."""
        return [
            f"model.box_score_thresh={self.score_thresh}",
            f"model.box_nms_thresh={self.nms_thresh}",
            f"model.box_detections_per_img={self.detections_per_img}",
            f"model.box_nms_class_agnostic={str(self.class_agnostic).lower()}",
        ]


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


def vanilla_above(device_type: str) -> int:
    """Box count above which `batched_nms` takes its class-by-class path on that device."""
    return (4000 if device_type == "cpu" else 100_000) // 4


def above(scores_desc: np.ndarray, score_thresh: float) -> int:
    """How many of the descending float32 scores torchvision keeps: `score > t`, with t cast to float32."""
    t = np.float32(score_thresh)
    return int(np.searchsorted(-scores_desc, -t, side="left"))


def _nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, path: str) -> np.ndarray:
    """(K,) int64 survivors, best first, of (D, 4) float32 x1y1x2y2 boxes with (D,) scores and labels,
    by the `batched_nms` path torchvision would take ("agnostic", "vanilla" or "coordinate trick")."""
    b, s, lab = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)
    if len(s) == 0:
        return np.zeros(0, np.int64)
    if path == "agnostic":
        return nms(b, s, iou).numpy()
    if path == "vanilla":
        return _batched_nms_vanilla(b, s, lab, iou).numpy()
    return _batched_nms_coordinate_trick(b, s, lab, iou).numpy()


def replay_tile(
    nms_boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, pp: PostProcess, device_type: str = "cpu"
) -> np.ndarray:
    """Indices of one model input's raw detections that the model keeps with `pp`, best first.

    nms_boxes: (D, 4) float32 x1y1x2y2 in the model's resized pixels (what NMS saw);
    scores: (D,) float32, descending; labels: (D,) int64, 1-based.
    """
    n = above(scores, pp.score_thresh)
    path = "agnostic" if pp.class_agnostic else "vanilla" if n > vanilla_above(device_type) else "trick"
    return _nms(nms_boxes[:n], scores[:n], labels[:n], pp.nms_thresh, path)[: pp.detections_per_img]


class TileNms:
    """NMS survivors of one model input's raw detections for one IoU, at every score threshold."""

    EMPTY = ("empty",)

    def __init__(
        self,
        nms_boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        iou: float,
        agnostic: bool,
        device_type: str = "cpu",
    ):
        self.boxes, self.scores, self.labels, self.iou = nms_boxes, scores, labels, iou
        self.neg_scores = -scores  # ascending, for searchsorted
        self.agnostic, self.limit = agnostic, vanilla_above(device_type)
        # The largest coordinate of each prefix: the offset `batched_nms` adds below `limit` boxes.
        self.prefix_max = np.maximum.accumulate(nms_boxes.max(axis=1)) if len(scores) else np.zeros(0, np.float32)
        self._groups: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def key(self, n: int) -> tuple:
        """The path (and offset) `batched_nms` takes on the first n boxes."""
        if self.agnostic:
            return ("agnostic",)
        return ("vanilla",) if n > self.limit else ("trick", float(self.prefix_max[n - 1]))

    def _survivors(self, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        """All survivors of a group (best first) and their negated scores: NMS on the longest prefix
        that takes this path and offset."""
        group = self._groups.get(key)
        if group is None:
            hi = len(self.scores)
            if key[0] == "trick":
                hi = min(self.limit, int(np.searchsorted(self.prefix_max, np.float32(key[1]), side="right")))
            keep = _nms(self.boxes[:hi], self.scores[:hi], self.labels[:hi], self.iou, key[0])
            group = self._groups[key] = (keep, -self.scores[keep])
        return group

    def groups(self) -> list[tuple[tuple, np.ndarray]]:
        """Every group any threshold can fall in, with all its survivors: to prepare them at once."""
        total = len(self.scores)
        ends = [total] if total and (self.agnostic or total > self.limit) else []
        if total and not self.agnostic:
            head = self.prefix_max[: min(total, self.limit)]
            ends += (np.flatnonzero(np.diff(head, append=np.inf) != 0) + 1).tolist()
        return [(k, self._survivors(k)[0]) for k in dict.fromkeys(self.key(n) for n in ends)]

    def survivors_at(self, neg_thresh: np.float32) -> tuple[tuple, np.ndarray, int]:
        """For the threshold -neg_thresh (float32): the NMS group, all its survivors (best first),
        and how many of them `replay_tile` keeps before its top-k cut."""
        n = int(self.neg_scores.searchsorted(neg_thresh))
        if n == 0:
            return self.EMPTY, np.zeros(0, np.int64), 0
        key = self.key(n)
        keep, neg = self._survivors(key)
        return key, keep, int(neg.searchsorted(neg_thresh))

    def survivors(self, score_thresh: float) -> tuple[tuple, np.ndarray]:
        """The group key and the indices `replay_tile` keeps before its top-k cut, best first."""
        key, keep, n = self.survivors_at(-np.float32(score_thresh))
        return key, keep[:n]


@dataclass
class Tiles:
    """Raw detections of one evaluated item (a whole image or a patch), model input by model input.

    Detections are sorted by tile, then by descending score. A tile owns the span up to the middle
    of its overlaps with its neighbours (`core`), so each detection belongs to one tile; a cell
    straddling a cut can still be found by two tiles, and `merge_across_tiles` keeps the better.
    """

    origin: np.ndarray  # (T, 2) int: x/y of each tile in item pixels
    core: np.ndarray  # (T, 4) float: x_lo, y_lo, x_hi, y_hi in item pixels (+-inf at item edges)
    tile: np.ndarray  # (D,) int: the tile of each detection
    boxes: np.ndarray  # (D, 4) float32: x1y1x2y2 in item pixels
    nms_boxes: np.ndarray  # (D, 4) float32: the same boxes in the model's resized pixels
    scores: np.ndarray  # (D,) float32
    labels: np.ndarray  # (D,) int64, 1-based

    def slices(self) -> list[tuple[int, int]]:
        bounds = np.searchsorted(self.tile, np.arange(len(self.origin) + 1))
        return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))

    @property
    def centres(self) -> np.ndarray:
        return (self.boxes[:, :2] + self.boxes[:, 2:]) / 2

    @property
    def owned(self) -> np.ndarray:
        """(D,) bool: the detection's centre lies in its own tile's core."""
        c, core = self.centres, self.core[self.tile]
        return (c[:, 0] >= core[:, 0]) & (c[:, 0] < core[:, 2]) & (c[:, 1] >= core[:, 1]) & (c[:, 1] < core[:, 3])


def merge_across_tiles(tiles: Tiles, order: np.ndarray, radius: float) -> np.ndarray:
    """Drop each detection lying within `radius` px of a better one of the same class kept from
    another tile. `order`: candidate indices, best first. Greedy in score order, so a detection's
    fate depends only on better ones (every score threshold is a prefix of the result)."""
    if len(order) < 2 or len(np.unique(tiles.tile[order])) < 2:
        return order
    from scipy.spatial import cKDTree

    pairs = cKDTree(tiles.centres[order]).query_pairs(radius, output_type="ndarray")  # i < j: i is better
    tile, label = tiles.tile[order], tiles.labels[order]
    pairs = pairs[(tile[pairs[:, 0]] != tile[pairs[:, 1]]) & (label[pairs[:, 0]] == label[pairs[:, 1]])]
    alive = np.ones(len(order), bool)
    for j, i in sorted(zip(pairs[:, 1].tolist(), pairs[:, 0].tolist())):
        if alive[i]:
            alive[j] = False
    return order[alive]


def finish(tiles: Tiles, kept: np.ndarray, radius: float) -> np.ndarray:
    """Per-tile survivors (concatenated in tile order) -> owned ones, best first, merged across cuts."""
    kept = kept[tiles.owned[kept]]
    return merge_across_tiles(tiles, kept[np.argsort(-tiles.scores[kept], kind="stable")], radius)


def keep(tiles: Tiles, pp: PostProcess, radius: float, device_type: str = "cpu") -> np.ndarray:
    """Indices of an item's raw detections that the deployed detector keeps with `pp`, best first:
    the model's own post-processing per tile, then ownership and the merge across tile cuts."""
    parts = [
        lo + replay_tile(tiles.nms_boxes[lo:hi], tiles.scores[lo:hi], tiles.labels[lo:hi], pp, device_type)
        for lo, hi in tiles.slices()
    ]
    return finish(tiles, np.concatenate(parts) if parts else np.zeros(0, np.int64), radius)
