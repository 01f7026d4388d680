"""Seconds to draw and save one overlay (a 1360x1024 BreCaHAD image, its ground truth and N
predicted boxes) as one collection per colour, against one patch per box (the first version).

    python bench/overlay.py [--boxes 100 1000 5000]

An untrained or barely trained model keeps up to detections_per_img boxes per image, and evaluate,
predict and every training figure draw such overlays; the pictures are pixel-identical
(tests/test_figures.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' reference drawing

from detection import figures  # noqa: E402
from detection.data import load_dataset, points_to_boxes  # noqa: E402
from tests.conftest import SAMPLE  # noqa: E402
from tests.test_figures import _one_patch_per_box  # noqa: E402


def seconds(draw, *args) -> float:
    start = time.perf_counter()
    fig = draw(*args)
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[100, 1000, 5000])
    args = parser.parse_args()
    sample = load_dataset(SAMPLE)[0]
    image = sample.read_image()
    h, w = image.shape[:2]
    truth = points_to_boxes(sample.points["tumor"], 32, w, h)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.boxes:
        xy = rng.uniform(0, [w, h], size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 60, size=(n, 2))], axis=1)
        scores = rng.uniform(0, 1, n)
        call = (image, truth, boxes, scores, sample.name)
        seconds(figures.overlay, *call)  # warm matplotlib's caches once
        rows.append(
            {
                "boxes": n,
                "collection_s": round(min(seconds(figures.overlay, *call) for _ in range(3)), 3),
                "patch_per_box_s": round(min(seconds(_one_patch_per_box, *call) for _ in range(3)), 3),
            }
        )
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
