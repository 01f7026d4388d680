"""Score a prediction cache: counts at the operating point, every threshold's curve, bootstrap
intervals over images, and COCO AP from faster-coco-eval. Pure functions of the cache."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from .inference import Cache
from .matching import PREFIX_MATCHERS, Counts, match
from .postprocess import NmsOrder, PostProcess, replay

THRESHOLDS = np.round(np.linspace(0.0, 0.99, 100), 2)


def flags(cache: Cache, i: int, kept: np.ndarray, method: str, radius: float) -> np.ndarray:
    """True-positive flags of item i's detections `kept` (indices in score order), class by class."""
    boxes, scores, labels = cache.detections(i)
    points, gt_labels, gt_boxes = cache.ground_truth(i)
    tp = np.zeros(len(kept), dtype=bool)
    for c in np.unique(np.concatenate([labels[kept], gt_labels])):
        mine, cells = labels[kept] == c, gt_labels == c
        tp[mine] = match(method, boxes[kept][mine], scores[kept][mine], points[cells], gt_boxes[cells], radius)
    return tp


@dataclass(frozen=True)
class Scored:
    """What an item keeps under one post-processing, and which of those are true positives."""

    kept: list[np.ndarray]  # per item: indices into its raw detections, best first
    tp: list[np.ndarray]
    cells: list[int]

    def counts(self) -> list[Counts]:
        return [Counts(int(t.sum()), int(len(t) - t.sum()), n - int(t.sum())) for t, n in zip(self.tp, self.cells)]


def score(cache: Cache, pp: PostProcess, method: str, radius: float) -> Scored:
    kept, tp, cells = [], [], []
    for i in range(len(cache)):
        boxes, scores, labels = cache.detections(i)
        k = replay(boxes, scores, labels, pp)
        kept.append(k)
        tp.append(flags(cache, i, k, method, radius))
        cells.append(len(cache.ground_truth(i)[0]))
    return Scored(kept, tp, cells)


class Replayer:
    """Counts of any post-processing over a cache: NMS and matching run once per IoU value,
    then every score threshold and top-k is a binary search and a cumulative sum."""

    def __init__(self, cache: Cache, matching: str, radius: float):
        if matching not in PREFIX_MATCHERS:
            raise ValueError(f"matching={matching!r} cannot be replayed per threshold; use one of {PREFIX_MATCHERS}")
        self.cache, self.matching, self.radius = cache, matching, radius
        self.cells = sum(len(cache.ground_truth(i)[0]) for i in range(len(cache)))
        self._prepared: dict[tuple[float, bool], list[tuple[NmsOrder, np.ndarray]]] = {}

    def prepared(self, iou: float, agnostic: bool) -> list[tuple[NmsOrder, np.ndarray]]:
        key = (round(iou, 6), agnostic)
        if key not in self._prepared:
            per_item = []
            for i in range(len(self.cache)):
                order = NmsOrder(*self.cache.detections(i), iou, agnostic)
                tp = flags(self.cache, i, order.index, self.matching, self.radius)
                per_item.append((order, np.concatenate([[0], np.cumsum(tp)])))
            self._prepared[key] = per_item
        return self._prepared[key]

    def counts(self, pp: PostProcess) -> Counts:
        tp = kept = 0
        for order, cum_tp in self.prepared(pp.nms_thresh, pp.class_agnostic):
            n = order.kept(pp.score_thresh, pp.detections_per_img)
            kept += n
            tp += int(cum_tp[n])
        return Counts(tp, kept - tp, self.cells - tp)


def curve(cache: Cache, pp: PostProcess, method: str, radius: float, thresholds=THRESHOLDS) -> pd.DataFrame:
    """Detection rate, FDR, precision and F1 at every score threshold, the rest of `pp` fixed.

    With a prefix matcher one NMS and one matching per item serve all thresholds (the Replayer);
    Hungarian matching is redone at each threshold.
    """
    at = [replace(pp, score_thresh=float(t)) for t in thresholds]
    if method in PREFIX_MATCHERS:
        replayer = Replayer(cache, method, radius)
        c = [replayer.counts(p) for p in at]
    else:
        c = [sum(score(cache, p, method, radius).counts(), Counts(0, 0, 0)) for p in at]
    table = pd.DataFrame({"threshold": thresholds, "tp": [x.tp for x in c], "fp": [x.fp for x in c],
                          "fn": [x.fn for x in c]})
    table["detection_rate"] = [x.detection_rate for x in c]
    table["fdr"] = [x.false_discovery_rate for x in c]
    table["precision"] = [x.precision for x in c]
    table["f1"] = [x.f1 for x in c]
    return table


def per_image(cache: Cache, scored: Scored) -> pd.DataFrame:
    """Counts summed over each image's items (patches or tiles), one row per image."""
    df = pd.DataFrame([{"image": str(cache.items_name[i]), "tp": c.tp, "fp": c.fp, "fn": c.fn}
                       for i, c in enumerate(scored.counts())])
    df = df.groupby("image", sort=True, as_index=False).sum()
    counts = [Counts(r.tp, r.fp, r.fn) for r in df.itertuples()]
    df["cells"] = df.tp + df.fn
    df["detection_rate"] = [c.detection_rate for c in counts]
    df["fdr"] = [c.false_discovery_rate for c in counts]
    df["f1"] = [c.f1 for c in counts]
    return df


def _ratio(num, den):
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


_STATISTICS = {
    "detection_rate": lambda tp, fp, fn: _ratio(tp, tp + fn),
    "fdr": lambda tp, fp, fn: _ratio(fp, tp + fp),
    "f1": lambda tp, fp, fn: _ratio(2 * tp, 2 * tp + fp + fn),
}


def bootstrap(images: pd.DataFrame, seed: int = 0, n_resamples: int = 2000) -> dict[str, tuple[float, float]]:
    """95% percentile intervals over images (resampled whole, counts summed): 12 images is a small sample."""
    data = tuple(images[k].to_numpy(dtype=np.float64) for k in ("tp", "fp", "fn"))
    out = {}
    for name, fn in _STATISTICS.items():
        if len(images) < 2:
            value = float(fn(*(d.sum() for d in data)))
            out[name] = (value, value)
            continue

        def statistic(tp, fp, fn_, axis=-1, fn=fn):
            return fn(tp.sum(axis=axis), fp.sum(axis=axis), fn_.sum(axis=axis))

        res = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                              confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
        out[name] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return out


def coco_ap(cache: Cache, kept: list[np.ndarray]) -> tuple[float, float]:
    """COCO AP@[.5:.95] and AP50 of the kept detections against the point boxes (faster-coco-eval).

    maxDets is raised above the densest item's cell count: COCO's default 100 would cut dense
    images short. 0 when there are no detections; NaN when there are no cells at all.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    images, annotations, results = [], [], []
    densest = 1
    for i in range(len(cache)):
        h, w = cache.items_size[i]
        images.append({"id": i, "width": int(w), "height": int(h)})
        _, gt_labels, gt_boxes = cache.ground_truth(i)
        densest = max(densest, len(gt_boxes), len(kept[i]))
        for b, lab in zip(gt_boxes, gt_labels):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(lab), "iscrowd": 0,
                                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        boxes, scores, labels = cache.detections(i)
        for b, s, lab in zip(boxes[kept[i]], scores[kept[i]], labels[kept[i]]):
            results.append({"image_id": i, "category_id": int(lab), "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    if not annotations:
        return float("nan"), float("nan")
    if not results:
        return 0.0, 0.0
    categories = sorted({a["category_id"] for a in annotations} | {r["category_id"] for r in results})
    gt = COCO({"images": images, "annotations": annotations, "categories": [{"id": c} for c in categories]})
    ev = COCOeval_faster(gt, gt.loadRes(results), "bbox", print_function=lambda *a, **k: None)
    ev.params.maxDets = [1, 10, densest + 1]
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [iou, recall, class] at area 'all', the largest maxDets
    return _mean_valid(precision), _mean_valid(precision[0])


def _mean_valid(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else float("nan")
