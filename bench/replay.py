"""Trials per second of the post-processing replay against a plain replay, on a cache shaped like
the paper's: 12 validation images, ~4,000 candidate boxes and ~150 cells each.

    python bench/replay.py [--trials 5000]

"plain" runs batched_nms and Hungarian matching in every trial (what a naive tuner does); "fast"
is the tune study's Replayer: NMS and greedy matching once per IoU value, then a binary search
and a cumulative sum per image. Also reports the Optuna-driven rate (RandomSampler, in memory).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import optuna

from detection.inference import Cache
from detection.matching import box_centres, hungarian_match
from detection.metrics import Replayer
from detection.postprocess import PostProcess, replay_tile
from detection.tune import NMS_STEP


def synthetic_cache(items: int = 12, boxes: int = 4000, cells: int = 150, seed: int = 0) -> Cache:
    rng = np.random.default_rng(seed)
    det_item, det_boxes, det_scores, gt_item, gt_points = [], [], [], [], []
    for i in range(items):
        pts = rng.uniform(20, [1340, 1004], size=(cells, 2))
        # Detections cluster around cells (as a detector's candidates do), plus background clutter.
        near = pts[rng.integers(0, cells, boxes * 3 // 4)] + rng.normal(0, 6, (boxes * 3 // 4, 2))
        far = rng.uniform(0, [1360, 1024], size=(boxes - len(near), 2))
        centres = np.concatenate([near, far])
        half = rng.uniform(12, 20, size=(boxes, 1))
        b = np.concatenate([centres - half, centres + half], axis=1)
        s = np.concatenate([rng.beta(5, 2, len(near)), rng.beta(1, 6, len(far))])
        order = np.argsort(-s)
        det_item.append(np.full(boxes, i)), det_boxes.append(b[order]), det_scores.append(s[order])
        gt_item.append(np.full(cells, i)), gt_points.append(pts)
    boxes_all = np.concatenate(det_boxes).astype(np.float32)
    return Cache(
        np.array([f"Case_{i}-01" for i in range(items)]),
        np.zeros((items, 2), np.int64),
        np.tile([1024, 1360], (items, 1)),
        np.tile([1024, 1360], (items, 1)),
        np.arange(items, dtype=np.int32),
        np.zeros((items, 2), np.int64),
        np.tile([-np.inf, -np.inf, np.inf, np.inf], (items, 1)),
        np.concatenate(det_item).astype(np.int32),
        boxes_all,
        boxes_all.copy(),
        np.concatenate(det_scores).astype(np.float32),
        np.ones(items * boxes, np.int64),
        np.concatenate(gt_item).astype(np.int32),
        np.concatenate(gt_points).astype(np.float32),
        np.ones(items * cells, np.int64),
        {"box_size": 32, "border_band": 0.0},
    )


def tiled(cache: Cache, rows: int = 3, cols: int = 3) -> Cache:
    """The same boxes cut into rows x cols model inputs per item, as a whole 1360x1024 image is."""
    from detection.inference import core_bounds, tile_starts

    ys, xs = tile_starts(1024, 512, 64), tile_starts(1360, 680, 64)
    y_core, x_core = core_bounds(ys, 512), core_bounds(xs, 680)
    origin = np.array([(x, y) for y in ys for x in xs], np.int64)
    core = np.array([(xl, yl, xh, yh) for (yl, yh) in y_core for (xl, xh) in x_core])
    c = (cache.det_boxes[:, :2] + cache.det_boxes[:, 2:]) / 2
    col = np.searchsorted([x for _, x in x_core[:-1]], c[:, 0], side="right")
    row = np.searchsorted([y for _, y in y_core[:-1]], c[:, 1], side="right")
    tile = cache.det_tile.astype(np.int64) * len(origin) + row * len(xs) + col
    order = np.lexsort((-cache.det_scores, tile))
    n = len(cache)
    boxes = cache.det_boxes[order]
    return Cache(
        cache.items_name,
        cache.items_origin,
        cache.items_size,
        cache.items_image_size,
        np.repeat(np.arange(n, dtype=np.int32), len(origin)),
        np.tile(origin, (n, 1)),
        np.tile(core, (n, 1)),
        tile[order].astype(np.int32),
        boxes,
        boxes - np.tile(origin[tile[order] % len(origin)], 2).astype(np.float32),
        cache.det_scores[order],
        cache.det_labels[order],
        cache.gt_item,
        cache.gt_points,
        cache.gt_labels,
        cache.meta,
    )


def random_pp(rng) -> PostProcess:
    return PostProcess(
        float(rng.uniform(0, 0.95)),
        round(float(rng.choice(np.arange(0.1, 0.9001, NMS_STEP))), 6),
        int(rng.integers(10, 1000)),
    )


def plain_trial(cache: Cache, pp: PostProcess, radius: float) -> int:
    tp = 0
    for i in range(len(cache)):
        lo, hi = cache.det_range(i)
        boxes, scores, labels = cache.det_boxes[lo:hi], cache.det_scores[lo:hi], cache.det_labels[lo:hi]
        kept = replay_tile(boxes, scores, labels, pp)
        tp += int((hungarian_match(box_centres(boxes[kept]), cache.ground_truth(i)[0], radius) >= 0).sum())
    return tp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5000, help="fast-replay trials to time (default: %(default)s)")
    p.add_argument("--plain-trials", type=int, default=5, help="plain trials to time (default: %(default)s)")
    args = p.parse_args()
    cache = synthetic_cache()
    rng = np.random.default_rng(1)

    t = time.perf_counter()
    for _ in range(args.plain_trials):
        plain_trial(cache, random_pp(rng), 16.0)
    plain = args.plain_trials / (time.perf_counter() - t)

    replayer = Replayer(cache, "greedy", 16.0)
    t = time.perf_counter()
    ious = np.round(np.arange(0.1, 0.9001, NMS_STEP), 6)
    for iou in ious:  # NMS and matching once per IoU value and threshold group
        replayer.prepare(float(iou), False)  # NMS and the plan without a top-k cut
    prepare_s = time.perf_counter() - t
    pps = [random_pp(rng) for _ in range(args.trials)]
    t = time.perf_counter()
    for pp in pps:
        replayer.counts(pp)
    fast = args.trials / (time.perf_counter() - t)

    tiled_cache = tiled(cache)
    tiled_replayer = Replayer(tiled_cache, "greedy", 16.0)
    n_tiled = min(args.trials, 300)
    t = time.perf_counter()
    for pp in pps[:n_tiled]:
        tiled_replayer.counts(pp)
    tiled_rate = n_tiled / (time.perf_counter() - t)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        pp = PostProcess(
            trial.suggest_float("score_thresh", 0, 0.95),
            trial.suggest_float("nms_thresh", 0.1, 0.9, step=NMS_STEP),
            trial.suggest_int("detections_per_img", 10, 1000, log=True),
        )
        return replayer.counts(PostProcess(pp.score_thresh, round(pp.nms_thresh, 6), pp.detections_per_img)).f1

    n_optuna = min(args.trials, 2000)
    t = time.perf_counter()
    study.optimize(objective, n_trials=n_optuna)
    with_optuna = n_optuna / (time.perf_counter() - t)
    print(
        json.dumps(
            {
                "items": len(cache),
                "boxes_per_item": int(len(cache.det_scores) / len(cache)),
                "plain_trials_per_s": round(plain, 2),
                "fast_trials_per_s": round(fast, 1),
                "speedup": round(fast / plain),
                "prepare_s_all_iou_values": round(prepare_s, 2),
                "iou_values": len(ious),
                "optuna_random_sampler_trials_per_s": round(with_optuna, 1),
                "tiled_3x3_trials_per_s": round(tiled_rate, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
