"""Score a prediction cache: counts at the operating point, every threshold's curve, bootstrap
intervals over cases (patients), point AP with the project's own matching, COCO box AP from
faster-coco-eval, false positives per mm² and the FROC. Pure functions of the cache.

Units: every count is of annotated cells (`whole` protocol) or of cell-patch pairs (`paper`).
Along a patch edge inside the image (`Cache.in_band`) a cell may be cut off: detections are first
matched to the cells outside that band, and a cell inside it, a detection matched to one, and an
unmatched detection inside it count neither way (COCO's crowd regions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from .choices import PREFIX_MATCHERS
from .inference import Cache
from .matching import Counts, box_centres, match
from .postprocess import PostProcess, PrefixPlan, TileNms, keep

THRESHOLDS = np.round(np.linspace(0.0, 0.99, 100), 2)
# The comparison's sweep: fine below 0.1, where a detector trained to find every cell operates.
SWEEP = np.unique(np.concatenate([np.linspace(0, 0.1, 201), np.linspace(0.1, 0.995, 180)])).astype(np.float32)
# Below this many cases (or images) with cells, a percentile bootstrap's "95%" interval is the
# range of the few units, not a 95% interval: none is given.
MIN_UNITS = 5
# The MONKEY (and TIGER) challenges' FROC: detection rate at these false positives per mm².
FROC_TARGETS = (10, 20, 50, 100, 200, 300)
_CASE = re.compile(r"^(Case_\d+)-\d+$")


def case_of(name: str) -> str:
    """The patient (case) of a BreCaHAD image name, Case_N-MM -> Case_N."""
    m = _CASE.match(name)
    return m.group(1) if m else name


def classify(
    cache: Cache, i: int, kept: np.ndarray, method: str, radius: float, agnostic: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """True-positive and counted flags, (K,) bool each, of item i's kept detections (global det
    indices, best first). Class by class (across classes if `agnostic`), detections are matched to
    the cells outside the don't-care band first; those left are matched to the band's cells, and
    they and any left inside the band are not counted. So a detection of the wrong class is a false
    positive of its class and its cell a miss of the cell's class."""
    points, gt_labels, gt_boxes = cache.ground_truth(i)
    boxes, scores, labels = cache.det_boxes[kept], cache.det_scores[kept], cache.det_labels[kept]
    if agnostic:
        gt_labels, labels = np.ones_like(gt_labels), np.ones_like(labels)
    band = cache.in_band(i, points)
    tp, ignored = np.zeros(len(kept), bool), np.zeros(len(kept), bool)
    for c in np.unique(labels):
        mine = np.flatnonzero(labels == c)
        cells = np.flatnonzero((gt_labels == c) & ~band)
        m = match(method, boxes[mine], scores[mine], points[cells], gt_boxes[cells], radius)
        tp[mine[m >= 0]] = True
        rest, cut_off = mine[m < 0], np.flatnonzero((gt_labels == c) & band)
        m = match(method, boxes[rest], scores[rest], points[cut_off], gt_boxes[cut_off], radius)
        ignored[rest[m >= 0]] = True
    ignored |= ~tp & cache.in_band(i, box_centres(boxes))
    return tp, ~ignored


def counted_cells(cache: Cache, i: int) -> np.ndarray:
    """(C,) int: item i's cells outside the don't-care band, per class (label 1 first)."""
    points, labels, _ = cache.ground_truth(i)
    return np.bincount(labels[~cache.in_band(i, points)] - 1, minlength=cache.n_classes)


def counted_area_mm2(cache: Cache, i: int) -> float:
    """mm² of item i outside its don't-care band: the area its false positives are counted over."""
    band = float(cache.meta.get("border_band", 0.0))
    (x0, y0), (h, w), (ih, iw) = cache.items_origin[i], cache.items_size[i], cache.items_image_size[i]
    width = w - band * (int(x0 > 0) + int(x0 + w < iw))  # numpy bools would add as a logical or
    height = h - band * (int(y0 > 0) + int(y0 + h < ih))
    return float(max(width, 0) * max(height, 0) * cache.mpp**2 * 1e-6)


@dataclass(frozen=True)
class Scored:
    """What each item keeps under one post-processing, and how each kept detection counts."""

    kept: list[np.ndarray]  # per item: (K,) int global det indices, best first
    tp: list[np.ndarray]  # per item: (K,) bool
    counted: list[np.ndarray]  # per item: (K,) bool, False in the don't-care band
    cells: list[np.ndarray]  # per item: (C,) cells outside the band, per class

    def counts(self) -> list[Counts]:
        out = []
        for t, c, n in zip(self.tp, self.counted, self.cells):
            tp = int(t.sum())
            out.append(Counts(tp, int(c.sum()) - tp, int(n.sum()) - tp))
        return out

    def class_counts(self, cache: Cache, label: int) -> Counts:
        """Counts of one class (1-based label), summed over the items."""
        tp = fp = fn = 0
        for kept, t, c, n in zip(self.kept, self.tp, self.counted, self.cells):
            mine = cache.det_labels[kept] == label
            tp_c = int((t & mine).sum())
            tp, fp, fn = tp + tp_c, fp + int((c & ~t & mine).sum()), fn + int(n[label - 1]) - tp_c
        return Counts(tp, fp, fn)


def score(cache: Cache, pp: PostProcess, method: str, radius: float, agnostic: bool = False) -> Scored:
    """Post-process every item of the cache as the deployed detector would (`keep`), then match its
    kept detections to its cells with `method` within `radius` px: the reference the fast path
    (`Replayer`) must equal."""
    kept, tp, counted, cells = [], [], [], []
    for i in range(len(cache)):
        k = cache.det_range(i)[0] + keep(cache.tiles(i), pp, radius)
        t, c = classify(cache, i, k, method, radius, agnostic)
        kept.append(k)
        tp.append(t)
        counted.append(c)
        cells.append(counted_cells(cache, i))
    return Scored(kept, tp, counted, cells)


class Replayer:
    """Counts of any post-processing at any score thresholds over a cache, exactly as `score` gives
    them, fast.

    Per model input, NMS runs once per IoU value (`TileNms`); with top-k, a tile keeps those of its
    first k survivors that score above the threshold. So for each (IoU, k), an item keeps at every
    threshold what `finish` keeps of a prefix of one best-first list (`PrefixPlan`), and its counts
    are a lookup into cumulative sums made once per list.
    """

    def __init__(self, cache: Cache, matching: str, radius: float):
        if matching not in PREFIX_MATCHERS:
            raise ValueError(f"matching={matching!r} cannot be replayed per threshold; use one of {PREFIX_MATCHERS}")
        self.cache, self.matching, self.radius = cache, matching, radius
        self.tiles = [cache.tiles(i) for i in range(len(cache))]
        self.offsets = [cache.det_range(i)[0] for i in range(len(cache))]
        self.cells = np.array([counted_cells(cache, i).sum() for i in range(len(cache))], np.int64)
        self.area = area_mm2(cache)
        self._nms: dict[tuple[float, bool], list[list[TileNms]]] = {}
        self._plans: dict[tuple, tuple] = {}

    def tile_nms(self, iou: float, agnostic: bool) -> list[list[TileNms]]:
        key = (round(iou, 6), agnostic)
        if key not in self._nms:
            self._nms[key] = [
                [TileNms(t.nms_boxes[lo:hi], t.scores[lo:hi], t.labels[lo:hi], iou, agnostic) for lo, hi in t.slices()]
                for t in self.tiles
            ]
        return self._nms[key]

    def prepare(self, iou: float, agnostic: bool) -> None:
        """Run every model input's NMS for one IoU and make every item's plan without a top-k cut now,
        so that trials only look up (the bench times them apart)."""
        for i in range(len(self.cache)):
            self._plan(i, round(iou, 6), agnostic, None)

    def _plan(self, i: int, iou: float, agnostic: bool, k: int | None) -> tuple:
        """Item i's PrefixPlan over each tile's first k survivors (all of them for None), with the
        negated scores of its list and the cumulative flags of each of its kept lists."""
        key = (i, iou, agnostic, k)
        found = self._plans.get(key)
        if found is None:
            tiles, nms = self.tiles[i], self.tile_nms(iou, agnostic)[i]
            kept = np.concatenate([lo + t.keep[:k] for (lo, _), t in zip(tiles.slices(), nms)] or [np.zeros(0, int)])
            plan = PrefixPlan.of(tiles, kept, self.radius, agnostic)
            flags = [self._flags(i, plan.order[p]) for p in plan.lists]
            found = self._plans[key] = (plan, -tiles.scores[plan.order], flags)
        return found

    def _flags(self, i: int, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative TP and counted detections over item i's kept list (local indices, best first)."""
        tp, counted = classify(self.cache, i, self.offsets[i] + kept, self.matching, self.radius)
        return np.concatenate([[0], np.cumsum(tp)]), np.concatenate([[0], np.cumsum(counted)])

    def item_counts(self, i: int, pp: PostProcess, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T,) TP and (T,) counted detections of item i with `pp` at each score threshold."""
        return self._item(i, round(pp.nms_thresh, 6), pp.class_agnostic, pp.detections_per_img, _negated(thresholds))

    def _item(self, i: int, iou: float, agnostic: bool, k: int, neg_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where top-k binds in no tile, the plan without a cut serves; one model input keeps a prefix
        of its survivors, so top-k only shortens it; elsewhere the plan of the tiles' first k."""
        nms = self.tile_nms(iou, agnostic)[i]
        if len(nms) == 1:
            plan, neg, flags = self._plan(i, iou, agnostic, None)
            return _lookup(plan, flags, np.minimum(neg.searchsorted(neg_t), k))
        free = np.max([t.neg_scores.searchsorted(neg_t) for t in nms], axis=0) <= k
        if free.all():
            plan, neg, flags = self._plan(i, iou, agnostic, None)
            return _lookup(plan, flags, neg.searchsorted(neg_t))
        tp, counted = np.empty(len(neg_t), np.int64), np.empty(len(neg_t), np.int64)
        for bound, sel in ((None, free), (k, ~free)):
            if sel.any():
                plan, neg, flags = self._plan(i, iou, agnostic, bound)
                tp[sel], counted[sel] = _lookup(plan, flags, neg.searchsorted(neg_t[sel]))
        return tp, counted

    def curves(self, pp: PostProcess, thresholds: np.ndarray) -> np.ndarray:
        """(I, T, 3) tp, fp, fn of every item at every threshold, the rest of `pp` fixed."""
        iou, neg_t = round(pp.nms_thresh, 6), _negated(thresholds)
        out = np.zeros((len(self.cache), len(neg_t), 3), np.int64)
        for i in range(len(self.cache)):
            tp, counted = self._item(i, iou, pp.class_agnostic, pp.detections_per_img, neg_t)
            out[i, :, 0], out[i, :, 1], out[i, :, 2] = tp, counted - tp, self.cells[i] - tp
        return out

    def counts(self, pp: PostProcess) -> Counts:
        """Total tp/fp/fn over the cache's items with `pp`, equal to `sum(score(...).counts())`."""
        tp, fp, fn = self.curves(pp, np.array([pp.score_thresh])).sum(axis=0)[0].tolist()
        return Counts(tp, fp, fn)

    def table(self, pp: PostProcess, thresholds: np.ndarray) -> pd.DataFrame:
        """`table` of the totals at each threshold."""
        totals = self.curves(pp, thresholds).sum(axis=0).tolist()
        return table(np.asarray(thresholds), [Counts(*c) for c in totals], self.area)

    def thresholds(self, pp: PostProcess) -> np.ndarray:
        """Every float32 score threshold at or above pp's at which what is kept can change, ascending:
        pp's own, and just below each score of a detection that some tile keeps."""
        nms = self.tile_nms(round(pp.nms_thresh, 6), pp.class_agnostic)
        scores = np.concatenate([-t.neg_scores[: pp.detections_per_img] for item in nms for t in item] + [[]])
        below = np.nextafter(scores.astype(np.float32), np.float32(-1))
        own = np.float32(pp.score_thresh)
        return np.unique(np.append(below[below >= own], own))


def table(thresholds: np.ndarray, counts: list[Counts], area: float) -> pd.DataFrame:
    """One row per threshold: its counts, detection rate, FDR, precision, F1, false positives per mm²."""
    out = pd.DataFrame(
        {
            "threshold": thresholds,
            "tp": [c.tp for c in counts],
            "fp": [c.fp for c in counts],
            "fn": [c.fn for c in counts],
        }
    )
    out["detection_rate"] = [c.detection_rate for c in counts]
    out["fdr"] = [c.false_discovery_rate for c in counts]
    out["precision"] = [c.precision for c in counts]
    out["f1"] = [c.f1 for c in counts]
    out["fp_per_mm2"] = out.fp / area if area else np.nan
    return out


def _negated(thresholds) -> np.ndarray:
    """-t in float32: the model compares float32 scores with float32 thresholds."""
    return -np.asarray(thresholds, np.float32).reshape(-1)


def _lookup(plan: PrefixPlan, flags: list, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative TP and counted detections of what the plan keeps of each prefix length in m."""
    if len(plan.starts) == 1:  # no link breaks: one list serves every prefix
        n = plan.lists[0].searchsorted(m)
        return flags[0][0][n], flags[0][1][n]
    j = plan.starts.searchsorted(m, side="right") - 1
    tp, counted = np.empty(len(m), np.int64), np.empty(len(m), np.int64)
    for jj in np.unique(j).tolist():
        sel = j == jj
        n = plan.lists[jj].searchsorted(m[sel])
        tp[sel], counted[sel] = flags[jj][0][n], flags[jj][1][n]
    return tp, counted


def curve(cache: Cache, pp: PostProcess, method: str, radius: float, thresholds=THRESHOLDS) -> pd.DataFrame:
    """Detection rate, FDR, precision, F1 and false positives per mm² at every score threshold, the
    rest of `pp` fixed. With a prefix matcher the Replayer serves all thresholds at once; Hungarian
    matching is redone at each."""
    thresholds = np.asarray(thresholds)
    if method in PREFIX_MATCHERS:
        return Replayer(cache, method, radius).table(pp, thresholds)
    counts = [
        sum(score(cache, replace(pp, score_thresh=float(t)), method, radius).counts(), Counts(0, 0, 0))
        for t in thresholds
    ]
    return table(thresholds, counts, area_mm2(cache))


def exact_curve(cache: Cache, pp: PostProcess, method: str, radius: float) -> pd.DataFrame:
    """`curve` at every threshold at or above pp's where what is kept changes (prefix matchers), else
    on the 0.01 grid above it: the FROC reads it."""
    if method in PREFIX_MATCHERS:
        replayer = Replayer(cache, method, radius)
        return replayer.table(pp, replayer.thresholds(pp))
    return curve(cache, pp, method, radius, np.append(pp.score_thresh, THRESHOLDS[pp.score_thresh < THRESHOLDS]))


def area_mm2(cache: Cache) -> float:
    """mm² over which the cache's false positives are counted."""
    return sum(counted_area_mm2(cache, i) for i in range(len(cache)))


def froc(table: pd.DataFrame, targets=FROC_TARGETS) -> dict[str, float]:
    """Detection rate at each false-positive density of `targets` (per mm²) and their mean (the FROC
    score), as the MONKEY and TIGER challenges read it: at the lowest threshold whose density stays
    within the target; 0 where even the highest threshold exceeds it."""
    out = {}
    for t in targets:
        feasible = table.detection_rate[table.fp_per_mm2 <= t]
        out[f"froc_dr_at_{t:g}"] = float(feasible.max()) if feasible.notna().any() else 0.0
    out["froc"] = float(np.mean(list(out.values())))
    return out


def per_image(cache: Cache, scored: Scored) -> pd.DataFrame:
    """Counts summed over each image's items (patches or whole images), one row per image, with its
    case and the mm² its false positives were counted over."""
    df = pd.DataFrame(
        [
            {
                "image": str(cache.items_name[i]),
                "tp": c.tp,
                "fp": c.fp,
                "fn": c.fn,
                "area_mm2": counted_area_mm2(cache, i),
            }
            for i, c in enumerate(scored.counts())
        ],
        columns=["image", "tp", "fp", "fn", "area_mm2"],
    )
    df = df.groupby("image", sort=True, as_index=False).sum()
    df.insert(1, "case", [case_of(n) for n in df.image])
    counts = [Counts(r.tp, r.fp, r.fn) for r in df.itertuples()]
    df["cells"] = df.tp + df.fn
    df["detection_rate"] = [c.detection_rate for c in counts]
    df["fdr"] = [c.false_discovery_rate for c in counts]
    df["f1"] = [c.f1 for c in counts]
    df["fp_per_mm2"] = df.fp / df.area_mm2
    return df


def _ratio(num, den):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


# Each statistic, and which units carry information about it: a case without cells says nothing of
# the detection rate, one without detections nothing of the FDR.
_STATISTICS = {
    "detection_rate": (lambda tp, fp, fn: _ratio(tp, tp + fn), lambda tp, fp, fn: tp + fn > 0),
    "fdr": (lambda tp, fp, fn: _ratio(fp, tp + fp), lambda tp, fp, fn: tp + fp > 0),
    "f1": (lambda tp, fp, fn: _ratio(2 * tp, 2 * tp + fp + fn), lambda tp, fp, fn: tp + fp + fn > 0),
}


def bootstrap_unit(images: pd.DataFrame) -> str:
    """Cases (patients) are resampled when there are at least two; else images, within one patient."""
    return "case" if images["case"].nunique() >= 2 else "image"


@dataclass(frozen=True)
class Intervals:
    """95% percentile bootstrap intervals, and for each statistic without one, why."""

    unit: str  # "case" or "image"
    bounds: dict[str, tuple[float, float]]
    missing: dict[str, str]

    def note(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.missing.items())


def bootstrap(images: pd.DataFrame, seed: int = 0, n_resamples: int = 2000) -> Intervals:
    """95% percentile intervals, resampling whole cases (counts summed): the held-out images are a few
    patients, and a new patient is what the interval should speak for. Each statistic resamples the
    units that inform it, and gets no interval with fewer than MIN_UNITS of them."""
    unit = bootstrap_unit(images)
    groups = images.groupby(unit, sort=True)[["tp", "fp", "fn"]].sum()
    data = tuple(groups[k].to_numpy(dtype=np.float64) for k in ("tp", "fp", "fn"))
    bounds, missing = {}, {}
    for name, (fn, informs) in _STATISTICS.items():
        mine = informs(*data)
        if mine.sum() < MIN_UNITS:
            missing[name] = f"{int(mine.sum())} {unit}(s) inform it, fewer than {MIN_UNITS}: no 95% interval"
            continue

        def statistic(tp, fp, fn_, axis=-1, fn=fn):
            return fn(tp.sum(axis=axis), fp.sum(axis=axis), fn_.sum(axis=axis))

        res = stats.bootstrap(
            tuple(d[mine] for d in data),
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=0.95,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        bounds[name] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return Intervals(unit, bounds, missing)


RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation


def point_ap(scored: Scored, cache: Cache, label: int | None = None) -> float:
    """Average precision over the score of the kept detections (of class `label` and its cells
    alone, if given), with the project's matching (centre within the radius, one-to-one, in score
    order) and COCO's 101-point interpolated precision. NaN without cells, 0 without detections."""
    cells = sum(int(c.sum() if label is None else c[label - 1]) for c in scored.cells)
    if cells == 0:
        return float("nan")
    picks = [c if label is None else c & (cache.det_labels[k] == label) for k, c in zip(scored.kept, scored.counted)]
    scores = np.concatenate([cache.det_scores[k][p] for k, p in zip(scored.kept, picks)] or [np.zeros(0)])
    tp = np.concatenate([t[p] for t, p in zip(scored.tp, picks)] or [np.zeros(0, bool)])
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
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per image: tp, fp, fn at every score threshold, (images, T, 3), and the T thresholds
    (ascending): by default every one where what is kept changes, so no grid moves a figure."""
    replayer = Replayer(cache, matching, radius)
    thresholds = replayer.thresholds(replace(pp, score_thresh=0.0)) if thresholds is None else np.asarray(thresholds)
    out = replayer.curves(replace(pp, score_thresh=0.0), thresholds)
    names = [str(n) for n in cache.items_name]
    images = sorted(set(names))
    per_image = np.stack([out[[k for k, n in enumerate(names) if n == img]].sum(0) for img in images])
    return images, thresholds, per_image


def rates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detection rate and FDR along the last-but-one axis of (..., T, 3) counts."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        dr = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        fdr = np.where(tp + fp > 0, fp / (tp + fp), 0.0)
    return dr, fdr


def fdr_at(counts: np.ndarray, target: float) -> np.ndarray:
    """FDR at the highest threshold (thresholds ascending along the last-but-one axis) whose
    detection rate still reaches `target`, NaN if none does."""
    dr, fdr = rates(counts)
    reach = dr >= target - 1e-12
    last = np.where(reach.any(-1), reach.shape[-1] - 1 - np.argmax(reach[..., ::-1], -1), -1)
    picked = np.take_along_axis(fdr, np.maximum(last, 0)[..., None], -1)[..., 0]
    return np.where(last >= 0, picked, np.nan)
