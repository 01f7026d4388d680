"""How often the replay disagrees with the model's own RoI-heads post-processing, comparing the kept
**boxes, scores and labels**, on generated near-threshold cases: scores exactly at float32
thresholds, IoUs exactly at the NMS threshold, sets over 1,000 boxes, several classes, exactly tied
scores, each with the head's outputs in fp32, bf16 or fp16 as autocast makes them.

    python bench/replay_exactness.py [--cases 800] [--device cpu|cuda]

"torchvision" is torchvision's RoIHeads against the replay it would need (its batched_nms on the
float32 cache): what the project shipped before issue 20. "replay" is `replay_tile` against the
model's `ExactRoIHeads`, "tile_nms" is `TileNms`, which the tune study uses. With --device cuda the
heads run on the GPU under CUDA autocast and the replay on the CPU, as evaluation does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import batched_nms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detection.postprocess import ExactRoIHeads, PostProcess, TileNms, replay_tile  # noqa: E402
from tests.nms_cases import DTYPES, Case, generate, heads  # noqa: E402


def run_heads(case: Case, t: float, u: float, k: int, cls, device: str):
    """The heads' own post-processing of the case on `device`, under the case's autocast dtype."""
    dtype = DTYPES[case.dtype]
    with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        b, s, lab = heads(t, u, k, cls).postprocess_detections(
            case.class_logits.to(device),
            case.box_regression.to(device),
            [case.proposals.to(device)],
            [case.image_shape],
        )
    return b[0].float().cpu().numpy(), s[0].float().cpu().numpy(), lab[0].cpu().numpy()


def stock_replay(b, s, lab, t, u, k):
    n = int(np.searchsorted(-s, -np.float32(t), side="left"))
    return batched_nms(torch.from_numpy(b[:n]), torch.from_numpy(s[:n]), torch.from_numpy(lab[:n]), u).numpy()[:k]


def same(kept, b, s, lab, own) -> bool:
    return np.array_equal(b[kept], own[0]) and np.array_equal(s[kept], own[1]) and np.array_equal(lab[kept], own[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=800, help="generated cases, 4 settings each (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the heads run: cpu or cuda (default: %(default)s)")
    args = p.parse_args()
    wrong = {"torchvision": {}, "replay": {}, "tile_nms": {}}
    checked: dict[str, int] = {}
    start = time.perf_counter()
    for case in generate(args.cases):
        key = f"{case.kind}/{case.dtype}"
        stock_raw = run_heads(case, 0.0, 1.0, 100_000, RoIHeads, args.device)
        raw = run_heads(case, 0.0, 1.0, 100_000, ExactRoIHeads, args.device)
        for t, u, k in case.settings:
            checked[key] = checked.get(key, 0) + 1
            stock_own = run_heads(case, t, u, k, RoIHeads, args.device)
            own = run_heads(case, t, u, k, ExactRoIHeads, args.device)
            kept = replay_tile(*raw, PostProcess(t, u, k))
            for name, ok in (
                ("torchvision", same(stock_replay(*stock_raw, t, u, k), *stock_raw, stock_own)),
                ("replay", same(kept, *raw, own)),
                ("tile_nms", same(TileNms(*raw, u, False).survivors(t)[:k], *raw, own)),
            ):
                wrong[name][key] = wrong[name].get(key, 0) + (not ok)
    print(
        json.dumps(
            {
                "device": args.device,
                "checks": sum(checked.values()),
                "checks_by_case": checked,
                "disagreements": {name: sum(by.values()) for name, by in wrong.items()},
                "disagreements_by_case": {name: {k: v for k, v in by.items() if v} for name, by in wrong.items()},
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
