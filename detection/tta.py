"""Test-time augmentation with point fusion: fewer false positives at the same detection rate.

The detector runs on the image and on its flips (`eval.tta_views`). Each view's detections are kept
as the deployed detector keeps them (its post-processing per tile, ownership, the merge across
cuts), mapped back to the image, and fused per cell: detections of different views within the
match radius form one cluster (at most one per view, greedily in score order), placed at the
score-weighted mean and scored by the mean over the views, a view that missed counting 0. A cell
every view finds keeps its score; a false positive one view dreams up loses most of it. The fused
score is then thresholded at `eval.tta_thresh`.

Fusion of identical views equals the single view; with a set of views closed under a flip (all
four, or none+h for horizontal flips), a flipped image's fused detections are the mirrored ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .inference import Cache
from .postprocess import RAW_DETECTIONS_PER_IMG, PostProcess, keep


def flip(image: np.ndarray, view: str) -> np.ndarray:
    """The image as the detector sees it in `view` (h: left-right, v: top-bottom, hv: both)."""
    if "h" in view:
        image = image[:, ::-1]
    if "v" in view:
        image = image[::-1]
    return np.ascontiguousarray(image)


def unflip(boxes: np.ndarray, view: str, height: int, width: int) -> np.ndarray:
    """Boxes found in `view` in the unflipped image's pixels (a flip is its own inverse)."""
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    if "h" in view:
        out[:, [0, 2]] = width - out[:, [2, 0]]
    if "v" in view:
        out[:, [1, 3]] = height - out[:, [3, 1]]
    return out


@dataclass(frozen=True)
class Fused:
    boxes: np.ndarray  # (F, 4) float32, score-weighted mean of the cluster's boxes
    scores: np.ndarray  # (F,) float32, mean over all views (0 for a view that missed)
    labels: np.ndarray  # (F,) int64
    votes: np.ndarray  # (F,) int: views that found it


def fuse(views: list[tuple[np.ndarray, np.ndarray, np.ndarray]], radius: float) -> Fused:
    """Fuse the kept (boxes, scores, labels) of each view, all in the same image's pixels."""
    n_views = len(views)
    boxes = np.concatenate([v[0].reshape(-1, 4) for v in views]).astype(np.float64)
    scores = np.concatenate([v[1] for v in views]).astype(np.float64)
    labels = np.concatenate([v[2] for v in views]).astype(np.int64)
    view = np.concatenate([np.full(len(v[1]), k) for k, v in enumerate(views)])
    if len(scores) == 0:
        return Fused(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, int))
    from scipy.spatial import cKDTree

    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    order = np.lexsort((view, -scores))  # best first; ties by view
    tree = cKDTree(centres)
    taken = np.zeros(len(scores), bool)
    out_boxes, out_scores, out_labels, out_votes = [], [], [], []
    for seed in order:
        if taken[seed]:
            continue
        members, seen = [seed], {view[seed]}
        taken[seed] = True
        near = [k for k in tree.query_ball_point(centres[seed], radius) if not taken[k] and labels[k] == labels[seed]]
        for k in sorted(near, key=lambda k: (np.hypot(*(centres[k] - centres[seed])), -scores[k], view[k])):
            if view[k] not in seen:
                members.append(k)
                seen.add(view[k])
                taken[k] = True
        w = scores[members]
        weights = w if w.sum() > 0 else None
        out_boxes.append(np.average(boxes[members], axis=0, weights=weights))
        out_scores.append(w.sum() / n_views)
        out_labels.append(labels[seed])
        out_votes.append(len(members))
    best = np.argsort(-np.asarray(out_scores), kind="stable")
    return Fused(
        np.asarray(out_boxes, np.float32)[best],
        np.asarray(out_scores, np.float32)[best],
        np.asarray(out_labels, np.int64)[best],
        np.asarray(out_votes)[best],
    )


def kept_in_view(cache: Cache, i: int, view: str, pp: PostProcess, radius: float):
    """Item i's detections kept in `view` (its cache made on the flipped item), in item pixels."""
    lo = cache.det_range(i)[0]
    k = lo + keep(cache.tiles(i), pp, radius)
    h, w = (int(x) for x in cache.items_size[i])
    return unflip(cache.det_boxes[k], view, h, w), cache.det_scores[k], cache.det_labels[k]


def fused_postprocess(tta_thresh: float) -> PostProcess:
    """Replays a fused cache: its detections are already kept, so only the fused threshold acts."""
    return PostProcess(tta_thresh, 1.0, RAW_DETECTIONS_PER_IMG, False)


def fused_cache(caches: dict[str, Cache], pp: PostProcess, radius: float) -> Cache:
    """One cache of fused detections, one pseudo-tile per item, from the raw cache of each view
    (`none` included). Judged with `fused_postprocess`, every metric, curve and interval of the
    evaluation applies unchanged."""
    base = caches["none"]
    parts = [fuse([kept_in_view(c, i, v, pp, radius) for v, c in caches.items()], radius) for i in range(len(base))]
    return kept_cache(
        base,
        [(f.boxes, f.scores, f.labels) for f in parts],
        {"tta_views": list(caches), "postprocess_per_view": pp.__dict__},
    )


def kept_where(cache: Cache, keep, meta: dict) -> Cache:
    """A kept cache of the detections `keep(k)` marks, item by item (`k`: the item's slice of det_*)."""
    parts = []
    for i in range(len(cache)):
        k = slice(*cache.det_range(i))
        sel = keep(k)
        parts.append((cache.det_boxes[k][sel], cache.det_scores[k][sel], cache.det_labels[k][sel]))
    return kept_cache(cache, parts, meta)


def kept_cache(base: Cache, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], meta: dict) -> Cache:
    """A cache of detections already kept, one pseudo-tile per item of `base` holding that item's
    (boxes, scores, labels), best first: judged with `fused_postprocess`, only its threshold acts."""
    n = len(base)
    order = [np.argsort(-np.asarray(s), kind="stable") for _, s, _ in parts]
    counts = [len(s) for _, s, _ in parts]
    det_tile = np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(counts)]) if n else np.zeros(0, np.int32)
    boxes = (
        np.concatenate([np.asarray(b, np.float32).reshape(-1, 4)[o] for (b, _, _), o in zip(parts, order)])
        if n
        else np.zeros((0, 4), np.float32)
    )
    scores = (
        np.concatenate([np.asarray(s, np.float32)[o] for (_, s, _), o in zip(parts, order)])
        if n
        else np.zeros(0, np.float32)
    )
    labels = (
        np.concatenate([np.asarray(lab, np.int64)[o] for (_, _, lab), o in zip(parts, order)])
        if n
        else np.zeros(0, np.int64)
    )
    inf = np.inf
    return replace(
        base,
        tiles_item=np.arange(n, dtype=np.int32),
        tiles_origin=np.zeros((n, 2), np.int64),
        tiles_core=np.tile(np.array([-inf, -inf, inf, inf]), (n, 1)),
        det_tile=det_tile,
        det_boxes=boxes,
        det_nms_boxes=boxes,
        det_scores=scores,
        det_labels=labels,
        meta=base.meta | meta | {"kept": True},
    )
