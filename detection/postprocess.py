"""What the detector keeps, decided once in fp32 and replayed exactly on cached raw predictions.

Per model input (a tile of a whole image, or a patch), the model's RoI heads (`ExactRoIHeads`)
decode boxes and scores in float32 whatever the autocast dtype, keep `score > box_score_thresh`
(compared in float32), run `class_nms` in the model's own resized coordinates and keep the first
`box_detections_per_img`. So `box_detections_per_img` counts **per model input** everywhere in this
project: in both evaluation protocols, in `predict` and in the served model. A whole image of
1360x1024 with 512x680 tiles is 9 model inputs, and the cap grows with the image's area.

Why not torchvision's own `postprocess_detections`: under bf16 autocast it decodes boxes in bf16
(coordinates rounded to 4-8 px) and `batched_nms` adds its per-class offset in that dtype, so the
boxes NMS compares depend on the dtype and on which other boxes are in the set; and above 1,000
boxes its class-by-class path reorders exactly tied scores with an unstable sort. `class_nms` runs
NMS class by class on the raw float32 coordinates, on the CPU, visiting candidates in one canonical
order (score descending, then label and coordinates), so its result depends only on the set.

Running the model once with score threshold 0, NMS off and no top-k cut (`raw_outputs`) and
replaying here gives the model's own output for any setting without another inference pass, bit
for bit (`bench/replay_exactness.py`). Greedy NMS never lets a lower-ranked box change a
higher-ranked box's fate, so `TileNms` answers every score threshold of one IoU from one NMS run.

Whole images: each tile owns the span up to the middle of its overlaps (`Tiles.core`), and a cell
whose two tiles' detections land on either side of a cut is kept once (`finish`). Only detections
that are one object seen by two tiles merge (each the other's nearest in its own tile); a tile
never merges two of its own detections, which its NMS already judged to be two objects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms

RAW_DETECTIONS_PER_IMG = 100_000
MIN_BOX_SIDE = 1e-2  # px: torchvision's remove_small_boxes in postprocess_detections


@dataclass(frozen=True)
class PostProcess:
    """The settings that decide what the detector keeps (the tune study's search space)."""

    score_thresh: float = 0.05  # keep scores > this (torchvision's rule), in [0, 1]
    nms_thresh: float = 0.8  # box IoU above which NMS drops the lower-ranked box
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


# --- NMS in one canonical order ----------------------------------------------------------------


def canonical_order(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(D,) int64 indices visiting candidates by descending score, ties by label then x1, y1, x2, y2:
    an order that depends on the set alone, not on how it was listed."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -np.asarray(scores)))


def class_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, agnostic: bool) -> np.ndarray:
    """(K,) int64 survivors in canonical order of (D, 4) float32 x1y1x2y2 boxes with (D,) scores and
    (D,) labels: greedy NMS dropping a box whose IoU with a better kept one of its class (any class
    if `agnostic`) exceeds `iou`. Ranks stand in for scores, so no two candidates tie."""
    order = canonical_order(boxes, scores, labels)
    if len(order) == 0 or iou >= 1.0:  # IoU never exceeds 1: nothing is suppressed
        return order
    b = torch.from_numpy(np.ascontiguousarray(np.asarray(boxes, np.float32).reshape(-1, 4)[order]))
    rank = torch.arange(len(order), 0, -1, dtype=torch.float32)  # strictly decreasing along `order`
    lab = np.asarray(labels)[order]
    if agnostic:
        return order[np.sort(nms(b, rank, iou).numpy())]
    kept = []
    for c in np.unique(lab):
        mine = np.flatnonzero(lab == c)
        index = torch.from_numpy(mine)
        kept.append(mine[nms(b[index], rank[index], iou).numpy()])
    return order[np.sort(np.concatenate(kept))]


class ExactRoIHeads(RoIHeads):
    """torchvision's RoIHeads with post-processing decided in float32 by `class_nms`, so the model's
    own output equals the replay of its raw outputs under any autocast dtype and on any device.
    Same parameters and state_dict keys as RoIHeads; `build_model` gives every model this class."""

    nms_class_agnostic = False

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        with torch.autocast(class_logits.device.type, enabled=False):
            proposals = [p.float() for p in proposals]
            boxes = self.box_coder.decode(box_regression.float(), proposals)
            scores = torch.softmax(class_logits.float(), -1)
        out_boxes, out_scores, out_labels = [], [], []
        sizes = [len(p) for p in proposals]
        for b, s, shape in zip(boxes.split(sizes), scores.split(sizes), image_shapes):
            b, s, lab = self._candidates(b, s, shape)
            keep = class_nms(
                b.cpu().numpy(), s.cpu().numpy(), lab.cpu().numpy(), self.nms_thresh, self.nms_class_agnostic
            )
            keep = torch.from_numpy(keep[: self.detections_per_img]).to(b.device)
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
            out_labels.append(lab[keep])
        return out_boxes, out_scores, out_labels

    def _candidates(self, boxes, scores, shape):
        """Every (box, class) of one input above the score threshold, background dropped, clipped."""
        boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
        labels = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)[:, 1:].reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        # A Python float compared with a float32 tensor is rounded to float32 first, as `above` does.
        inds = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        keep = box_ops.remove_small_boxes(boxes, min_size=MIN_BOX_SIDE)
        return boxes[keep], scores[keep], labels[keep]


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
    """Set a model's own post-processing to `pp`."""
    r = model.roi_heads
    r.score_thresh, r.nms_thresh, r.detections_per_img = pp.score_thresh, pp.nms_thresh, pp.detections_per_img
    r.nms_class_agnostic = pp.class_agnostic


def above(scores_desc: np.ndarray, score_thresh: float) -> int:
    """How many of the descending float32 scores the model keeps: `score > t`, with t cast to float32."""
    return int(np.searchsorted(-scores_desc, -np.float32(score_thresh), side="left"))


def replay_tile(nms_boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, pp: PostProcess) -> np.ndarray:
    """Indices of one model input's raw detections that the model keeps with `pp`, best first.

    nms_boxes: (D, 4) float32 x1y1x2y2 in the model's resized pixels (what NMS saw);
    scores: (D,) float32, in canonical order (descending); labels: (D,) int64, 1-based.
    """
    n = above(scores, pp.score_thresh)
    return class_nms(nms_boxes[:n], scores[:n], labels[:n], pp.nms_thresh, pp.class_agnostic)[: pp.detections_per_img]


class TileNms:
    """NMS survivors of one model input's raw detections (in canonical order) for one IoU, at every
    score threshold: the detections above a threshold are a prefix, so their NMS is a prefix of one."""

    def __init__(self, nms_boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, agnostic: bool):
        self.keep = class_nms(nms_boxes, scores, labels, iou, agnostic)
        self.neg_scores = -scores[self.keep]  # ascending, for searchsorted

    def survivors_at(self, neg_thresh) -> tuple[np.ndarray, int]:
        """For the threshold(s) -neg_thresh (float32): all survivors, best first, and how many of them
        `replay_tile` keeps before its top-k cut."""
        return self.keep, self.neg_scores.searchsorted(neg_thresh)

    def survivors(self, score_thresh: float) -> np.ndarray:
        """The indices `replay_tile` keeps before its top-k cut, best first."""
        keep, n = self.survivors_at(-np.float32(score_thresh))
        return keep[:n]


# --- tiles of a whole image --------------------------------------------------------------------


@dataclass
class Tiles:
    """Raw detections of one evaluated item (a whole image or a patch), model input by model input.

    Detections are sorted by tile, then in canonical order. A tile owns the span up to the middle
    of its overlaps with its neighbours (`core`), so each detection belongs to one tile; a cell
    straddling a cut can still be found by two tiles, and `finish` keeps it once.
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


def best_first(tiles: Tiles, kept: np.ndarray) -> np.ndarray:
    """Per-tile survivors (concatenated in tile order) by descending score; ties keep that order."""
    return kept[np.argsort(-tiles.scores[kept], kind="stable")]


@dataclass(frozen=True)
class Neighbours:
    """Every pair of detections within the radius that `finish` may link, as directed edges, sorted
    by source, then the target's tile, then distance and the target's rank: a source's nearest
    detection in each other tile comes first. Positions index a best-first list."""

    src: np.ndarray  # (E,) int
    dst: np.ndarray  # (E,) int

    @classmethod
    def of(cls, tiles: Tiles, order: np.ndarray, radius: float, agnostic: bool) -> Neighbours:
        """Edges between the detections `order` (best first) of different tiles and, unless NMS is
        class-agnostic, of the same class."""
        centres = tiles.centres[order].astype(np.float64)
        pairs = cKDTree(centres).query_pairs(radius * (1 + 1e-9) + 1e-9, output_type="ndarray").reshape(-1, 2)
        tile, label = tiles.tile[order], tiles.labels[order]
        mine = tile[pairs[:, 0]] != tile[pairs[:, 1]]
        if not agnostic:
            mine &= label[pairs[:, 0]] == label[pairs[:, 1]]
        pairs = pairs[mine]
        dist = np.hypot(*(centres[pairs[:, 0]] - centres[pairs[:, 1]]).T)
        pairs, dist = pairs[dist <= radius], dist[dist <= radius]  # the radius is inclusive, as in matching
        src, dst, dist = (
            np.concatenate([pairs[:, 0], pairs[:, 1]]),
            np.concatenate([pairs[:, 1], pairs[:, 0]]),
            np.tile(dist, 2),
        )
        by = np.lexsort((dst, dist, tile[dst], src))
        return cls(src[by], dst[by])

    def first_of_group(self, tile: np.ndarray) -> np.ndarray:
        """(E,) bool: the edge goes to its source's nearest detection in the target's tile."""
        group = np.stack([self.src, tile[self.dst]], 1)
        first = np.ones(len(self.src), bool)
        first[1:] = np.any(group[1:] != group[:-1], axis=1)
        return first


def mutual_links(edges: Neighbours, tile: np.ndarray) -> np.ndarray:
    """(L, 2) int positions (better, worse) of detections that are each other's nearest in the other's
    tile: one object seen by two tiles."""
    first = edges.first_of_group(tile)
    nearest = set(zip(edges.src[first].tolist(), edges.dst[first].tolist()))
    links = [(a, b) for a, b in nearest if a < b and (b, a) in nearest]
    return np.array(sorted(links, key=lambda ab: ab[1]), np.int64).reshape(-1, 2)


def drop_linked(owned: np.ndarray, links: np.ndarray) -> np.ndarray:
    """(N,) bool kept: owned detections, each dropped when linked to a better kept one. `links` are
    (better, worse) positions sorted by the worse, so every better one's fate is known first."""
    alive = owned.copy()
    for better, worse in links.tolist():
        if alive[better]:
            alive[worse] = False
    return alive


def finish(tiles: Tiles, kept: np.ndarray, radius: float, agnostic: bool = False) -> np.ndarray:
    """Per-tile survivors (concatenated in tile order) -> owned ones, best first, a cell seen by two
    tiles across a cut kept once (its better detection)."""
    order = best_first(tiles, kept)
    owned = tiles.owned[order]
    if len(np.unique(tiles.tile[order])) < 2:
        return order[owned]
    links = mutual_links(Neighbours.of(tiles, order, radius, agnostic), tiles.tile[order])
    links = links[owned[links[:, 0]] & owned[links[:, 1]]] if len(links) else links
    return order[drop_linked(owned, links)]


def keep(tiles: Tiles, pp: PostProcess, radius: float) -> np.ndarray:
    """Indices of an item's raw detections that the deployed detector keeps with `pp`, best first:
    the model's own post-processing per tile, then ownership and the merge across tile cuts."""
    parts = [
        lo + replay_tile(tiles.nms_boxes[lo:hi], tiles.scores[lo:hi], tiles.labels[lo:hi], pp)
        for lo, hi in tiles.slices()
    ]
    return finish(tiles, np.concatenate(parts) if parts else np.zeros(0, np.int64), radius, pp.class_agnostic)


@dataclass(frozen=True)
class PrefixPlan:
    """What `finish` keeps of every prefix of one best-first list of per-tile survivors, for replays
    at every score threshold.

    A merge link needs both detections present and neither tile's nearer competitor present, so a
    lower-scored detection can break a link between better ones: what is kept at a higher threshold
    is not always a prefix of what is kept at a lower one. Links break only at a few places; between
    them (`starts[j] <= m < starts[j + 1]`) the first m detections keep `lists[j]` cut at m.
    """

    order: np.ndarray  # (U,) indices into the item's detections, best first
    starts: np.ndarray  # (J,) int prefix lengths at which the kept list changes beyond a cut
    lists: list[np.ndarray]  # J arrays of positions into `order`, ascending

    @classmethod
    def of(cls, tiles: Tiles, kept: np.ndarray, radius: float, agnostic: bool) -> PrefixPlan:
        order = best_first(tiles, kept)
        n, owned = len(order), tiles.owned[order]
        if len(np.unique(tiles.tile[order])) < 2:
            return cls(order, np.zeros(1, np.int64), [np.flatnonzero(owned)])
        edges = Neighbours.of(tiles, order, radius, agnostic)
        tile = tiles.tile[order]
        # A link (x, y), x < y, lives for prefixes m with y < m <= p: p is the first position of a
        # competitor, a detection of y's tile nearer to x than y or of x's tile nearer to y than x.
        prior = _prior_min(edges, tile, n)
        first = {(a, b): p for a, b, p in zip(edges.src.tolist(), edges.dst.tolist(), prior.tolist())}
        links = [
            (a, b, min(p, first[(b, a)]))
            for (a, b), p in first.items()
            if a < b and owned[a] and owned[b] and min(p, first[(b, a)]) > b
        ]
        links.sort(key=lambda x: x[1])
        starts = np.unique([0] + [p + 1 for _, _, p in links if p < n])
        ends = np.append(starts[1:] - 1, n)
        lists = []
        for end in ends.tolist():
            live = np.array([(a, b) for a, b, p in links if b < end <= p], np.int64).reshape(-1, 2)
            lists.append(np.flatnonzero(drop_linked(owned & (np.arange(n) < end), live)))
        return cls(order, starts, lists)

    def kept(self, m: int) -> np.ndarray:
        """What `finish` keeps of the first m detections of `order` (indices, best first)."""
        j = int(np.searchsorted(self.starts, m, side="right")) - 1
        positions = self.lists[j]
        return self.order[positions[: np.searchsorted(positions, m)]]


def _prior_min(edges: Neighbours, tile: np.ndarray, n: int) -> np.ndarray:
    """(E,) int: for each edge, the lowest position among the targets its source reaches first in the
    same tile (nearer, or as near and ranked better); n when there is none."""
    if len(edges.src) == 0:
        return np.zeros(0, np.int64)
    group = np.cumsum(edges.first_of_group(tile)) - 1
    big = np.int64(n + 1)
    # One running minimum over all groups: offsetting each group below the ones before resets it.
    shifted = edges.dst.astype(np.int64) - group * big
    running = np.minimum.accumulate(shifted)
    prior = np.full(len(shifted), n, np.int64)
    later = ~edges.first_of_group(tile)
    prior[later] = running[np.flatnonzero(later) - 1] + group[later] * big
    return prior
