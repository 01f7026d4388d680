"""The second look's network alone: ResNet-18 on a square crop centred on each detection, its
probability that the crop is a tumour cell, and the score fusion the paper describes. The served
model loads it (predict.py); the stage that runs it over caches is second_look.py and its training
second_look_train.py."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

from .inference import Runtime
from .sampling import chw

# Per-channel statistics of the shared sample's training split (as smoke.yaml's image_mean/std):
# crops are normalised the same way whatever the detector's config uses.
CROP_MEAN = (0.798, 0.719, 0.849)
CROP_STD = (0.149, 0.179, 0.112)
BATCH = 256  # crops per inference pass


def build_classifier() -> torch.nn.Module:
    """ResNet-18 from scratch with one logit: P(tumour cell | crop)."""
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=1)


def crops(image: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8 squares of an RGB uint8 (H, W, 3) image centred on each box's centre
    (boxes (N, 4) x1, y1, x2, y2 in image pixels), zero more than a pixel outside the image:
    roi_align with one sample per output pixel, so a crop is the image's own pixels when the centre
    has integer coordinates, and bilinear between them otherwise."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    centres = torch.from_numpy((boxes[:, :2] + boxes[:, 2:]) / 2)
    rois = torch.cat([torch.zeros(len(boxes), 1), centres - size / 2, centres + size / 2], 1)
    img = chw(image)[None].float()
    out = [
        roi_align(img, rois[k : k + BATCH], output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
        for k in range(0, len(rois), BATCH)
    ]
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def normalise(batch: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    x = F.to_dtype(batch, torch.float32, scale=True)
    return F.normalize(x, CROP_MEAN, CROP_STD)


def probabilities(net: torch.nn.Module, image: np.ndarray, boxes: np.ndarray, size: int, rt: Runtime) -> np.ndarray:
    """(N,) float32: the classifier's probability that each box's crop is a tumour cell."""
    patches = crops(image, boxes, size)
    out = []
    with torch.inference_mode(), torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype is not None):
        for k in range(0, len(patches), BATCH):
            x = normalise(patches[k : k + BATCH].to(rt.device))
            out.append(torch.sigmoid(net(x).float()[:, 0]).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def fused_score(scores: np.ndarray, probs: np.ndarray, weight: float) -> np.ndarray:
    return ((1.0 - weight) * np.asarray(scores, np.float64) + weight * np.asarray(probs, np.float64)).astype(np.float32)
