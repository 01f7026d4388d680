"""GPU figures for the paper's model, one JSON line each, on synthetic data of the real shapes.

    python bench/gpu.py [--config experiments/paper-norm.yaml] [--steps 20] [--iters 8]

paper-norm.yaml is paper.yaml (same architecture and cost) with measured input statistics: with the
paper's image_std of ~0.004 a randomly initialised network overflows and proposes no box, which
would skip the RoI head's work.

Training images/s: the plain fp32 loop, the loop as the project ran it before (fp16 autocast with a
GradScaler), and the fast path (bf16 autocast without a scaler, channels_last, cudnn.benchmark,
uint8 patches decoded once and pinned, copied non-blocking), at batch 1 (the paper's), 4 and 8.
Inference, as evaluation and serving run it (raw outputs, a 1360x1024 image cut into 9 tiles of
512x680, each upsampled to 1024x1360 by the paper config): patches/s and whole images/s, fp32
against bf16 autocast, tiles one by one against one batched call. Peak GPU memory for each.
Pretrained weights are not fetched (same architecture and cost). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detection import config as config_mod  # noqa: E402
from detection.inference import tile_starts  # noqa: E402
from detection.model import build_model  # noqa: E402
from detection.postprocess import raw_outputs  # noqa: E402


def patches(cfg, n: int, rng) -> list[tuple[torch.Tensor, dict]]:
    """uint8 CHW patches of the training size with 20-60 cells each, decoded once and pinned."""
    h, w = cfg.data.patch_size
    half = cfg.data.box_size / 2
    out = []
    for _ in range(n):
        image = torch.from_numpy(rng.integers(90, 250, (3, h, w), dtype=np.uint8)).pin_memory()
        pts = rng.uniform([half, half], [w - half, h - half], size=(int(rng.integers(20, 60)), 2))
        boxes = torch.from_numpy(np.concatenate([pts - half, pts + half], 1).astype(np.float32)).pin_memory()
        out.append((image, {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64).pin_memory()}))
    return out


def _peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


MODES = {  # name: (autocast dtype, channels_last, cudnn.benchmark)
    "fp32": (None, False, False),
    "fp16-scaler": (torch.float16, False, False),  # the loop as landed: fp16 autocast and a GradScaler
    "bf16": (torch.bfloat16, False, True),
    "bf16-channels_last": (torch.bfloat16, True, True),
}


def model_for(cfg, device, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_rate(cfg, data, mode: str, batch: int, steps: int, warmup: int) -> dict:
    device = torch.device("cuda")
    dtype, channels_last, benchmark = MODES[mode]
    torch.backends.cudnn.benchmark = benchmark
    model = model_for(cfg, device, channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    model.train()
    losses = []

    def step(i: int) -> None:
        items = [data[(i * batch + j) % len(data)] for j in range(batch)]
        images = [im.to(device, non_blocking=True).float().div_(255.0) for im, _ in items]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for _, t in items]
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        losses.append(loss.detach())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {"figure": "train", "config": cfg.name, "mode": mode, "batch": batch, "steps": steps,
            "images_per_s": round(steps * batch / seconds, 2), "s_per_step": round(seconds / steps, 4),
            "peak_gb": _peak_gb(), "last_loss": round(float(losses[-1]), 4)}


def whole_image_tiles(cfg, rng) -> list[torch.Tensor]:
    image = rng.integers(90, 250, (1024, 1360, 3), dtype=np.uint8)
    th, tw = cfg.data.patch_size
    overlap = 2 * cfg.data.box_size
    return [torch.from_numpy(np.ascontiguousarray(image[y:y + th, x:x + tw])).permute(2, 0, 1).contiguous()
            for y in tile_starts(1024, th, overlap) for x in tile_starts(1360, tw, overlap)]


@torch.inference_mode()
def infer_rate(cfg, tiles: list[torch.Tensor], precision: str, batched: bool, iters: int, warmup: int) -> dict:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = model_for(cfg, device, False).eval()

    def one_image() -> int:
        images = [t.to(device, non_blocking=True).float().div_(255.0) for t in tiles]
        with raw_outputs(model), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outs = model(images) if batched else [model([im])[0] for im in images]
        return sum(len(o["scores"]) for o in outs)

    for _ in range(warmup):
        one_image()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    boxes = sum(one_image() for _ in range(iters))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {"figure": "inference", "config": cfg.name, "precision": precision, "tiles": "batched" if batched else
            "one by one", "whole_images_per_s": round(iters / seconds, 2),
            "patches_per_s": round(iters * len(tiles) / seconds, 1), "raw_boxes_per_image": boxes // iters,
            "peak_gb": _peak_gb()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/paper-norm.yaml", help="config to time (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default: %(default)s)")
    p.add_argument("--iters", type=int, default=8, help="timed whole images (default: %(default)s)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: bench/gpu.py measures GPU paths only; "
                                   "bench/train_step.py and bench/infer.py give CPU figures"}))
        return 0
    cfg = config_mod.load(args.config)  # built with pretrained=False: the architecture, no download
    print(json.dumps({"figure": "device", "name": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "bf16": torch.cuda.is_bf16_supported()}), flush=True)
    rng = np.random.default_rng(0)
    data = patches(cfg, 16, rng)
    for mode, batch in (("fp32", 1), ("fp16-scaler", 1), ("bf16", 1), ("bf16-channels_last", 1), ("fp32", 4),
                        ("bf16", 4), ("fp32", 8), ("bf16", 8)):
        print(json.dumps(train_rate(cfg, data, mode, batch, args.steps, warmup=5)), flush=True)
        torch.cuda.empty_cache()
    tiles = whole_image_tiles(cfg, rng)
    for precision in ("fp32", "bf16"):
        for batched in (False, True):
            print(json.dumps(infer_rate(cfg, tiles, precision, batched, args.iters, warmup=2)), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
