"""Checkpoint size and seconds, local save and upload, against the epoch they follow.

    python bench/checkpoint.py experiments/smoke.yaml experiments/paper.yaml [--stack .stack]

A checkpoint is what `train.fit` writes: the model, Adam's two moments (after one step, so they
exist), the scheduler and the scaler. The local save goes to a temp folder; the upload goes through
MLflow to the team stack's server and its artifact folder (`--stack`, started with `python -m
detection stack up`), else to a local file store. Epoch seconds come from measured step times (docs/benchmarks.md):
an epoch is 138 training images at batch 1. Prints one JSON line per config.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from detection import config
from detection.model import build_model, parameter_count
from detection.train import _on_host

# Seconds per training image measured on this project's machines (docs/benchmarks.md).
EPOCH_IMAGES = 138
SECONDS_PER_IMAGE = {"smoke": {"cpu-2-core": 2.07}, "paper": {"cpu-2-core": 14.4, "h200-bf16-fast": 1 / 26.4}}


def checkpoint_state(path: str) -> tuple[dict, int]:
    cfg = config.load(path)
    model = build_model(cfg.model, pretrained=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr)
    for p in params:  # one step makes Adam's moments, as after the first training step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.train.lr_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return (
        {
            "epoch": 0,
            "step": 0,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        },
        parameter_count(model),
    )


def bench(path: str) -> dict:
    state, n_params = checkpoint_state(path)
    name = Path(path).stem
    start = time.perf_counter()
    _on_host(state)
    copy_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        file = Path(tmp) / "slot-0.pt"
        start = time.perf_counter()
        torch.save(state, file)
        save_s = time.perf_counter() - start
        with mlflow.start_run(run_name=f"bench checkpoint {name}"):
            start = time.perf_counter()
            mlflow.log_artifact(str(file), "checkpoints")
            upload_s = time.perf_counter() - start
        size_mb = file.stat().st_size / 2**20
    cfg = config.load(path)
    epochs = {machine: EPOCH_IMAGES * s for machine, s in SECONDS_PER_IMAGE.get(name, {}).items()}
    every = cfg.train.checkpoint_every
    return {
        "config": name,
        "parameters": n_params,
        "checkpoint_mb": round(size_mb, 1),
        "save_s": round(save_s, 2),
        "upload_s": round(upload_s, 2),
        "store": mlflow.get_tracking_uri(),
        "checkpoint_every": every,
        "epoch_s": {m: round(s, 1) for m, s in epochs.items()},
        # share of run time spent on checkpoints: saved every epoch, uploaded every `every`
        "share_every_epoch_upload": {
            m: round((save_s + upload_s) / (s + save_s + upload_s), 3) for m, s in epochs.items()
        },
        "share_with_cadence": {
            m: round((save_s + upload_s / every) / (s + save_s + upload_s / every), 3) for m, s in epochs.items()
        },
        # as landed: training waits for the host copy, and for a background write that outlasts an epoch
        "host_copy_s": round(copy_s, 2),
        "share_background": {
            m: round(_waited(copy_s, save_s, upload_s, every, s) / (s + _waited(copy_s, save_s, upload_s, every, s)), 3)
            for m, s in epochs.items()
        },
    }


def _waited(copy_s: float, save_s: float, upload_s: float, every: int, epoch_s: float) -> float:
    """Seconds per epoch the loop waits: the copy, plus what a write (and every `every`-th epoch an
    upload) takes beyond the next epoch's training."""
    return copy_s + (max(0, save_s - epoch_s) * (every - 1) + max(0, save_s + upload_s - epoch_s)) / every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--stack", type=Path, help="upload through this team stack (python -m detection stack up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        if args.stack:
            from detection.stack import Stack

            os.environ.update(Stack.load(args.stack).client_env())
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        else:
            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("bench-checkpoint")
        for path in args.configs:
            print(json.dumps(bench(path)), flush=True)


if __name__ == "__main__":
    main()
