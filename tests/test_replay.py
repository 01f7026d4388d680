"""The replay is exact: torchvision's RoIHeads, `replay_tile`, `TileNms` and the Replayer agree."""

import numpy as np
import pytest

from detection.inference import Cache
from detection.matching import Counts
from detection.metrics import Replayer, score
from detection.postprocess import PostProcess, TileNms, replay_tile
from tests.nms_cases import generate, postprocess, raw

CASES = 800  # x 4 settings = 3,200 near-threshold checks


def test_replay_equals_roi_heads_on_generated_near_threshold_cases():
    checked, kinds, disagreements = 0, set(), []
    for n, case in enumerate(generate(CASES)):
        b, s, lab = raw(case)
        for t, u, k in case.settings:
            own = postprocess(case, t, u, k)
            kept = replay_tile(b, s, lab, PostProcess(t, u, k))
            survivors = TileNms(b, s, lab, u, False).survivors(t)[1][:k]
            same = (
                np.array_equal(b[kept], own[0])
                and np.array_equal(s[kept], own[1])
                and np.array_equal(lab[kept], own[2])
                and np.array_equal(survivors, kept)
            )
            if not same:
                disagreements.append((n, case.kind, t, u, k, len(kept), len(own[1])))
            checked += 1
            kinds.add(case.kind)
    assert checked >= 3000 and kinds == {"small", "large", "multiclass"}
    assert disagreements == []


def _tiled_cache(rng, items: int, grid: int = 2, tile: float = 120.0) -> Cache:
    """Items of grid x grid overlapping tiles with clustered raw boxes and cells, for the Replayer."""
    names, t_item, t_origin, t_core, d_tile, boxes, scores, g_item, points = [], [], [], [], [], [], [], [], []
    step = tile - 24
    size = step * (grid - 1) + tile
    for i in range(items):
        names.append(f"Case_{i % 3}-0{i}")
        cells = rng.uniform(10, size - 10, size=(int(rng.integers(5, 40)), 2))
        g_item += [i] * len(cells)
        points += cells.tolist()
        cuts = [-np.inf] + [k * step + 12 for k in range(1, grid)] + [np.inf]
        for gy in range(grid):
            for gx in range(grid):
                x0, y0 = gx * step, gy * step
                inside = cells[
                    (cells[:, 0] >= x0) & (cells[:, 0] < x0 + tile) & (cells[:, 1] >= y0) & (cells[:, 1] < y0 + tile)
                ]
                n = int(rng.integers(5, 120))
                c = np.concatenate(
                    [
                        inside[rng.integers(0, max(1, len(inside)), n // 2)]
                        if len(inside)
                        else rng.uniform([x0, y0], [x0 + tile, y0 + tile], (n // 2, 2)),
                        rng.uniform([x0, y0], [x0 + tile, y0 + tile], (n - n // 2, 2)),
                    ]
                )
                c = c + rng.normal(0, 4, c.shape)
                half = rng.uniform(8, 16, (n, 1))
                b = np.clip(
                    np.concatenate([c - half, c + half], 1), [x0, y0, x0, y0], [x0 + tile] * 2 + [y0 + tile] * 2
                )
                sc = np.sort(rng.uniform(size=n).astype(np.float32))[::-1]
                d_tile += [len(t_item)] * n
                boxes += b.tolist()
                scores += sc.tolist()
                t_item.append(i)
                t_origin.append((x0, y0))
                t_core.append((cuts[gx], cuts[gy], cuts[gx + 1], cuts[gy + 1]))
    boxes = np.array(boxes, np.float32)
    tile_origin = np.array(t_origin, np.int64)
    d_tile = np.array(d_tile, np.int32)
    return Cache(
        np.array(names),
        np.zeros((items, 2), np.int64),
        np.full((items, 2), int(size)),
        np.full((items, 2), int(size)),
        np.array(t_item, np.int32),
        tile_origin,
        np.array(t_core, np.float64),
        d_tile,
        boxes,
        boxes - np.tile(tile_origin[d_tile], 2).astype(np.float32),
        np.array(scores, np.float32),
        np.ones(len(scores), np.int64),
        np.array(g_item, np.int32),
        np.array(points, np.float32),
        np.ones(len(points), np.int64),
        {"box_size": 32, "border_band": 0.0},
    )


@pytest.mark.parametrize("grid", [1, 2])
def test_replayer_equals_scoring_each_setting_directly(grid):
    rng = np.random.default_rng(grid)
    cache = _tiled_cache(rng, items=4, grid=grid)
    replayer = Replayer(cache, "greedy", 16.0)
    for _ in range(150):
        pp = PostProcess(
            float(rng.uniform(0, 0.95)), float(rng.choice([0.3, 0.5, 0.8])), int(rng.choice([3, 10, 40, 1000]))
        )
        direct = sum(score(cache, pp, "greedy", 16.0).counts(), Counts(0, 0, 0))
        assert replayer.counts(pp) == direct, pp
