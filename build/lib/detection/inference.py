"""One raw inference pass over the evaluated images, saved as a cache that every metric replays.

Items are what the model sees: `paper` draws 10 random patches per image (fixed seed), `whole`
takes whole images. A whole image larger than the training patch is tiled, so cells keep the
scale the model was trained at: tiles overlap by twice the box size, and each detection belongs
to the one tile whose core holds its centre, so no cell on a border is lost or counted twice.

Cache schema (`predictions.npz`, numpy arrays; row i of `det_*` is one raw detection):
  items_name (N,) str, items_origin (N, 2) int x/y of the item in its image, items_size (N, 2) int h/w
  det_item (D,) int32 item index, det_boxes (D, 4) float32 x1y1x2y2 in item pixels,
  det_scores (D,) float32, det_labels (D,) int64 (1-based class), sorted by item then descending score
  gt_item (G,) int32, gt_points (G, 2) float32 x/y in item pixels, gt_labels (G,) int64
  meta: a JSON string (model URI, name, version, training run, protocol, split, seed, classes,
        box_size, match radius, the model's own post-processing, image SHA-256s, schema version)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import Sample, points_to_boxes, targets
from .postprocess import raw_outputs
from .sampling import random_patch

SCHEMA_VERSION = 1
PAPER_PATCHES = 10


@dataclass(frozen=True)
class Item:
    name: str
    origin: tuple[int, int]
    image: np.ndarray
    points: np.ndarray
    labels: np.ndarray


@dataclass
class Cache:
    items_name: np.ndarray
    items_origin: np.ndarray
    items_size: np.ndarray
    det_item: np.ndarray
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray
    gt_item: np.ndarray
    gt_points: np.ndarray
    gt_labels: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items_name)

    def detections(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = np.searchsorted(self.det_item, [i, i + 1])
        return self.det_boxes[lo:hi], self.det_scores[lo:hi], self.det_labels[lo:hi]

    def ground_truth(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points, labels and the boxes drawn around the points (as in training) of item i."""
        lo, hi = np.searchsorted(self.gt_item, [i, i + 1])
        h, w = self.items_size[i]
        pts = self.gt_points[lo:hi]
        return pts, self.gt_labels[lo:hi], points_to_boxes(pts, self.meta["box_size"], int(w), int(h))

    def save(self, path: str | Path) -> Path:
        arrays = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "meta"}
        np.savez_compressed(path, meta=np.array(json.dumps(self.meta | {"schema_version": SCHEMA_VERSION})), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Cache:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"{path}: cache schema {meta.get('schema_version')} is not {SCHEMA_VERSION}")
            return cls(**{k: z[k] for k in cls.__dataclass_fields__ if k != "meta"}, meta=meta)


def paper_items(samples: list[Sample], cfg: Config, seed: int) -> list[Item]:
    items = []
    for i, s in enumerate(samples):
        rng = np.random.default_rng([seed, 20_000 + i])
        image = s.read_image()
        for _ in range(PAPER_PATCHES):
            p = random_patch(s, image, cfg.data, rng, allow_flip=False)
            items.append(Item(s.name, p.origin, p.image, p.points, p.labels))
    return items


def whole_items(samples: list[Sample], cfg: Config) -> list[Item]:
    items = []
    for s in samples:
        points, labels = targets(s, cfg.data.classes)
        items.append(Item(s.name, (0, 0), s.read_image(), points.astype(np.float32), labels))
    return items


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile origins covering `length`, neighbours overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    n = int(np.ceil((length - overlap) / (tile - overlap)))
    return [int(round(x)) for x in np.linspace(0, length - tile, n)]


def _core_bounds(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """Each tile owns the span up to the middle of its overlaps with its neighbours."""
    cuts = [(starts[i] + tile + starts[i + 1]) / 2 for i in range(len(starts) - 1)]
    edges = [0.0] + cuts + [float(length)]
    return [(edges[i], edges[i + 1]) for i in range(len(starts))]


@torch.no_grad()
def _run(model, image: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0).to(device)
    out = model([tensor])[0]
    return out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy(), out["labels"].cpu().numpy()


def detect_tiled(model, image: np.ndarray, tile_hw: tuple[int, int], overlap: int, device: torch.device):
    """Detections of `model` on an image of any size, run tile by tile at the training scale."""
    h, w = image.shape[:2]
    th, tw = min(tile_hw[0], h), min(tile_hw[1], w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    y_core, x_core = _core_bounds(ys, th, h), _core_bounds(xs, tw, w)
    boxes, scores, labels = [], [], []
    for y0, (ylo, yhi) in zip(ys, y_core):
        for x0, (xlo, xhi) in zip(xs, x_core):
            b, s, lab = _run(model, image[y0:y0 + th, x0:x0 + tw], device)
            b = b + np.array([x0, y0, x0, y0], dtype=np.float32)
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            mine = (cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
            boxes.append(b[mine]), scores.append(s[mine]), labels.append(lab[mine])
    b, s, lab = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    order = np.argsort(-s, kind="stable")
    return b[order], s[order], lab[order]


def raw_inference(model, items: list[Item], cfg: Config, device: torch.device, on_item=lambda: None) -> Cache:
    """Every candidate box of every item, with score threshold 0, NMS off and no top-k cut."""
    overlap = 2 * cfg.data.box_size
    det, gt = [], []
    model.eval().to(device)
    with raw_outputs(model):
        for i, item in enumerate(items):
            b, s, lab = detect_tiled(model, item.image, cfg.data.patch_size, overlap, device)
            det.append((np.full(len(s), i, np.int32), b.astype(np.float32), s.astype(np.float32), lab.astype(np.int64)))
            gt.append((np.full(len(item.points), i, np.int32), item.points.astype(np.float32), item.labels.astype(np.int64)))
            on_item()
    cat = lambda parts, k, shape: np.concatenate([p[k] for p in parts]) if parts else np.zeros(shape)  # noqa: E731
    return Cache(
        items_name=np.array([it.name for it in items]),
        items_origin=np.array([it.origin for it in items], dtype=np.int64).reshape(-1, 2),
        items_size=np.array([it.image.shape[:2] for it in items], dtype=np.int64).reshape(-1, 2),
        det_item=cat(det, 0, (0,)).astype(np.int32), det_boxes=cat(det, 1, (0, 4)).astype(np.float32),
        det_scores=cat(det, 2, (0,)).astype(np.float32), det_labels=cat(det, 3, (0,)).astype(np.int64),
        gt_item=cat(gt, 0, (0,)).astype(np.int32), gt_points=cat(gt, 1, (0, 2)).astype(np.float32),
        gt_labels=cat(gt, 2, (0,)).astype(np.int64),
    )
