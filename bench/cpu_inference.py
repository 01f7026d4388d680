"""CPU figures: whole-image inference seconds and the training data pipeline's patches/s, each
against the code before issue 11 in the same run, plus the profile of one whole-image inference.

    python bench/cpu_inference.py --data-dir ../shared/data/brecahad-sample [--configs smoke paper]

Inference runs the way evaluation and serving do (raw outputs of 512x680 tiles of a 1360x1024 image):
  before       tiles one by one, fp32 (the landed code)
  default      tiles side by side on `workers` threads, fp32, channels_last (the new CPU default)
  bf16         as default, with bf16 autocast (an option: BRECAHAD_PRECISION=bf16)
Weights are random (same architecture and cost; no download); paper-norm is paper.yaml with measured
input statistics, since with the paper's image_std a random network proposes no box. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from detection import config
from detection.data import load_dataset
from detection.inference import Runtime, detect_tiles
from detection.model import build_model
from detection.postprocess import raw_outputs
from detection.sampling import EpochOrder, TrainPatches, collate, random_patch

CPU = torch.device("cpu")


def whole_image(cfg_name: str, image: np.ndarray, repeats: int) -> list[dict]:
    cfg = config.load(f"experiments/{cfg_name}.yaml")
    torch.manual_seed(0)
    runtimes = {
        "before": Runtime(CPU, None, 1, 1),
        "default": Runtime.choose("cpu", "fp32"),
        "bf16": Runtime.choose("cpu", "bf16"),
    }
    out = []
    for name, rt in runtimes.items():
        model = build_model(cfg.model, pretrained=False).eval()
        if name != "before":  # the landed code ran contiguous weights
            rt.place(model)
        with raw_outputs(model):
            detect_tiles(model, image[:512, :680], cfg.data.patch_size, 2 * cfg.data.box_size, rt)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                tiles = detect_tiles(model, image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)
                times.append(time.perf_counter() - start)
        out.append(
            {
                "figure": "whole_image_inference",
                "config": cfg_name,
                "path": name,
                **rt.describe(),
                "seconds": round(min(times), 2),
                "tiles": len(tiles.origin),
                "raw_boxes": len(tiles.scores),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    base = out[0]["seconds"]
    for row in out[1:]:
        print(
            json.dumps(
                {
                    "figure": "speedup",
                    "config": cfg_name,
                    "path": row["path"],
                    "x_before": round(base / row["seconds"], 2),
                }
            ),
            flush=True,
        )
    return out


class _DecodeEachTime(torch.utils.data.Dataset):
    """The landed pipeline: the TIFF decoded again for every patch."""

    def __init__(self, samples, cfg):
        self.samples, self.cfg = samples, cfg

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        rng = np.random.default_rng([0, 0, i])
        return random_patch(self.samples[i], self.samples[i].read_image(), self.cfg, rng, True)


def pipeline(data_dir: str, epochs: int) -> None:
    cfg = config.load("experiments/paper.yaml")
    samples = load_dataset(data_dir)
    start = time.perf_counter()
    decoded = TrainPatches(samples, cfg.data, seed=0)
    decode_s = time.perf_counter() - start
    old = _DecodeEachTime(samples, cfg.data)
    for name, data, workers in (("before", old, 0), ("decoded once", decoded, 0), ("decoded once", decoded, 1)):
        order = EpochOrder(len(samples), 0) if data is decoded else None
        loader = torch.utils.data.DataLoader(
            data, batch_size=1, sampler=order, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0
        )
        next(iter(loader))  # start the workers
        start, n = time.perf_counter(), 0
        for e in range(epochs):
            if order:
                order.set_epoch(e)
            for images, _ in loader:
                n += len(images)
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "figure": "data_pipeline",
                    "path": name,
                    "workers": workers,
                    "patches": n,
                    "patches_per_s": round(n / seconds, 1),
                    "decode_once_s": round(decode_s, 2),
                }
            ),
            flush=True,
        )


def profile(image: np.ndarray) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = config.load("experiments/smoke.yaml")
    # The default path's ops, one tile at a time: the profiler records the calling thread only.
    rt = Runtime(CPU, None, 1, 1)
    model = rt.place(build_model(cfg.model, pretrained=False))
    with raw_outputs(model):
        detect_tiles(model, image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)
        with torch_profile(activities=[ProfilerActivity.CPU]) as p:
            detect_tiles(model, image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    total = sum(e.self_cpu_time_total for e in p.key_averages())
    for e in rows:
        print(
            json.dumps(
                {
                    "figure": "profile_top5",
                    "config": "smoke",
                    "op": e.key,
                    "calls": e.count,
                    "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2),
                    "share": round(e.self_cpu_time_total / total, 3),
                }
            ),
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--configs", nargs="+", default=["smoke", "paper-norm"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3, help="data pipeline epochs (default: %(default)s)")
    args = p.parse_args()
    print(
        json.dumps(
            {
                "figure": "machine",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            }
        ),
        flush=True,
    )
    image = load_dataset(args.data_dir)[0].read_image()
    pipeline(args.data_dir, args.epochs)
    for name in args.configs:
        whole_image(name, image, args.repeats)
    profile(image)


if __name__ == "__main__":
    main()
