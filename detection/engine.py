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

from .matching import Counts, box_centres, count_at, greedy_match
from .sampling import Patch

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, losses: dict[str, float]):
        self.step, self.losses = step, losses
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"loss is not finite at step {step} ({parts}); lower train.lr or check the data")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return torch.device(name)


def _to_device(patches: list[Patch], device: torch.device):
    images, targets = zip(*(p.tensors() for p in patches))
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


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


def train_one_epoch(model, optimizer, batches: Iterable[list[Patch]], device: torch.device,
                    scaler: torch.amp.GradScaler, amp: bool, first_step: int,
                    on_step: Callable[[int, dict[str, float]], None]) -> int:
    """One pass over the batches; calls on_step(step, {"loss": .., parts..}) and returns the next step."""
    model.train()
    step = first_step
    for patches in batches:
        images, targets = _to_device(patches, device)
        with torch.autocast(device.type, enabled=amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        values = {"loss": loss.item()} | {k: v.item() for k, v in loss_dict.items()}
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(step, values)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        on_step(step, values)
        step += 1
    return step


@dataclass(frozen=True)
class Validation:
    loss: float
    counts: Counts
    detections: list[dict[str, np.ndarray]]  # per patch, at the model's score threshold


@torch.no_grad()
def validate(model, patches: list[Patch], device: torch.device, amp: bool, radius: float,
             num_classes: int, on_patch: Callable[[], None] = lambda: None) -> Validation:
    """Mean loss and, at the model's own post-processing, the matched counts over all patches."""
    losses, counts, detections = [], Counts(0, 0, 0), []
    for patch in patches:
        images, targets = _to_device([patch], device)
        with loss_mode(model), torch.autocast(device.type, enabled=amp):
            losses.append(float(sum(model(images, targets).values())))
        model.eval()
        with torch.autocast(device.type, enabled=amp):
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
