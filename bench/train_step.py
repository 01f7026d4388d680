"""Seconds per training step and per inference for a config, on whatever device is at hand.

    python bench/train_step.py experiments/smoke.yaml experiments/paper.yaml --data-dir DIR --steps 3

Pretrained weights are not fetched (same architecture and cost), so it runs offline. Reports the
median over `--steps` after one warm-up step, and training images per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from detection import config
from detection.data import load_dataset
from detection.engine import pick_device
from detection.model import build_model, parameter_count
from detection.sampling import random_patch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(path: str, data_dir: str, steps: int, device_name: str) -> dict:
    cfg = config.load(path)
    device = pick_device(device_name)
    model = build_model(cfg.model, pretrained=False).to(device)
    amp = cfg.train.amp and device.type == "cuda"
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    samples = load_dataset(data_dir)
    rng = np.random.default_rng(0)
    train_times, infer_times = [], []
    for i in range(steps + 1):
        s = samples[i % len(samples)]
        image, target = random_patch(s, s.read_image(), cfg.data, rng, True).tensors()
        image, target = image.to(device), {k: v.to(device) for k, v in target.items()}
        model.train()
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, enabled=amp):
            loss = sum(model([image], [target]).values())
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        train_times.append(time.perf_counter() - t)
        model.eval()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            model([image])
        _sync(device)
        infer_times.append(time.perf_counter() - t)
    step = statistics.median(train_times[1:])
    return {
        "config": cfg.name,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters_M": round(parameter_count(model) / 1e6, 1),
        "steps": steps,
        "train_s_per_step": round(step, 3),
        "train_images_per_s": round(cfg.train.batch_size / step, 2),
        "infer_s_per_patch": round(statistics.median(infer_times[1:]), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="experiments/*.yaml to time")
    p.add_argument("--data-dir", required=True, help="BreCaHAD folder (the shared sample or synthetic data)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    args = p.parse_args()
    for path in args.configs:
        print(json.dumps(bench(path, args.data_dir, args.steps, args.device)), flush=True)


if __name__ == "__main__":
    main()
