"""Metrics on hand-built caches, AP against pycocotools, and the tiling merge."""

import numpy as np
import pytest
import torch

from detection.evaluate import judge
from detection.inference import Cache, detect_tiled, tile_starts
from detection.metrics import coco_ap
from detection.postprocess import NmsOrder, PostProcess, replay

RADIUS = 16.0
KEEP_ALL = PostProcess(score_thresh=0.0, nms_thresh=1.0, detections_per_img=1000)


def make_cache(items):
    """items: list of (detections [(cx, cy, score)], cells [(x, y)]) on 200x200 items, one image each."""
    det_item, boxes, scores, gt_item, points = [], [], [], [], []
    for i, (dets, cells) in enumerate(items):
        for cx, cy, s in sorted(dets, key=lambda d: -d[2]):
            det_item.append(i)
            boxes.append([cx - 16, cy - 16, cx + 16, cy + 16])
            scores.append(s)
        for x, y in cells:
            gt_item.append(i)
            points.append([x, y])
    n = len(items)
    return Cache(
        items_name=np.array([f"Case_{i}-01" for i in range(n)]), items_origin=np.zeros((n, 2), np.int64),
        items_size=np.full((n, 2), 200, np.int64),
        det_item=np.array(det_item, np.int32), det_boxes=np.array(boxes, np.float32).reshape(-1, 4),
        det_scores=np.array(scores, np.float32), det_labels=np.ones(len(scores), np.int64),
        gt_item=np.array(gt_item, np.int32), gt_points=np.array(points, np.float32).reshape(-1, 2),
        gt_labels=np.ones(len(points), np.int64), meta={"box_size": 32})


def metrics(items, pp=KEEP_ALL, matching="greedy"):
    return judge(make_cache(items), pp, matching, RADIUS).metrics


def test_perfect():
    m = metrics([([(50, 50, 0.9), (120, 120, 0.8)], [(50, 50), (120, 120)])])
    assert (m["detection_rate"], m["fdr"], m["precision"], m["f1"]) == (1.0, 0.0, 1.0, 1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["ap50"] == pytest.approx(1.0) and m["ap"] == pytest.approx(1.0)


def test_all_missed():
    m = metrics([([(150, 20, 0.9)], [(40, 40), (80, 80)])])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 2)
    assert (m["detection_rate"], m["fdr"], m["f1"], m["ap50"]) == (0.0, 1.0, 0.0, 0.0)


def test_all_false_on_an_image_without_cells():
    m = metrics([([(50, 50, 0.9), (100, 100, 0.4)], [])])
    assert (m["tp"], m["fp"], m["fn"], m["detection_rate"], m["fdr"]) == (0, 2, 0, 0.0, 1.0)


def test_duplicates_on_one_cell_count_once():
    m = metrics([([(50, 50, 0.9), (52, 50, 0.8), (49, 51, 0.7)], [(50, 50)])])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 0)
    assert m["fdr"] == pytest.approx(2 / 3)


def test_score_ties_give_one_match_each():
    m = metrics([([(50, 50, 0.5), (60, 50, 0.5)], [(55, 50)])])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def test_model_that_detects_nothing_has_defined_metrics():
    m = metrics([([], [(50, 50)]), ([], [(60, 60), (90, 90)])])
    assert (m["detection_rate"], m["fdr"], m["precision"], m["f1"], m["ap50"], m["ap"]) == (0, 0, 0, 0, 0, 0)
    assert (m["detection_rate_ci_low"], m["detection_rate_ci_high"]) == (0.0, 0.0)


def test_empty_images_are_neutral():
    full = [([(50, 50, 0.9)], [(50, 50), (150, 150)])]
    a, b = metrics(full), metrics(full + [([], [])])
    for k in ("detection_rate", "fdr", "f1", "tp", "fp", "fn", "ap50"):
        assert a[k] == b[k]


def test_operating_threshold_and_bootstrap_interval():
    items = [([(50, 50, 0.9), (100, 100, 0.3)], [(50, 50), (100, 100)]),
             ([(50, 50, 0.2)], [(50, 50)]),
             ([(70, 70, 0.95), (10, 190, 0.6)], [(70, 70)])]
    m = metrics(items, PostProcess(score_thresh=0.5, nms_thresh=1.0, detections_per_img=100))
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 2)
    assert m["detection_rate_ci_low"] <= m["detection_rate"] <= m["detection_rate_ci_high"]
    assert m["detection_rate_ci_low"] < m["detection_rate_ci_high"]


def test_hungarian_finds_more_pairs_than_greedy():
    # The best-scored detection sits between two cells and takes the one the other detection needs.
    items = [([(20, 0 + 50, 0.9), (5, 50, 0.8)], [(10, 50), (34, 50)])]
    greedy, hungarian = metrics(items), metrics(items, matching="hungarian")
    assert (greedy["tp"], hungarian["tp"]) == (1, 2)


def test_iou_matching_needs_overlapping_boxes():
    m = metrics([([(50, 50, 0.9), (100, 112, 0.8)], [(50, 50), (100, 100)])], matching="iou")
    assert (m["tp"], m["fp"]) == (1, 1)  # 12 px off: centre within the radius, box IoU below 0.5


def test_ap_equals_pycocotools_on_a_random_case():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(7)
    items = []
    for _ in range(5):
        cells = rng.uniform(20, 180, size=(int(rng.integers(5, 40)), 2))
        dets = [(x + rng.normal(0, 6), y + rng.normal(0, 6), rng.uniform()) for x, y in cells if rng.uniform() < 0.8]
        dets += [tuple(rng.uniform(20, 180, 2)) + (rng.uniform(),) for _ in range(int(rng.integers(0, 20)))]
        items.append((dets, [tuple(c) for c in cells]))
    cache = make_cache(items)
    kept = [replay(*cache.detections(i), KEEP_ALL) for i in range(len(cache))]
    ap, ap50 = coco_ap(cache, kept)

    images, anns, results = [], [], []
    densest = 1
    for i in range(len(cache)):
        images.append({"id": i, "width": 200, "height": 200})
        _, _, gt = cache.ground_truth(i)
        densest = max(densest, len(gt), len(kept[i]))
        for b in gt:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                         "area": float((b[2] - b[0]) * (b[3] - b[1]))})
        boxes, scores, _ = cache.detections(i)
        for b, s in zip(boxes, scores):
            results.append({"image_id": i, "category_id": 1, "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.params.maxDets = [1, 10, densest + 1]
    ev.evaluate()
    ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, -1]
    assert 0 < ap50 < 1
    assert ap == pytest.approx(p[p > -1].mean(), abs=1e-9)
    assert ap50 == pytest.approx(p[0][p[0] > -1].mean(), abs=1e-9)


def test_nms_once_per_iou_equals_replay_at_every_threshold_and_k():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 300, size=(600, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, size=(600, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(size=600).astype(np.float32)
    labels = rng.integers(1, 3, size=600)
    for iou in (0.3, 0.5, 0.8):
        for agnostic in (False, True):
            order = NmsOrder(boxes, scores, labels, iou, agnostic)
            for t in (0.0, 0.05, 0.5, 0.9):
                for k in (1, 50, 10_000):
                    pp = PostProcess(t, iou, k, agnostic)
                    assert np.array_equal(order.index[:order.kept(t, k)], replay(boxes, scores, labels, pp))


class CellFinder(torch.nn.Module):
    """Reports a 32 px box on every bright dot of its input: a transparent detector for tiling tests."""

    def forward(self, images):
        out = []
        for img in images:
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            b = torch.stack([xs - 16, ys - 16, xs + 16, ys + 16], 1).float() if len(xs) else torch.zeros((0, 4))
            out.append({"boxes": b, "scores": torch.ones(len(b)), "labels": torch.ones(len(b), dtype=torch.int64)})
        return out


def test_tiles_cover_the_image_with_overlap():
    starts = tile_starts(1360, 680, 64)
    assert starts[0] == 0 and starts[-1] == 680 and all(b - a <= 680 - 64 for a, b in zip(starts, starts[1:]))
    assert tile_starts(500, 680, 64) == [0]


def test_tiling_loses_no_cell_on_a_border_and_counts_none_twice():
    image = np.zeros((1024, 1360, 3), np.uint8)
    starts_x, starts_y = tile_starts(1360, 680, 64), tile_starts(1024, 512, 64)
    cells = [(x, y) for x in (5, 340, 680, 700, 1020, 1355) for y in (3, 256, 300, 512, 768, 1020)]
    cells += [(sx + 679, 400) for sx in starts_x[:-1]] + [(400, sy + 511) for sy in starts_y[:-1]]
    for x, y in cells:
        image[y, x] = 255
    boxes, _, _ = detect_tiled(CellFinder(), image, (512, 680), 64, torch.device("cpu"))
    centres = sorted(map(tuple, ((boxes[:, :2] + boxes[:, 2:]) / 2).astype(int).tolist()))
    assert centres == sorted(cells)
