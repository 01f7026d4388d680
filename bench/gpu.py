"""GPU figures for the paper's model, one JSON line each, on synthetic data of the real shapes.

    python bench/gpu.py [--config experiments/paper-norm.yaml] [--steps 20] [--iters 8]

paper-norm.yaml is paper.yaml (same architecture and cost) with measured input statistics: with the
paper's image_std of ~0.004 a randomly initialised network overflows and proposes no box, which
would skip the RoI head's work.

Training images/s: the plain fp32 loop beside the package's own loop as train.fit runs it on CUDA
(bf16 autocast without a scaler, channels_last, cudnn.benchmark, a pinned DataLoader of uint8
patches decoded once), at batch 1 (the paper's), 4 and 8. Inference through the package's
`detect_tiles` and `Runtime`, as evaluation and the served model run it (raw outputs, a 1360x1024
image cut into 9 tiles of 512x680, each upsampled to 1024x1360 by the paper config): patches/s and
whole images/s, fp32 against bf16 autocast, one tile per pass against 9. Peak GPU memory for each.
Then the GPU tests (tests/test_gpu.py).
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
    return {
        "figure": "train",
        "config": cfg.name,
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "images_per_s": round(steps * batch / seconds, 2),
        "s_per_step": round(seconds / steps, 4),
        "peak_gb": _peak_gb(),
        "last_loss": round(float(losses[-1]), 4),
    }


class SyntheticPatches(torch.utils.data.Dataset):
    """Patches of the training size, decoded once, served as the package's loader serves them."""

    def __init__(self, cfg, n: int, rng):
        from detection.sampling import Patch

        h, w = cfg.data.patch_size
        half = cfg.data.box_size / 2
        self.items = []
        for _ in range(n):
            pts = rng.uniform([half, half], [w - half, h - half], size=(int(rng.integers(20, 60)), 2))
            boxes = np.concatenate([pts - half, pts + half], 1).astype(np.float32)
            self.items.append(
                Patch(
                    "synthetic",
                    (0, 0),
                    rng.integers(90, 250, (h, w, 3), dtype=np.uint8),
                    pts.astype(np.float32),
                    boxes,
                    np.ones(len(boxes), np.int64),
                )
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def package_train_rate(cfg, batch: int, steps: int, warmup: int, rng) -> dict:
    """The package's own loop (engine.train_one_epoch) as train.fit sets it up on CUDA: bf16 autocast
    where supported (no scaler), channels_last, cudnn.benchmark, a pinned DataLoader with workers."""
    from detection.engine import PRECISION_NAMES, autocast_dtype, train_one_epoch
    from detection.sampling import collate

    device = torch.device("cuda")
    dtype = autocast_dtype(device, True)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    data = SyntheticPatches(cfg, (steps + warmup) * batch, rng)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, collate_fn=collate, num_workers=4, pin_memory=True, persistent_workers=True
    )
    batches = iter(loader)
    warm = [next(batches) for _ in range(warmup)]
    losses = []
    train_one_epoch(model, opt, warm, device, scaler, dtype, 0, lambda s, v: losses.append(v["loss"]))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    train_one_epoch(model, opt, batches, device, scaler, dtype, 0, lambda s, v: losses.append(v["loss"]))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {
        "figure": "train",
        "config": cfg.name,
        "mode": f"package ({PRECISION_NAMES[dtype]}, channels_last, loader)",
        "batch": batch,
        "steps": steps,
        "images_per_s": round(steps * batch / seconds, 2),
        "s_per_step": round(seconds / steps, 4),
        "peak_gb": _peak_gb(),
        "last_loss": round(losses[-1], 4),
    }


def package_infer_rate(cfg, image: np.ndarray, precision: str, batch: int, iters: int, warmup: int) -> dict:
    """detect_tiles as evaluation and the served model run it, with the package's Runtime."""
    from detection.inference import Runtime, detect_tiles

    rt = Runtime.choose("cuda", precision, batch)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = rt.place(build_model(cfg.model, pretrained=False))
    with raw_outputs(model):
        for _ in range(warmup):
            detect_tiles(model, image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(iters):
            tiles = detect_tiles(model, image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {
        "figure": "inference",
        "config": cfg.name,
        "path": "package detect_tiles",
        **rt.describe(),
        "whole_images_per_s": round(iters / seconds, 2),
        "patches_per_s": round(iters * len(tiles.origin) / seconds, 1),
        "raw_boxes_per_image": len(tiles.scores),
        "peak_gb": _peak_gb(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/paper-norm.yaml", help="config to time (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default: %(default)s)")
    p.add_argument("--iters", type=int, default=8, help="timed whole images (default: %(default)s)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(
            json.dumps(
                {
                    "error": "no CUDA device: bench/gpu.py measures GPU paths only; "
                    "bench/cpu_inference.py gives the CPU figures"
                }
            )
        )
        return 0
    cfg = config_mod.load(args.config)  # built with pretrained=False: the architecture, no download
    print(
        json.dumps(
            {
                "figure": "device",
                "name": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "bf16": torch.cuda.is_bf16_supported(),
            }
        ),
        flush=True,
    )
    rng = np.random.default_rng(0)
    data = patches(cfg, 16, rng)
    # The plain fp32 loop beside the package's fast path, in the same run.
    for batch in (1, 4, 8):
        print(json.dumps(train_rate(cfg, data, "fp32", batch, args.steps, warmup=5)), flush=True)
        torch.cuda.empty_cache()
        print(json.dumps(package_train_rate(cfg, batch, args.steps, 5, rng)), flush=True)
        torch.cuda.empty_cache()
    image = rng.integers(90, 250, (1024, 1360, 3), dtype=np.uint8)
    for precision in ("fp32", "bf16"):
        for batch in (1, 9):
            print(json.dumps(package_infer_rate(cfg, image, precision, batch, args.iters, warmup=2)), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
