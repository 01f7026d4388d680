"""Score a prediction cache: counts at the operating point, every threshold's curve, bootstrap
intervals over cases (patients), point AP with the project's own matching, and COCO box AP from
faster-coco-eval. Pure functions of the cache.

Units: every count is of annotated cells (`whole` protocol) or of cell-patch pairs (`paper`); a
cell or detection whose centre lies in the don't-care band along a patch edge inside the image
(`Cache.in_band`) is neither TP, FP nor FN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from .choices import PREFIX_MATCHERS
from .inference import Cache
from .matching import Counts, match
from .postprocess import PostProcess, TileNms, finish, keep

THRESHOLDS = np.round(np.linspace(0.0, 0.99, 100), 2)
# The comparison's sweep: fine below 0.1, where a detector trained to find every cell operates.
SWEEP = np.unique(np.concatenate([np.linspace(0, 0.1, 201), np.linspace(0.1, 0.995, 180)])).astype(np.float32)
# Bump whenever a metric's definition changes: evaluations are reused only when it matches.
METRICS_VERSION = 3
_CASE = re.compile(r"^(Case_\d+)-\d+$")


def case_of(name: str) -> str:
    """The patient (case) of a BreCaHAD image name, Case_N-MM -> Case_N."""
    m = _CASE.match(name)
    return m.group(1) if m else name


def classify(cache: Cache, i: int, kept: np.ndarray, method: str, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """True-positive and counted flags, (K,) bool each, of item i's kept detections (global det
    indices, best first). Matching runs class by class against every cell, then a detection in the
    don't-care band, or matched to a cell in it, is not counted."""
    points, gt_labels, gt_boxes = cache.ground_truth(i)
    boxes, scores, labels = cache.det_boxes[kept], cache.det_scores[kept], cache.det_labels[kept]
    cell_of = np.full(len(kept), -1, np.int64)
    for c in np.unique(np.concatenate([labels, gt_labels])):
        mine, cells = np.flatnonzero(labels == c), np.flatnonzero(gt_labels == c)
        m = match(method, boxes[mine], scores[mine], points[cells], gt_boxes[cells], radius)
        cell_of[mine[m >= 0]] = cells[m[m >= 0]]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    counted = ~cache.in_band(i, centres)
    counted[cell_of >= 0] &= ~cache.in_band(i, points)[cell_of[cell_of >= 0]]
    return (cell_of >= 0) & counted, counted


def counted_cells(cache: Cache, i: int) -> int:
    """Item i's cells outside the don't-care band."""
    return int((~cache.in_band(i, cache.ground_truth(i)[0])).sum())


@dataclass(frozen=True)
class Scored:
    """What each item keeps under one post-processing, and how each kept detection counts."""

    kept: list[np.ndarray]  # per item: (K,) int global det indices, best first
    tp: list[np.ndarray]  # per item: (K,) bool
    counted: list[np.ndarray]  # per item: (K,) bool, False in the don't-care band
    cells: list[int]  # per item: cells outside the band

    def counts(self) -> list[Counts]:
        out = []
        for t, c, n in zip(self.tp, self.counted, self.cells):
            tp = int(t.sum())
            out.append(Counts(tp, int(c.sum()) - tp, n - tp))
        return out


def _device(cache: Cache) -> str:
    return cache.meta.get("device", "cpu")


def score(cache: Cache, pp: PostProcess, method: str, radius: float) -> Scored:
    """Post-process every item of the cache as the deployed detector would (`keep`), then match its
    kept detections to its cells with `method` within `radius` px: the reference the fast paths
    (`Replayer`, `threshold_counts`) must equal."""
    kept, tp, counted, cells = [], [], [], []
    for i in range(len(cache)):
        k = cache.det_range(i)[0] + keep(cache.tiles(i), pp, radius, _device(cache))
        t, c = classify(cache, i, k, method, radius)
        kept.append(k)
        tp.append(t)
        counted.append(c)
        cells.append(counted_cells(cache, i))
    return Scored(kept, tp, counted, cells)


class Replayer:
    """Counts of any post-processing over a cache, exactly as `score` gives them, fast.

    Per model input, NMS runs once per IoU value and group of thresholds (`TileNms`). An item of
    one model input keeps a prefix of its survivors at every threshold and top-k, so its counts
    are a cumulative sum. An item of several tiles keeps a prefix of the union of its tiles'
    survivors while top-k binds in none of them (merging and matching are greedy in score order);
    when top-k binds, that item is post-processed and matched directly.
    """

    def __init__(self, cache: Cache, matching: str, radius: float):
        if matching not in PREFIX_MATCHERS:
            raise ValueError(f"matching={matching!r} cannot be replayed per threshold; use one of {PREFIX_MATCHERS}")
        self.cache, self.matching, self.radius = cache, matching, radius
        self.tiles = [cache.tiles(i) for i in range(len(cache))]
        self.offsets = [cache.det_range(i)[0] for i in range(len(cache))]
        self.cells = sum(counted_cells(cache, i) for i in range(len(cache)))
        self._nms: dict[tuple[float, bool], list[list[TileNms]]] = {}
        self._prefix: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def tile_nms(self, iou: float, agnostic: bool) -> list[list[TileNms]]:
        key = (round(iou, 6), agnostic)
        if key not in self._nms:
            self._nms[key] = [
                [
                    TileNms(t.nms_boxes[lo:hi], t.scores[lo:hi], t.labels[lo:hi], iou, agnostic, _device(self.cache))
                    for lo, hi in t.slices()
                ]
                for t in self.tiles
            ]
        return self._nms[key]

    def prepare(self, iou: float, agnostic: bool) -> None:
        """Run every NMS group of every model input for one IoU now, and the cumulative counts of
        single-input items, so that trials at this IoU only search (the bench times them apart)."""
        iou_key = (round(iou, 6), agnostic)
        for i, nms in enumerate(self.tile_nms(iou, agnostic)):
            for key, kept in nms[0].groups() if len(nms) == 1 else []:
                self._prefix_of((i, iou_key, key), i, [kept])
            for t in nms if len(nms) > 1 else []:
                t.groups()

    def _flags(self, i: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative TP and counted detections over item i's final kept list (local indices)."""
        tp, counted = classify(self.cache, i, self.offsets[i] + kept, self.matching, self.radius)
        return np.concatenate([[0], np.cumsum(tp)]), np.concatenate([[0], np.cumsum(counted)])

    def _prefix_of(self, key: tuple, i: int, survivors: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """For fixed NMS groups in every tile: the merged union of the tiles' survivors, best first,
        with its negated scores and cumulative TP and counted detections."""
        found = self._prefix.get(key)
        if found is None:
            tiles = self.tiles[i]
            full = [lo + s for (lo, _), s in zip(tiles.slices(), survivors)]
            kept = finish(tiles, np.concatenate(full), self.radius)
            found = self._prefix[key] = (-tiles.scores[kept], *self._flags(i, kept))
        return found

    def _item(self, i: int, nms: list[TileNms], iou_key: tuple, neg_t: np.float32, k: int) -> tuple[int, int]:
        if len(nms) == 1:
            # One model input: its kept list is the first min(survivors, k), all owned.
            group, keep, n = nms[0].survivors_at(neg_t)
            _, cum_tp, cum_counted = self._prefix_of((i, iou_key, group), i, [keep])
            n = min(n, k)
            return int(cum_tp[n]), int(cum_counted[n])
        picks = [t.survivors_at(neg_t) for t in nms]
        groups = tuple(g for g, _, _ in picks)
        if all(n <= k for _, _, n in picks):
            neg, cum_tp, cum_counted = self._prefix_of((i, iou_key, groups), i, [s for _, s, _ in picks])
            n = int(neg.searchsorted(neg_t))
            return int(cum_tp[n]), int(cum_counted[n])
        parts = [lo + s[: min(n, k)] for (lo, _), (_, s, n) in zip(self.tiles[i].slices(), picks)]
        kept = finish(self.tiles[i], np.concatenate(parts), self.radius)
        cum_tp, cum_counted = self._flags(i, kept)
        return int(cum_tp[-1]), int(cum_counted[-1])

    def counts(self, pp: PostProcess) -> Counts:
        """Total tp/fp/fn over the cache's items with `pp`, equal to `sum(score(...).counts())`."""
        iou_key = (round(pp.nms_thresh, 6), pp.class_agnostic)
        nms = self.tile_nms(*iou_key)
        neg_t = -np.float32(pp.score_thresh)
        tp = counted = 0
        for i, item in enumerate(nms):
            a, b = self._item(i, item, iou_key, neg_t, pp.detections_per_img)
            tp, counted = tp + a, counted + b
        return Counts(tp, counted - tp, self.cells - tp)


def curve(cache: Cache, pp: PostProcess, method: str, radius: float, thresholds=THRESHOLDS) -> pd.DataFrame:
    """Detection rate, FDR, precision and F1 at every score threshold, the rest of `pp` fixed.

    With a prefix matcher the Replayer serves all thresholds; Hungarian matching is redone at each.
    """
    at = [replace(pp, score_thresh=float(t)) for t in thresholds]
    if method in PREFIX_MATCHERS:
        replayer = Replayer(cache, method, radius)
        c = [replayer.counts(p) for p in at]
    else:
        c = [sum(score(cache, p, method, radius).counts(), Counts(0, 0, 0)) for p in at]
    table = pd.DataFrame(
        {"threshold": thresholds, "tp": [x.tp for x in c], "fp": [x.fp for x in c], "fn": [x.fn for x in c]}
    )
    table["detection_rate"] = [x.detection_rate for x in c]
    table["fdr"] = [x.false_discovery_rate for x in c]
    table["precision"] = [x.precision for x in c]
    table["f1"] = [x.f1 for x in c]
    return table


def per_image(cache: Cache, scored: Scored) -> pd.DataFrame:
    """Counts summed over each image's items (patches or whole images), one row per image, with its case."""
    df = pd.DataFrame(
        [
            {"image": str(cache.items_name[i]), "tp": c.tp, "fp": c.fp, "fn": c.fn}
            for i, c in enumerate(scored.counts())
        ],
        columns=["image", "tp", "fp", "fn"],
    )
    df = df.groupby("image", sort=True, as_index=False).sum()
    df.insert(1, "case", [case_of(n) for n in df.image])
    counts = [Counts(r.tp, r.fp, r.fn) for r in df.itertuples()]
    df["cells"] = df.tp + df.fn
    df["detection_rate"] = [c.detection_rate for c in counts]
    df["fdr"] = [c.false_discovery_rate for c in counts]
    df["f1"] = [c.f1 for c in counts]
    return df


def _ratio(num, den):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


_STATISTICS = {
    "detection_rate": lambda tp, fp, fn: _ratio(tp, tp + fn),
    "fdr": lambda tp, fp, fn: np.nan_to_num(_ratio(fp, tp + fp), nan=0.0),  # nothing detected: no false one
    "f1": lambda tp, fp, fn: np.nan_to_num(_ratio(2 * tp, 2 * tp + fp + fn), nan=0.0),
}


def bootstrap_unit(images: pd.DataFrame) -> str:
    """Cases (patients) are resampled when there are at least two; else images, within one patient."""
    return "case" if images["case"].nunique() >= 2 else "image"


def bootstrap(images: pd.DataFrame, seed: int = 0, n_resamples: int = 2000) -> dict[str, tuple[float, float]]:
    """95% percentile intervals, resampling whole cases (counts summed): the held-out images are a few
    patients, and a new patient is what the interval should speak for."""
    unit = bootstrap_unit(images)
    groups = images.groupby(unit, sort=True)[["tp", "fp", "fn"]].sum()
    data = tuple(groups[k].to_numpy(dtype=np.float64) for k in ("tp", "fp", "fn"))
    out = {}
    for name, fn in _STATISTICS.items():
        if len(groups) < 2:
            value = float(fn(*(d.sum() for d in data)))
            out[name] = (value, value)
            continue

        def statistic(tp, fp, fn_, axis=-1, fn=fn):
            return fn(tp.sum(axis=axis), fp.sum(axis=axis), fn_.sum(axis=axis))

        res = stats.bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=0.95,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        out[name] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return out


RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation


def point_ap(scored: Scored, cache: Cache) -> float:
    """Average precision over the score of the kept detections, with the project's matching (centre
    within the radius, one-to-one, in score order) and COCO's 101-point interpolated precision.
    NaN without cells, 0 without detections."""
    cells = sum(scored.cells)
    if cells == 0:
        return float("nan")
    scores = np.concatenate([cache.det_scores[k][c] for k, c in zip(scored.kept, scored.counted)] or [np.zeros(0)])
    tp = np.concatenate([t[c] for t, c in zip(scored.tp, scored.counted)] or [np.zeros(0, bool)])
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(tp[order])
    recall, precision = tps / cells, tps / np.arange(1, len(order) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0).mean())


def box_ap(cache: Cache, kept: list[np.ndarray]) -> tuple[float, float]:
    """COCO box AP@[.5:.95] and AP50 of the kept detections against the drawn point boxes
    (faster-coco-eval). Secondary: it scores how well a box matches an artificial 32 px square.

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
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(lab),
                    "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "area": float((b[2] - b[0]) * (b[3] - b[1])),
                }
            )
        for b, s, lab in zip(cache.det_boxes[kept[i]], cache.det_scores[kept[i]], cache.det_labels[kept[i]]):
            results.append(
                {
                    "image_id": i,
                    "category_id": int(lab),
                    "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                }
            )
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


# --- false positives at an equal detection rate (compare, second look) ------------------------


def threshold_counts(
    cache: Cache, pp: PostProcess, matching: str, radius: float, thresholds: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """Per image: tp, fp, fn at every score threshold, (images, T, 3). Kept detections at a higher
    threshold are a prefix of those at 0, so one scoring serves every threshold."""
    thresholds = SWEEP if thresholds is None else thresholds
    scored = score(cache, replace(pp, score_thresh=0.0), matching, radius)
    names = [str(n) for n in cache.items_name]
    out = np.zeros((len(names), len(thresholds), 3))
    for i, (kept, tp, counted, cells) in enumerate(zip(scored.kept, scored.tp, scored.counted, scored.cells)):
        above = cache.det_scores[kept][:, None] > thresholds[None, :]
        out[i, :, 0] = (above & (tp & counted)[:, None]).sum(0)
        out[i, :, 1] = (above & (~tp & counted)[:, None]).sum(0)
        out[i, :, 2] = cells - out[i, :, 0]
    images = sorted(set(names))
    per_image = np.stack([out[[k for k, n in enumerate(names) if n == img]].sum(0) for img in images])
    return images, per_image


def rates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detection rate and FDR along the last-but-one axis of (..., T, 3) counts."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        dr = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        fdr = np.where(tp + fp > 0, fp / (tp + fp), 0.0)
    return dr, fdr


def fdr_at(counts: np.ndarray, target: float) -> np.ndarray:
    """FDR at the highest threshold whose detection rate still reaches `target` (NaN if none does)."""
    dr, fdr = rates(counts)
    reach = dr >= target - 1e-12
    last = np.where(reach.any(-1), reach.shape[-1] - 1 - np.argmax(reach[..., ::-1], -1), -1)
    picked = np.take_along_axis(fdr, np.maximum(last, 0)[..., None], -1)[..., 0]
    return np.where(last >= 0, picked, np.nan)
