"""One raw inference pass over the evaluated images, saved as a cache that every metric replays.

Items are what is evaluated: `whole` (the default) takes whole images, so every annotated cell is
counted exactly once; `paper` draws 10 random patches per image, seeded by the image's name, as the
paper did (a cell then counts once per patch that holds it). A whole image larger than the training
patch is tiled so that cells keep the scale the model was trained at: tiles overlap by twice the box
size, each detection belongs to the one tile whose core holds its centre, and a cell found by two
tiles across a cut is merged by point distance (`postprocess.keep`).

Cache schema 3 (`predictions.npz`, numpy arrays):
  items_name (N,) str; items_origin (N, 2) int x/y of the item in its image; items_size (N, 2) int h/w;
  items_image_size (N, 2) int h/w of the image it was cut from
  tiles_item (T,) int32; tiles_origin (T, 2) int x/y in item pixels; tiles_core (T, 4) float x_lo,
  y_lo, x_hi, y_hi in item pixels (+-inf at the item's edges)
  det_tile (D,) int32, sorted by tile, then in canonical order (score descending, then label and box);
  det_boxes (D, 4) float32 x1y1x2y2 in item pixels; det_nms_boxes (D, 4) float32 the same boxes in the
  model's resized pixels (what its NMS saw); det_scores (D,) float32; det_labels (D,) int64 (1-based class)
  gt_item (G,) int32; gt_points (G, 2) float32 x/y in item pixels; gt_labels (G,) int64
  meta: a JSON string (model URI, name, version, training run, protocol, split, seed, classes,
        box_size, mpp (micrometres per pixel), match radius in px and um, border band, device,
        precision, the model's own post-processing, distinct cells, image pixel hashes, schema version)
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import MICRONS_PER_PIXEL, Config
from .data import Sample, points_to_boxes, targets
from .engine import PRECISION_NAMES, autocast, autocast_dtype, pick_device
from .postprocess import Tiles, canonical_order, raw_outputs
from .sampling import chw, name_seed, random_patch, to_float

SCHEMA_VERSION = 3
PAPER_PATCHES = 10


@dataclass(frozen=True)
class Item:
    """One evaluated unit: a whole image, or one of the paper protocol's patches."""

    name: str  # the image's name, Case_N-MM
    origin: tuple[int, int]  # (x, y) px of the item's top-left corner in its image
    image: np.ndarray  # (h, w, 3) uint8 RGB
    points: np.ndarray  # (P, 2) float32 x/y px of the annotated cells, in item pixels
    labels: np.ndarray  # (P,) int64 class of each cell, 1-based (0 is background)
    image_size: tuple[int, int]  # (h, w) of the image the item was cut from


@dataclass
class Cache:
    """Every raw detection of I items cut into T model inputs (tiles), and the items' ground truth,
    as flat arrays: what `evaluate` saves as predictions.npz and tune and compare replay. D raw
    detections are sorted by tile, then by descending score; G is the number of annotated cells.
    Coordinates are item pixels unless said otherwise."""

    items_name: np.ndarray  # (I,) str
    items_origin: np.ndarray  # (I, 2) int64 x/y px of each item in its image
    items_size: np.ndarray  # (I, 2) int64 h/w px
    items_image_size: np.ndarray  # (I, 2) int64 h/w px of the whole image
    tiles_item: np.ndarray  # (T,) int32 the item of each tile
    tiles_origin: np.ndarray  # (T, 2) int64 x/y px of each tile in its item
    tiles_core: np.ndarray  # (T, 4) float64 x1y1x2y2 px: the part of the item the tile owns
    det_tile: np.ndarray  # (D,) int32 the tile of each detection
    det_boxes: np.ndarray  # (D, 4) float32 x1y1x2y2 px
    det_nms_boxes: np.ndarray  # (D, 4) float32 the same boxes in the model's resized pixels (what its NMS saw)
    det_scores: np.ndarray  # (D,) float32 in [0, 1]
    det_labels: np.ndarray  # (D,) int64, 1-based
    gt_item: np.ndarray  # (G,) int the item of each cell
    gt_points: np.ndarray  # (G, 2) float32 x/y px
    gt_labels: np.ndarray  # (G,) int64, 1-based
    meta: dict = field(default_factory=dict)  # model, post-processing, split, protocol: what made it

    def __len__(self) -> int:
        return len(self.items_name)

    @property
    def mpp(self) -> float:
        """Micrometres per pixel of the evaluated images."""
        return float(self.meta.get("mpp", MICRONS_PER_PIXEL))

    @property
    def n_classes(self) -> int:
        """Foreground classes: those the model was trained on, or as many as the labels name."""
        labels = np.concatenate([self.gt_labels, self.det_labels, [0]])
        return max(len(self.meta.get("classes", ())), int(labels.max()), 1)

    def _tile_range(self, i: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(self.tiles_item, [i, i + 1])
        return int(lo), int(hi)

    def det_range(self, i: int) -> tuple[int, int]:
        """Item i's detections are det_*[lo:hi]."""
        t0, t1 = self._tile_range(i)
        lo, hi = np.searchsorted(self.det_tile, [t0, t1])
        return int(lo), int(hi)

    def tiles(self, i: int) -> Tiles:
        """Item i's raw detections tile by tile; their indices are offsets from det_range(i)[0]."""
        t0, t1 = self._tile_range(i)
        lo, hi = self.det_range(i)
        return Tiles(
            self.tiles_origin[t0:t1],
            self.tiles_core[t0:t1],
            self.det_tile[lo:hi] - t0,
            self.det_boxes[lo:hi],
            self.det_nms_boxes[lo:hi],
            self.det_scores[lo:hi],
            self.det_labels[lo:hi],
        )

    def ground_truth(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points, labels and the boxes drawn around the points (as in training) of item i."""
        lo, hi = np.searchsorted(self.gt_item, [i, i + 1])
        h, w = self.items_size[i]
        pts = self.gt_points[lo:hi]
        return pts, self.gt_labels[lo:hi], points_to_boxes(pts, self.meta["box_size"], int(w), int(h))

    def in_band(self, i: int, points: np.ndarray) -> np.ndarray:
        """(P,) bool: points of item i within `border_band` px of an item edge that is not an image
        edge. There a cell may be cut off, so such cells and detections count neither way."""
        band = float(self.meta.get("border_band", 0.0))
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if band <= 0:
            return np.zeros(len(points), bool)
        (x0, y0), (h, w), (ih, iw) = self.items_origin[i], self.items_size[i], self.items_image_size[i]
        x, y = points[:, 0], points[:, 1]
        return (
            ((x0 > 0) & (x < band))
            | ((y0 > 0) & (y < band))
            | ((x0 + w < iw) & (x > w - band))
            | ((y0 + h < ih) & (y > h - band))
        )

    def save(self, path: str | Path) -> Path:
        arrays = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "meta"}
        np.savez_compressed(path, meta=np.array(json.dumps(self.meta | {"schema_version": SCHEMA_VERSION})), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Cache:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(
                    f"{path}: cache schema {meta.get('schema_version')} is not {SCHEMA_VERSION}; "
                    f"evaluate the model again to make a current one"
                )
            return cls(**{k: z[k] for k in cls.__dataclass_fields__ if k != "meta"}, meta=meta)


def paper_items(samples: list[Sample], cfg: Config, seed: int) -> list[Item]:
    """10 random patches per image, drawn from the seed and the image's name (not its position in
    the list), so an image gets the same patches under split=all and split=test."""
    items = []
    for s in samples:
        rng = np.random.default_rng([seed, name_seed(s.name), 20_000])
        image = s.read_image()
        for _ in range(PAPER_PATCHES):
            p = random_patch(s, image, cfg.data, rng, allow_flip=False)
            items.append(Item(s.name, p.origin, p.image, p.points, p.labels, image.shape[:2]))
    return items


def whole_items(samples: list[Sample], cfg: Config) -> list[Item]:
    """Each image whole, with every annotated cell of the configured classes: each cell counted once."""
    items = []
    for s in samples:
        points, labels = targets(s, cfg.data.classes)
        image = s.read_image()
        items.append(Item(s.name, (0, 0), image, points.astype(np.float32), labels, image.shape[:2]))
    return items


def cell_coverage(samples: list[Sample], items: list[Item], classes: tuple[str, ...]) -> tuple[int, int]:
    """Distinct annotated cells of the evaluated images, and how many of them lie in no item."""
    cells = uncovered = 0
    for s in samples:
        points, _ = targets(s, classes)
        covered = np.zeros(len(points), bool)
        for it in (it for it in items if it.name == s.name):
            (x0, y0), (h, w) = it.origin, it.image.shape[:2]
            covered |= (points[:, 0] >= x0) & (points[:, 0] < x0 + w) & (points[:, 1] >= y0) & (points[:, 1] < y0 + h)
        cells += len(points)
        uncovered += int((~covered).sum())
    return cells, uncovered


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile origins covering `length`, neighbours overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    n = int(np.ceil((length - overlap) / (tile - overlap)))
    return [int(round(x)) for x in np.linspace(0, length - tile, n)]


def core_bounds(starts: list[int], tile: int) -> list[tuple[float, float]]:
    """Each tile owns the span up to the middle of its overlaps with its neighbours."""
    cuts = [(starts[i] + tile + starts[i + 1]) / 2 for i in range(len(starts) - 1)]
    edges = [-np.inf] + cuts + [np.inf]
    return [(edges[i], edges[i + 1]) for i in range(len(starts))]


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and how tiles run. On CUDA: autocast (bf16, or fp16 where bf16 is missing) and `batch`
    tiles per forward pass, which bounds memory. On a CPU: fp32 by default (bf16 on request), and
    `workers` tiles side by side, because torchvision's CPU roi_align runs on one core.
    Chosen by arguments, else $BRECAHAD_DEVICE (auto|cpu|cuda|cuda:N), $BRECAHAD_PRECISION
    (auto|fp32|bf16|fp16) and $BRECAHAD_TILE_BATCH."""

    device: torch.device
    dtype: torch.dtype | None = None
    batch: int = 1
    workers: int = 1

    @classmethod
    def choose(cls, device: str | None = None, precision: str | None = None, batch: int | None = None) -> Runtime:
        dev = pick_device(device or os.environ.get("BRECAHAD_DEVICE") or "auto")
        precision = precision or os.environ.get("BRECAHAD_PRECISION") or "auto"
        if precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}")
        if precision == "auto":
            dtype = autocast_dtype(dev, True)
        elif precision == "fp16" and dev.type == "cpu":
            raise ValueError("precision fp16 needs CUDA; on a CPU use bf16 or fp32")
        else:
            dtype = PRECISIONS[precision]
        batch = int(batch or os.environ.get("BRECAHAD_TILE_BATCH") or (9 if dev.type == "cuda" else 1))
        if batch < 1:
            raise ValueError(f"tile batch {batch} must be >= 1")
        workers = 1 if dev.type == "cuda" else max(1, min(4, torch.get_num_threads()))
        return cls(dev, dtype, batch, workers)

    def describe(self) -> dict[str, str | int]:
        return {
            "device": str(self.device),
            "precision": PRECISION_NAMES[self.dtype],
            "tile_batch": self.batch,
            "tile_workers": self.workers,
        }

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.eval().to(self.device, memory_format=torch.channels_last)


def _forward(model, tensors: list[torch.Tensor]) -> list[tuple[np.ndarray, ...]]:
    """GeneralizedRCNN.forward in eval mode, step by step, to keep the boxes in the model's resized
    pixels (what its NMS saw) beside those in input pixels. No hook: tiles may run in threads."""
    sizes = [tuple(t.shape[-2:]) for t in tensors]
    images, _ = model.transform(tensors)
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    resized = [d["boxes"] for d in detections]
    detections = model.transform.postprocess(detections, images.image_sizes, sizes)
    return [
        (
            d["boxes"].float().cpu().numpy(),
            r.float().cpu().numpy(),
            d["scores"].float().cpu().numpy(),
            d["labels"].cpu().numpy(),
        )
        for d, r in zip(detections, resized)
    ]


def _run_tiles(model, crops: list[np.ndarray], rt: Runtime) -> list[tuple[np.ndarray, ...]]:
    """`_forward` over (h, w, 3) uint8 crops, `rt.batch` per pass, in `rt.workers` threads on a CPU."""

    def run(chunk: list[np.ndarray]):
        with torch.inference_mode(), autocast(rt.device, rt.dtype):
            tensors = [to_float(chw(c).to(rt.device)) for c in chunk]  # uint8 to the device: 1/4 the bytes
            return _forward(model, tensors)

    chunks = [crops[i : i + rt.batch] for i in range(0, len(crops), rt.batch)]
    if rt.workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(rt.workers) as pool:
            return [out for outs in pool.map(run, chunks) for out in outs]
    return [out for chunk in chunks for out in run(chunk)]


def detect_tiles(model, image: np.ndarray, tile_hw: tuple[int, int], overlap: int, rt: Runtime) -> Tiles:
    """Every raw detection of `model` (set to raw outputs, placed by `rt`) on an (H, W, 3) uint8
    image of any size, cut into tiles of `tile_hw` px (the training patch) that overlap by at least
    `overlap` px. Boxes come back in image pixels, sorted by tile, then in canonical order (score
    descending)."""
    h, w = image.shape[:2]
    th, tw = min(tile_hw[0], h), min(tile_hw[1], w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    starts = [(x0, y0) for y0 in ys for x0 in xs]
    cores = [(xlo, ylo, xhi, yhi) for ylo, yhi in core_bounds(ys, th) for xlo, xhi in core_bounds(xs, tw)]
    outputs = _run_tiles(model, [image[y0 : y0 + th, x0 : x0 + tw] for x0, y0 in starts], rt)
    parts = []
    for k, ((x0, y0), (boxes, nms_boxes, scores, labels)) in enumerate(zip(starts, outputs)):
        order = canonical_order(nms_boxes, scores, labels)  # what the replay's prefixes assume
        shift = np.array([x0, y0, x0, y0], np.float32)
        parts.append(
            (np.full(len(scores), k, np.int32), boxes[order] + shift, nms_boxes[order], scores[order], labels[order])
        )
    tile, boxes, nms_boxes, scores, labels = (np.concatenate(p) for p in zip(*parts))
    return Tiles(
        np.array(starts, np.int64),
        np.array(cores, np.float64),
        tile,
        boxes.astype(np.float32),
        nms_boxes.astype(np.float32),
        scores.astype(np.float32),
        labels.astype(np.int64),
    )


def tile_overlap(data) -> int:
    """px by which neighbouring tiles (and a slide's regions) overlap: two boxes, so a cell on a cut
    is whole in one of them."""
    return 2 * data.box_size


def raw_inference(model, items: list[Item], cfg: Config, rt: Runtime, on_item=lambda: None) -> Cache:
    """Every candidate box of every item, with score threshold 0, NMS off and no top-k cut."""
    overlap = tile_overlap(cfg.data)
    tiles = []
    rt.place(model)
    with raw_outputs(model):
        for item in items:
            tiles.append(detect_tiles(model, item.image, cfg.data.patch_size, overlap, rt))
            on_item()
    n_tiles = np.cumsum([0] + [len(t.origin) for t in tiles])

    def cat(arrays, dtype, shape):
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

    return Cache(
        items_name=np.array([it.name for it in items]),
        items_origin=np.array([it.origin for it in items], dtype=np.int64).reshape(-1, 2),
        items_size=np.array([it.image.shape[:2] for it in items], dtype=np.int64).reshape(-1, 2),
        items_image_size=np.array([it.image_size for it in items], dtype=np.int64).reshape(-1, 2),
        tiles_item=cat([np.full(len(t.origin), i) for i, t in enumerate(tiles)], np.int32, (0,)),
        tiles_origin=cat([t.origin for t in tiles], np.int64, (0, 2)),
        tiles_core=cat([t.core for t in tiles], np.float64, (0, 4)),
        det_tile=cat([t.tile + n for t, n in zip(tiles, n_tiles)], np.int32, (0,)),
        det_boxes=cat([t.boxes for t in tiles], np.float32, (0, 4)),
        det_nms_boxes=cat([t.nms_boxes for t in tiles], np.float32, (0, 4)),
        det_scores=cat([t.scores for t in tiles], np.float32, (0,)),
        det_labels=cat([t.labels for t in tiles], np.int64, (0,)),
        gt_item=cat([np.full(len(it.points), i) for i, it in enumerate(items)], np.int32, (0,)),
        gt_points=cat([it.points for it in items], np.float32, (0, 2)),
        gt_labels=cat([it.labels for it in items], np.int64, (0,)),
    )
