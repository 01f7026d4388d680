"""How often the replay disagrees with torchvision's own RoIHeads post-processing, on generated
near-threshold cases (scores exactly at float32 thresholds, IoUs exactly at the NMS threshold,
small sets where batched_nms offsets coordinates, large sets where it switches paths).

    python bench/replay_exactness.py [--cases 800]

"legacy" is the replay this project used before (NMS once on every raw box, thresholds compared
in float64); "replay" is `replay_tile`, "tile_nms" is `TileNms`, which the tune study uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detection.postprocess import PostProcess, TileNms, replay_tile  # noqa: E402
from tests.nms_cases import generate, postprocess, raw  # noqa: E402


def legacy(b, s, lab, t, u, k):
    keep = batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(lab), u).numpy()
    above = int(np.searchsorted(-s[keep], -t, side="left"))  # float64 comparison
    return keep[: min(above, k)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=800, help="generated cases, 4 settings each (default: %(default)s)")
    args = p.parse_args()
    wrong = {"legacy": 0, "replay": 0, "tile_nms": 0}
    checked = 0
    start = time.perf_counter()
    for case in generate(args.cases):
        b, s, lab = raw(case)
        for t, u, k in case.settings:
            own = postprocess(case, t, u, k)[1]
            for name, kept in (
                ("legacy", legacy(b, s, lab, t, u, k)),
                ("replay", replay_tile(b, s, lab, PostProcess(t, u, k))),
                ("tile_nms", TileNms(b, s, lab, u, False).survivors(t)[1][:k]),
            ):
                wrong[name] += not np.array_equal(s[kept], own)
            checked += 1
    print(json.dumps({"checks": checked, "disagreements": wrong, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
