"""Patches as the paper sampled them.

Training: each epoch, one random patch (512x680 by default) per image with a random horizontal
flip; the model's transform then upsamples it to 1024x1360. Validation: a fixed set of patches
per image, drawn from the same seed every epoch so that epochs compare.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as F

from .config import DataConfig
from .data import Sample, points_to_boxes, targets


def name_seed(name: str) -> int:
    """A stable seed from an image's name: its patches do not depend on which other images are listed."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Patch:
    """A crop of one image: pixels (H, W, 3) uint8 with its points, boxes and labels in patch pixels."""

    name: str
    origin: tuple[int, int]  # (x, y) of the patch's top-left corner in the image
    image: np.ndarray
    points: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    def tensors(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image as a float CHW tensor in [0, 1] and its targets, as torchvision's detectors take them."""
        image, target = self.uint8_tensors()
        return to_float(image), target

    def uint8_tensors(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CHW uint8 (a quarter of the float bytes to pin and copy); `to_float` on the device."""
        return chw(self.image), {"boxes": torch.from_numpy(self.boxes), "labels": torch.from_numpy(self.labels)}


def chw(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as a (3, H, W) uint8 tensor: torchvision's `to_image`, as a plain tensor.
    A flipped view (negative strides, which torch cannot wrap) is copied first."""
    return F.to_image(np.ascontiguousarray(image)).as_subclass(torch.Tensor)


def to_float(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(3, H, W) uint8 pixels, or an (H, W, 3) array, as (3, H, W) float32 in [0, 1]."""
    if isinstance(image, np.ndarray):
        image = chw(image)
    return F.to_dtype(image, torch.float32, scale=True)


def crop(sample: Sample, image: np.ndarray, cfg: DataConfig, x0: int, y0: int, flip: bool) -> Patch:
    h, w = min(cfg.patch_size[0], image.shape[0]), min(cfg.patch_size[1], image.shape[1])
    pixels = image[y0 : y0 + h, x0 : x0 + w]
    points, labels = targets(sample, cfg.classes)
    inside = (points[:, 0] >= x0) & (points[:, 0] < x0 + w) & (points[:, 1] >= y0) & (points[:, 1] < y0 + h)
    points, labels = points[inside] - np.array([x0, y0]), labels[inside]
    if flip:
        pixels = pixels[:, ::-1]
        points = np.column_stack([w - points[:, 0], points[:, 1]]) if len(points) else points
    boxes = points_to_boxes(points, cfg.box_size, w, h)
    return Patch(sample.name, (x0, y0), pixels, points.astype(np.float32), boxes, labels)


def random_patch(
    sample: Sample, image: np.ndarray, cfg: DataConfig, rng: np.random.Generator, allow_flip: bool
) -> Patch:
    h, w = image.shape[:2]
    y0 = int(rng.integers(0, max(1, h - cfg.patch_size[0] + 1)))
    x0 = int(rng.integers(0, max(1, w - cfg.patch_size[1] + 1)))
    flip = bool(allow_flip and rng.random() < 0.5)
    return crop(sample, image, cfg, x0, y0, flip)


class TrainPatches(torch.utils.data.Dataset):
    """One random patch per image per epoch, drawn from (seed, epoch, image) so a resumed run draws
    the same. Indexed by (epoch, image) pairs from `EpochOrder`, so persistent loader workers need
    no message when the epoch changes. Images are decoded once (a TIFF decode costs more than the
    crop); worker processes share them copy-on-write."""

    def __init__(self, samples: list[Sample], cfg: DataConfig, seed: int):
        self.samples, self.cfg, self.seed = samples, cfg, seed
        self.images = [s.read_image() for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Patch:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        patch = random_patch(self.samples[i], self.images[i], self.cfg, rng, self.cfg.hflip)
        if self.cfg.stain_jitter > 0:
            patch = replace(patch, image=stain_jitter(patch.image, self.cfg.stain_jitter, rng))
        return patch


def stain_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """HED colour augmentation (Tellez et al. 2018): scale and shift each stain's optical density
    by U(1-s, 1+s) and U(-s, s), so a model sees the stain variation between labs and scanners.
    Pixels stay uint8 RGB; the geometry, and so every box, is untouched. scikit-image's stain matrices,
    without the clipping of its rgb2hed (which would shift colours even at zero strength)."""
    density = -np.log(np.maximum(image.astype(np.float64), 1.0) / 255.0)  # optical density per channel
    hed = density.reshape(-1, 3) @ hed_from_rgb
    alpha = rng.uniform(1 - strength, 1 + strength, size=3)
    beta = rng.uniform(-strength, strength, size=3)
    rgb = 255.0 * np.exp(-(hed * alpha + beta) @ rgb_from_hed)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(image.shape)


class EpochOrder(torch.utils.data.Sampler):
    """A fresh shuffle per epoch from (seed, epoch), yielding (epoch, image) keys."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter([(self.epoch, int(i)) for i in torch.randperm(self.n, generator=order)])


def validation_patches(samples: list[Sample], cfg: DataConfig, seed: int, per_image: int) -> list[Patch]:
    """The same `per_image` patches of each image for a given seed, unflipped."""
    patches = []
    for sample in samples:
        rng = np.random.default_rng([seed, name_seed(sample.name), 10_000])
        image = sample.read_image()
        patches.extend(random_patch(sample, image, cfg, rng, allow_flip=False) for _ in range(per_image))
    return patches


def collate(batch: list[Patch]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """uint8 images and targets as tensors, so the loader can pin them for an asynchronous copy."""
    images, targets = zip(*(p.uint8_tensors() for p in batch))
    return list(images), list(targets)
