"""Metrics on hand-built caches, AP against pycocotools, and the tiling merge."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from detection.evaluate import judge
from detection.inference import Cache, Runtime, detect_tiles, tile_starts
from detection.metrics import box_ap
from detection.postprocess import PostProcess, TileNms, keep, replay_tile

RADIUS = 16.0
KEEP_ALL = PostProcess(score_thresh=0.0, nms_thresh=1.0, detections_per_img=1000)


def make_cache(items, size=200, origins=None, image_size=None, band=0.0, mpp=0.5, classes=("tumor",)):
    """items: list of (detections [(cx, cy, score[, label])], cells [(x, y[, label])]) on size x size
    items, one image (and case) each, each item one model input; labels default to 1."""
    det_tile, boxes, scores, labels, gt_item, points, gt_labels = [], [], [], [], [], [], []
    for i, (dets, cells) in enumerate(items):
        for cx, cy, s, *lab in sorted(dets, key=lambda d: -d[2]):
            det_tile.append(i)
            boxes.append([cx - 16, cy - 16, cx + 16, cy + 16])
            scores.append(s)
            labels.append(lab[0] if lab else 1)
        for x, y, *lab in cells:
            gt_item.append(i)
            points.append([x, y])
            gt_labels.append(lab[0] if lab else 1)
    n = len(items)
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    return Cache(
        items_name=np.array([f"Case_{i}-01" for i in range(n)]),
        items_origin=np.array(origins or [(0, 0)] * n, np.int64).reshape(-1, 2),
        items_size=np.full((n, 2), size, np.int64),
        items_image_size=np.array([image_size or (size, size)] * n, np.int64).reshape(-1, 2),
        tiles_item=np.arange(n, dtype=np.int32),
        tiles_origin=np.zeros((n, 2), np.int64),
        tiles_core=np.tile([-np.inf, -np.inf, np.inf, np.inf], (n, 1)),
        det_tile=np.array(det_tile, np.int32),
        det_boxes=boxes,
        det_nms_boxes=boxes.copy(),
        det_scores=np.array(scores, np.float32),
        det_labels=np.array(labels, np.int64),
        gt_item=np.array(gt_item, np.int32),
        gt_points=np.array(points, np.float32).reshape(-1, 2),
        gt_labels=np.array(gt_labels, np.int64),
        meta={"box_size": 32, "border_band": band, "mpp": mpp, "classes": list(classes)},
    )


def metrics(items, pp=KEEP_ALL, matching="greedy"):
    return judge(make_cache(items), pp, matching, RADIUS).metrics


def test_perfect():
    m = metrics([([(50, 50, 0.9), (120, 120, 0.8)], [(50, 50), (120, 120)])])
    assert (m["detection_rate"], m["fdr"], m["precision"], m["f1"]) == (1.0, 0.0, 1.0, 1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["box_ap50"] == pytest.approx(1.0) and m["box_ap"] == pytest.approx(1.0) and m["ap"] == pytest.approx(1.0)


def test_all_missed():
    m = metrics([([(150, 20, 0.9)], [(40, 40), (80, 80)])])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 2)
    assert (m["detection_rate"], m["fdr"], m["f1"], m["ap"], m["box_ap50"]) == (0.0, 1.0, 0.0, 0.0, 0.0)


def test_an_image_without_cells_has_an_undefined_detection_rate():
    m = metrics([([(50, 50, 0.9), (100, 100, 0.4)], [])])
    assert (m["tp"], m["fp"], m["fn"], m["fdr"]) == (0, 2, 0, 1.0)
    assert np.isnan(m["detection_rate"]) and np.isnan(m["ap"])


def test_images_without_cells_are_left_out_of_the_per_image_detection_rate():
    report = judge(make_cache([([(50, 50, 0.9)], [(50, 50)]), ([(50, 50, 0.9)], [])]), KEEP_ALL, "greedy", RADIUS)
    rates = report.images.set_index("image").detection_rate
    assert rates["Case_0-01"] == 1.0 and np.isnan(rates["Case_1-01"])
    assert rates.mean() == 1.0  # pandas' mean skips the undefined one


def test_duplicates_on_one_cell_count_once():
    m = metrics([([(50, 50, 0.9), (52, 50, 0.8), (49, 51, 0.7)], [(50, 50)])])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 0)
    assert m["fdr"] == pytest.approx(2 / 3)


def test_score_ties_give_one_match_each():
    m = metrics([([(50, 50, 0.5), (60, 50, 0.5)], [(55, 50)])])
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def test_model_that_detects_nothing_has_defined_metrics():
    """Issue 20: precision was 0 with FDR 0 when nothing was detected; precision = 1 - FDR always."""
    m = metrics([([], [(50, 50)]), ([], [(60, 60), (90, 90)])])
    assert (m["detection_rate"], m["fdr"], m["precision"], m["f1"], m["box_ap50"], m["ap"]) == (0, 0, 1, 0, 0, 0)
    assert m["fp_per_mm2"] == 0.0


def test_precision_is_one_minus_fdr_at_every_threshold():
    items = [([(50, 50, 0.9), (150, 150, 0.4)], [(50, 50)]), ([(60, 60, 0.7)], [(90, 90)])]
    table = judge(make_cache(items), KEEP_ALL, "greedy", RADIUS).curve
    assert (table.tp + table.fp == 0).any()  # the highest thresholds keep nothing
    assert np.allclose(table.precision, 1 - table.fdr)


def test_empty_images_are_neutral():
    full = [([(50, 50, 0.9)], [(50, 50), (150, 150)])]
    a, b = metrics(full), metrics(full + [([], [])])
    for k in ("detection_rate", "fdr", "f1", "tp", "fp", "fn", "ap", "box_ap50"):
        assert a[k] == b[k]


def test_operating_threshold_and_bootstrap_interval():
    items = [
        ([(50, 50, 0.9), (100, 100, 0.3)], [(50, 50), (100, 100)]),
        ([(50, 50, 0.2)], [(50, 50)]),
        ([(70, 70, 0.95), (10, 190, 0.6)], [(70, 70)]),
    ] * 2  # six images of six cases: enough units for an interval
    m = metrics(items, PostProcess(score_thresh=0.5, nms_thresh=1.0, detections_per_img=100))
    assert (m["tp"], m["fp"], m["fn"]) == (4, 2, 4)
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
    kept = [cache.det_range(i)[0] + keep(cache.tiles(i), KEEP_ALL, RADIUS) for i in range(len(cache))]
    ap, ap50 = box_ap(cache, kept)

    images, anns, results = [], [], []
    densest = 1
    for i in range(len(cache)):
        images.append({"id": i, "width": 200, "height": 200})
        _, _, gt = cache.ground_truth(i)
        densest = max(densest, len(gt), len(kept[i]))
        for b in gt:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                    "area": float((b[2] - b[0]) * (b[3] - b[1])),
                }
            )
        lo, hi = cache.det_range(i)
        for b, s in zip(cache.det_boxes[lo:hi], cache.det_scores[lo:hi]):
            results.append(
                {
                    "image_id": i,
                    "category_id": 1,
                    "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                }
            )
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
    scores = np.sort(rng.uniform(size=600).astype(np.float32))[::-1].copy()
    labels = rng.integers(1, 3, size=600)
    for iou in (0.3, 0.5, 0.8):
        for agnostic in (False, True):
            order = TileNms(boxes, scores, labels, iou, agnostic)
            for t in (0.0, 0.05, 0.5, 0.9):
                for k in (1, 50, 10_000):
                    pp = PostProcess(t, iou, k, agnostic)
                    assert np.array_equal(order.survivors(t)[:k], replay_tile(boxes, scores, labels, pp))


CPU = Runtime(torch.device("cpu"))


class _FindDots(torch.nn.Module):
    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift

    def forward(self, features, proposals, image_sizes):
        out = []
        for img in features:
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            xy = torch.stack([xs, ys], 1).float()
            # A detector's centre estimate leans towards the middle of what it sees.
            middle = torch.tensor([img.shape[2] / 2, img.shape[1] / 2])
            xy = xy + self.shift * torch.sign(middle - xy)
            b = torch.cat([xy - 16, xy + 16], 1) if len(xs) else torch.zeros((0, 4))
            out.append({"boxes": b, "scores": torch.ones(len(b)), "labels": torch.ones(len(b), dtype=torch.int64)})
        return out, {}


class _Batch(torch.nn.Module):
    """GeneralizedRCNNTransform's interface without resizing or normalising."""

    def forward(self, images):
        return ImageList(torch.stack(images), [tuple(i.shape[-2:]) for i in images]), None

    def postprocess(self, detections, image_sizes, original_sizes):
        return detections


class CellFinder(torch.nn.Module):
    """Reports a 32 px box on every bright dot of its input: a transparent detector for tiling tests,
    with a torchvision detector's parts. With `shift`, each centre leans that many px towards the
    middle of the tile."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.transform, self.backbone, self.roi_heads = _Batch(), torch.nn.Identity(), _FindDots(shift)

    def rpn(self, images, features):
        return None, {}


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
    tiles = detect_tiles(CellFinder(), image, (512, 680), 64, CPU)
    kept = keep(tiles, KEEP_ALL, RADIUS)
    centres = sorted(map(tuple, tiles.centres[kept].astype(int).tolist()))
    assert centres == sorted(cells)


def test_a_cell_on_a_tile_cut_found_by_both_tiles_is_kept_once():
    image = np.zeros((1024, 1360, 3), np.uint8)
    starts_x = tile_starts(1360, 680, 64)
    cut = (starts_x[0] + 680 + starts_x[1]) // 2  # where the first two tiles' cores meet
    near = [(cut, y) for y in (100, 600, 900)] + [(cut - 2, 300), (cut + 2, 800)]
    far = [(200, 100), (1200, 700), (400, 650), (1000, 150)]
    for x, y in near + far:
        image[y, x] = 255
    tiles = detect_tiles(CellFinder(shift=3.0), image, (512, 680), 64, CPU)

    def per_cell(kept, cells):
        d = np.linalg.norm(tiles.centres[kept][:, None] - np.array(cells, float)[None], axis=2)
        return (d <= RADIUS).sum(axis=0).mean()

    owned = np.flatnonzero(tiles.owned)
    assert per_cell(owned, near) == 2.0 and per_cell(owned, far) == 1.0  # ownership alone counts cut cells twice
    kept = keep(tiles, KEEP_ALL, RADIUS)
    assert per_cell(kept, near) == 1.0 and per_cell(kept, far) == 1.0
    assert len(kept) == len(near) + len(far)


def test_top_k_applies_per_tile_of_a_whole_image():
    image = np.zeros((1024, 1360, 3), np.uint8)
    rng = np.random.default_rng(0)
    dots = rng.integers([40, 40], [1320, 984], size=(300, 2))
    image[dots[:, 1], dots[:, 0]] = 255
    tiles = detect_tiles(CellFinder(), image, (512, 680), 64, CPU)
    k = 10
    kept = keep(tiles, PostProcess(0.0, 1.0, k), RADIUS)
    per_tile = np.bincount(tiles.tile[kept], minlength=len(tiles.origin))
    assert len(tiles.origin) == 9 and per_tile.max() <= k and len(kept) > k  # 9 model inputs, k each


def test_cells_and_detections_in_the_band_along_inner_patch_edges_count_neither_way():
    # A 200 px patch at (100, 100) of a 1024 x 1360 image: all four edges are inside the image.
    items = [
        ([(8, 100, 0.9), (3, 60, 0.8), (100, 100, 0.7), (150, 150, 0.6)], [(6, 100), (100, 100), (60, 190), (120, 50)])
    ]
    banded = judge(
        make_cache(items, origins=[(100, 100)], image_size=(1024, 1360), band=16.0), KEEP_ALL, "greedy", RADIUS
    ).metrics
    # (8,100) matches the band cell (6,100): ignored; (3,60) is in the band: ignored; (60,190) is in the
    # bottom band: not a miss. Left: one TP (100,100), one FP (150,150), one FN (120,50).
    assert (banded["tp"], banded["fp"], banded["fn"]) == (1, 1, 1)
    plain = judge(make_cache(items, origins=[(100, 100)], image_size=(1024, 1360)), KEEP_ALL, "greedy", RADIUS).metrics
    assert (plain["tp"], plain["fp"], plain["fn"]) == (2, 2, 2)
    # At the image's own edges there is no band: the cell may not be cut off there.
    edge = judge(
        make_cache(items, origins=[(0, 0)], image_size=(200, 200), band=16.0), KEEP_ALL, "greedy", RADIUS
    ).metrics
    assert (edge["tp"], edge["fp"], edge["fn"]) == (2, 2, 2)


def _brute_force_ap(items):
    """AP by definition: re-match every score cutoff from scratch, interpolate at 101 recall points."""
    from detection.matching import greedy_match

    dets = sorted((s, i, (x, y)) for i, (d, _) in enumerate(items) for x, y, s in d)[::-1]
    cells = sum(len(c) for _, c in items)
    points = []
    for n in range(1, len(dets) + 1):
        tp = 0
        for i, (_, c) in enumerate(items):
            mine = [(xy, s) for s, j, xy in dets[:n] if j == i]
            if mine and c:
                tp += int(
                    (
                        greedy_match(
                            np.array([m[0] for m in mine]), np.array([m[1] for m in mine]), np.array(c), RADIUS
                        )
                        >= 0
                    ).sum()
                )
        points.append((tp / cells, tp / n))
    return np.mean([max([p for r, p in points if r >= t], default=0.0) for t in np.linspace(0, 1, 101)])


def test_point_ap_equals_a_brute_force_computation():
    rng = np.random.default_rng(11)
    for _ in range(5):
        items = []
        for _ in range(3):
            cells = rng.uniform(20, 180, size=(int(rng.integers(3, 15)), 2))
            dets = [
                (x + rng.normal(0, 8), y + rng.normal(0, 8), rng.uniform()) for x, y in cells if rng.uniform() < 0.8
            ]
            dets += [tuple(rng.uniform(20, 180, 2)) + (rng.uniform(),) for _ in range(int(rng.integers(0, 8)))]
            items.append((dets, [tuple(c) for c in cells]))
        ap = metrics(items)["ap"]
        assert ap == pytest.approx(_brute_force_ap(items), abs=1e-12)
        assert 0 < ap < 1


def test_intervals_resample_cases_not_images():
    import pandas as pd

    from detection.metrics import bootstrap, bootstrap_unit

    # Within each case one image is all found and one all missed: every case is at 0.5.
    cases = range(1, 7)
    images = pd.DataFrame(
        {
            "image": [f"Case_{c}-0{k}" for c in cases for k in (1, 2)],
            "case": [f"Case_{c}" for c in cases for _ in (1, 2)],
            "tp": [10, 0] * 6,
            "fp": [0] * 12,
            "fn": [0, 10] * 6,
        }
    )
    assert bootstrap_unit(images) == "case"
    assert bootstrap(images).bounds["detection_rate"] == (0.5, 0.5)
    one_case = images.assign(case="Case_1")
    assert bootstrap_unit(one_case) == "image"
    low, high = bootstrap(one_case).bounds["detection_rate"]
    assert low < 0.5 < high


def _images(tp, fp, fn, per_case=1):
    import pandas as pd

    n = len(tp)
    return pd.DataFrame(
        {"image": [f"Case_{k // per_case}-0{k % per_case}" for k in range(n)], "tp": tp, "fp": fp, "fn": fn}
    ).assign(case=lambda d: [name.split("-")[0] for name in d.image])


def test_too_few_units_get_no_95_percent_interval_and_say_why():
    """Issue 20: with 2 images the "95%" interval was exactly the two images' rates."""
    from detection.metrics import MIN_UNITS, bootstrap

    few = bootstrap(_images([8, 2], [1, 3], [2, 8]))
    assert few.bounds == {} and set(few.missing) == {"detection_rate", "fdr", "f1"}
    assert f"fewer than {MIN_UNITS}" in few.note() and "2 case(s)" in few.note()
    enough = bootstrap(_images([8, 2, 5, 6, 7], [1, 3, 2, 2, 1], [2, 8, 5, 4, 3]))
    assert set(enough.bounds) == {"detection_rate", "fdr", "f1"} and not enough.missing


def test_a_case_without_cells_leaves_the_detection_rate_interval_defined():
    """Issue 20: one case without cells made the detection-rate interval NaN, silently not logged."""
    from detection.metrics import bootstrap

    got = bootstrap(_images([8, 2, 5, 6, 7, 0], [1, 3, 2, 2, 1, 4], [2, 8, 5, 4, 3, 0]))
    low, high = got.bounds["detection_rate"]
    assert np.isfinite(low) and np.isfinite(high) and low < high
    assert np.isfinite(got.bounds["fdr"][0])


def test_radius_zero_matches_coincident_points():
    from detection.matching import greedy_match, hungarian_match

    centres, points = np.array([[10.0, 10.0], [50.0, 50.0]]), np.array([[50.0, 50.0], [10.0, 10.0], [90.0, 90.0]])
    assert hungarian_match(centres, points, 0.0).tolist() == [1, 0]
    assert greedy_match(centres, np.array([0.9, 0.8]), points, 0.0).tolist() == [1, 0]
    assert hungarian_match(centres + 0.5, points, 0.0).tolist() == [-1, -1]


def test_the_nms_grid_reaches_the_top_of_its_range():
    from detection.tune import nms_grid

    assert nms_grid(0.3, 0.7).tolist() == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    assert nms_grid(0.1, 0.9)[-1] == 0.9 and nms_grid(0.32, 0.68).tolist() == [0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65]


def test_paper_patches_are_seeded_by_image_name(synth_dir):
    from detection.config import load
    from detection.data import load_dataset
    from detection.inference import paper_items
    from tests.conftest import ROOT

    cfg = load(ROOT / "experiments" / "smoke.yaml")
    samples = load_dataset(synth_dir)
    alone = paper_items(samples[3:4], cfg, seed=0)
    among = [it for it in paper_items(samples, cfg, seed=0) if it.name == samples[3].name]
    assert [it.origin for it in alone] == [it.origin for it in among]
    assert len({it.origin for it in alone}) > 1


# --- issue 20: the band, the merge across cuts, classes, densities --------------------------------


def _patch(items, band=16.0):
    """A 200 px patch at (100, 100) of a 1024 x 1360 image: all four edges are inner edges."""
    return judge(
        make_cache(items, origins=[(100, 100)], image_size=(1024, 1360), band=band), KEEP_ALL, "greedy", RADIUS
    )


def test_a_counted_cell_found_by_a_detection_inside_the_band_is_found():
    """Issue 20: a cell just outside the band whose detection lies inside it was counted a miss."""
    m = _patch([([(12, 100, 0.9)], [(20, 100)])]).metrics
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)


def test_a_detection_takes_a_counted_cell_before_a_band_cell():
    """Issue 20: a detection spent itself on a band cell and left a counted cell 9 px away a miss."""
    m = _patch([([(14, 100, 0.9)], [(8, 100), (23, 100)])]).metrics
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)


def _cut():
    starts_x = tile_starts(1360, 680, 64)
    return (starts_x[0] + 680 + starts_x[1]) // 2  # where the first two tiles' cores meet


@pytest.mark.parametrize("apart", [10, 12, 15])
def test_two_cells_on_either_side_of_a_cut_are_both_kept(apart):
    """Issue 20: the merge across cuts deleted a real neighbour (tp 1, fn 1; tp 2 inside one tile)."""
    image = np.zeros((1024, 1360, 3), np.uint8)
    cut = _cut()
    pairs = [((cut - apart // 2, y), (cut - apart // 2 + apart, y)) for y in (150, 450, 800)]
    inside = [((300, y), (300 + apart, y)) for y in (150, 450)]
    for a, b in pairs + inside:
        image[a[1], a[0]] = image[b[1], b[0]] = 255
    tiles = detect_tiles(CellFinder(), image, (512, 680), 64, CPU)
    kept = keep(tiles, KEEP_ALL, RADIUS)
    cells = np.array([c for pair in pairs + inside for c in pair], float)
    d = np.linalg.norm(tiles.centres[kept][:, None] - cells[None], axis=2)
    assert (d.min(axis=0) <= 1.0).all() and len(kept) == len(cells)


def test_a_duplicate_across_a_cut_merges_across_classes_when_nms_is_class_agnostic():
    """Issue 20: the merge worked per class even with class-agnostic NMS."""
    from detection.postprocess import Tiles

    boxes = np.array([[82, 34, 114, 66], [86, 34, 118, 66]], np.float32)  # centres x 98 and 102
    tiles = Tiles(
        origin=np.array([[0, 0], [60, 0]]),
        core=np.array([[-np.inf, -np.inf, 100, np.inf], [100, -np.inf, np.inf, np.inf]]),
        tile=np.array([0, 1]),
        boxes=boxes,
        nms_boxes=boxes.copy(),
        scores=np.array([0.9, 0.8], np.float32),
        labels=np.array([1, 2]),
    )
    assert len(keep(tiles, PostProcess(0.0, 0.5, 100, class_agnostic=True), RADIUS)) == 1
    assert len(keep(tiles, PostProcess(0.0, 0.5, 100, class_agnostic=False), RADIUS)) == 2  # two classes


def test_false_positives_per_mm2_and_the_froc_by_hand():
    # 200 x 200 px at 0.5 um/px: 0.01 mm², so each false positive is 100 per mm².
    dets = [(30, 30, 0.9), (60, 150, 0.8), (90, 90, 0.7), (120, 30, 0.6), (150, 150, 0.5), (170, 60, 0.4)]
    m = metrics([(dets, [(30, 30), (90, 90), (150, 150)])])
    assert m["area_mm2"] == pytest.approx(0.01) and m["fp_per_mm2"] == pytest.approx(300)
    # 0 FP: 1/3 found; 1 FP (100/mm²): 2/3; 2 FP (200/mm²): all.
    expected = {10: 1 / 3, 20: 1 / 3, 50: 1 / 3, 100: 2 / 3, 200: 1.0, 300: 1.0}
    for t, v in expected.items():
        assert m[f"froc_dr_at_{t}"] == pytest.approx(v)
    assert m["froc"] == pytest.approx(np.mean(list(expected.values())))


def test_the_band_is_left_out_of_the_area():
    report = _patch([([(100, 100, 0.9)], [(100, 100)])])
    assert report.metrics["area_mm2"] == pytest.approx((200 - 32) ** 2 * 0.25e-6)


def test_each_class_is_counted_apart_and_a_wrong_class_is_a_false_positive_and_a_miss():
    """Issue 20: the pooled rate mixed classes without saying how a wrong class counts."""
    dets = [(50, 50, 0.9, 1), (120, 120, 0.8, 1), (160, 40, 0.7, 2)]
    cells = [(50, 50, 1), (120, 120, 2), (160, 40, 2)]  # the second detection has the wrong class
    m = judge(make_cache([(dets, cells)], classes=("tumor", "non_tumor")), KEEP_ALL, "greedy", RADIUS).metrics
    assert (m["tumor/tp"], m["tumor/fp"], m["tumor/fn"]) == (1, 1, 0)
    assert (m["non_tumor/tp"], m["non_tumor/fp"], m["non_tumor/fn"]) == (1, 0, 1)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)  # pooled: the sum of the classes
    assert (m["any_class/tp"], m["any_class/fp"], m["any_class/fn"]) == (3, 0, 0)


def test_one_class_logs_no_class_figures():
    assert not any("/" in k for k in metrics([([(50, 50, 0.9)], [(50, 50)])]))
