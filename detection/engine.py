"""The training and validation loops: torchvision's model returns a loss dict in train mode and
detections in eval mode, so each loop is a dozen lines. Side effects (tracking, progress,
checkpoints) arrive as callbacks; nothing here knows about MLflow."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DetectionError
from .matching import Counts, box_centres, count_at, greedy_match
from .sampling import Patch, collate, to_float

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class NonFiniteLoss(DetectionError, RuntimeError):
    exit_code = 1  # the run itself failed, not its input
    advice = "the run is FAILED and keeps its last good checkpoint"

    def __init__(self, step: int, losses: dict[str, float]):
        self.step, self.losses = step, losses
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"loss is not finite at step {step} ({parts}); lower train.lr or check the data")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} needs CUDA, which is not available here (torch {torch.__version__}); use cpu or auto"
        )
    return torch.device(name)


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the card has it (no loss scaling needed), else fp16."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to_device(batch, device: torch.device):
    """(uint8 images, targets) from `collate` on the device, images as float in [0, 1]."""
    images, targets = batch
    asynchronous = device.type == "cuda"  # pinned host memory copies without blocking
    return (
        [to_float(i.to(device, non_blocking=asynchronous)) for i in images],
        [{k: v.to(device, non_blocking=asynchronous) for k, v in t.items()} for t in targets],
    )


@contextlib.contextmanager
def loss_mode(model: torch.nn.Module):
    """Train mode (so the model returns losses) with BatchNorm statistics left untouched."""
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield
    finally:
        model.train(was_training)


def train_one_epoch(
    model,
    optimizer,
    batches: Iterable,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    dtype: torch.dtype | None,
    first_step: int,
    on_step: Callable[[int, dict[str, float]], None],
) -> int:
    """One pass over the collated batches; calls on_step(step, {"loss": .., parts..}) and returns the
    next step. `dtype` is the autocast type (None: fp32); the scaler is enabled for fp16 only.

    A step's losses are read while the next step runs: reading them at once would stall a GPU every
    step. A non-finite loss is therefore raised one step late, always before the epoch's checkpoint."""
    model.train()
    step, pending = first_step, None
    for batch in batches:
        images, targets = _to_device(batch, device)
        with autocast(device, dtype):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        losses = _LossCopy(step, torch.stack([loss.detach(), *(loss_dict[k].detach() for k in LOSS_NAMES)]))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if pending:
            pending.report(on_step)
        pending, step = losses, step + 1
    if pending:
        pending.report(on_step)
    return step


class _LossCopy:
    """A step's losses copied to host memory without blocking; `report` waits for that copy only."""

    def __init__(self, step: int, values: torch.Tensor):
        self.step = step
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
            self.host.copy_(values.float(), non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = values.float(), None

    def report(self, on_step: Callable[[int, dict[str, float]], None]) -> None:
        if self.ready is not None:
            self.ready.synchronize()
        values = dict(zip(("loss", *LOSS_NAMES), self.host.tolist()))
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(self.step, values)
        on_step(self.step, values)


@dataclass(frozen=True)
class Validation:
    loss: float
    counts: Counts
    detections: list[dict[str, np.ndarray]]  # per patch, at the model's score threshold


@torch.inference_mode()
def validate(
    model,
    patches: list[Patch],
    device: torch.device,
    dtype: torch.dtype | None,
    radius: float,
    num_classes: int,
    on_patch: Callable[[], None] = lambda: None,
) -> Validation:
    """Mean loss and, at the model's own post-processing, the matched counts over all patches."""
    losses, counts, detections = [], Counts(0, 0, 0), []
    for patch in patches:
        images, targets = _to_device(collate([patch]), device)
        with loss_mode(model), autocast(device, dtype):
            losses.append(float(sum(model(images, targets).values())))
        model.eval()
        with autocast(device, dtype):
            out = model(images)[0]
        det = {k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in out.items()}
        detections.append(det)
        for label in range(1, num_classes):
            mine = det["labels"] == label
            cells = patch.points[patch.labels == label]
            tp = greedy_match(box_centres(det["boxes"][mine]), det["scores"][mine], cells, radius) >= 0
            counts = counts + count_at(det["scores"][mine], tp, len(cells), -math.inf)
        on_patch()
    return Validation(float(np.mean(losses)) if losses else math.nan, counts, detections)
