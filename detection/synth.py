"""H&E-looking synthetic images in BreCaHAD's layout: the offline demo and test data.

Pink fibrous stroma, white lumen, and two kinds of purple nuclei that a detector can tell apart:
tumour nuclei are large, pale and vesicular with a dark rim and nucleolus, clustered in nests;
non-tumour nuclei (lymphocytes, fibroblasts) are small, dark and often elongated, scattered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from .config import BRECAHAD_CLASSES
from .data import IMAGE_SHAPE

STROMA = np.array([0.93, 0.66, 0.80])
LUMEN = np.array([0.96, 0.95, 0.97])
CYTOPLASM = np.array([0.86, 0.74, 0.88])
TUMOUR = np.array([0.50, 0.44, 0.66])
NON_TUMOUR = np.array([0.26, 0.17, 0.42])


def _stroma(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    fibres = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=(1.0, 6.0))
    patches = ndimage.gaussian_filter(rng.standard_normal((h // 8, w // 8)), sigma=4)
    patches = ndimage.zoom(patches, 8, order=1)[:h, :w]
    shade = (
        1.0
        + 0.9 * fibres[..., None] * np.array([0.03, 0.06, 0.04])
        + 2.0 * patches[..., None] * np.array([0.02, 0.05, 0.03])
    )
    return np.clip(STROMA * shade, 0, 1)


def _blob(rng: np.random.Generator, radius_x: float, radius_y: float, roughness: float) -> np.ndarray:
    """A soft-edged, rotated, irregular ellipse mask in a square window."""
    r = int(np.ceil(max(radius_x, radius_y) * (1 + roughness))) + 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    theta = np.arctan2(v, u)
    wobble = (
        1 + roughness * sum(rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)) / 3
    )
    dist = np.sqrt((u / radius_x) ** 2 + (v / radius_y) ** 2) / wobble
    return np.clip((1.0 - dist) * 4.0, 0.0, 1.0)


def _paint(
    img: np.ndarray, mask: np.ndarray, colour: np.ndarray, cx: float, cy: float, texture: np.ndarray | None = None
) -> None:
    """Blend `colour` into `img` under `mask` centred at (cx, cy); `texture` (img-sized) mottles it."""
    r = mask.shape[0] // 2
    x, y = int(round(cx)), int(round(cy))
    y0, y1, x0, x1 = max(0, y - r), min(img.shape[0], y + r + 1), max(0, x - r), min(img.shape[1], x + r + 1)
    m = mask[y0 - (y - r) : y1 - (y - r), x0 - (x - r) : x1 - (x - r)]
    region = img[y0:y1, x0:x1]
    paint = colour if texture is None else colour * (1 + texture[y0:y1, x0:x1])
    region[:] = region * (1 - m[..., None]) + paint * m[..., None]


def _place(rng, centres: list[np.ndarray], candidates: np.ndarray, min_dist: float, lumen) -> list[np.ndarray]:
    kept = []
    for c in candidates:
        if any(np.hypot(*(c - hole[:2])) < hole[2] + min_dist for hole in lumen):
            continue
        if all(np.hypot(*(c - o)) >= min_dist for o in centres + kept):
            kept.append(c)
    return kept


def synth_image(
    rng: np.random.Generator, h: int = IMAGE_SHAPE[0], w: int = IMAGE_SHAPE[1]
) -> tuple[np.ndarray, dict[str, list]]:
    img = _stroma(rng, h, w)
    lumen = [
        np.array([rng.uniform(100, w - 100), rng.uniform(100, h - 100), rng.uniform(40, 90)])
        for _ in range(rng.integers(1, 4))
    ]
    for lx, ly, lr in lumen:
        _paint(img, _blob(rng, lr, lr * rng.uniform(0.6, 1.0), 0.25), LUMEN, lx, ly)

    nests = [np.array([rng.uniform(150, w - 150), rng.uniform(150, h - 150)]) for _ in range(rng.integers(2, 5))]
    candidates = np.concatenate([n + rng.normal(0, rng.uniform(90, 160), size=(80, 2)) for n in nests])
    candidates = candidates[
        (candidates[:, 0] > 8) & (candidates[:, 0] < w - 8) & (candidates[:, 1] > 8) & (candidates[:, 1] < h - 8)
    ]
    tumour = _place(rng, [], candidates, 30.0, lumen)
    scattered = rng.uniform([8, 8], [w - 8, h - 8], size=(int(rng.integers(40, 90)), 2))
    non_tumour = _place(rng, tumour, scattered, 22.0, lumen)

    grain = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.2)[..., None]
    chromatin = 0.6 * grain
    for cx, cy in tumour:
        _paint(img, _blob(rng, 24, 20, 0.3), CYTOPLASM, cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4))
    for cx, cy in tumour:
        rx = rng.uniform(11, 15)
        _paint(
            img, _blob(rng, rx, rx * rng.uniform(0.75, 1.0), 0.15), TUMOUR * rng.uniform(0.9, 1.1), cx, cy, chromatin
        )
        _paint(
            img, _blob(rng, rx * 0.2, rx * 0.2, 0.0), NON_TUMOUR * 0.8, cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
        )
    for cx, cy in non_tumour:
        rx = rng.uniform(4, 7)
        _paint(img, _blob(rng, rx * rng.uniform(1.0, 2.2), rx, 0.1), NON_TUMOUR * rng.uniform(0.85, 1.1), cx, cy)
    img = np.clip(img * (1 + 0.06 * grain), 0, 1)

    def norm(points):
        return [{"x": float(x / w), "y": float(y / h)} for x, y in points]

    labels = {k: [] for k in BRECAHAD_CLASSES}
    labels["tumor"], labels["non_tumor"] = norm(tumour), norm(non_tumour)
    labels["lumen"] = norm([(lx, ly) for lx, ly, _ in lumen])
    return (img * 255).round().astype(np.uint8), labels


def write_dataset(out_dir: str | Path, images: int, seed: int, per_case: int = 4, on_image=lambda: None) -> list[Path]:
    """Write `images` synthetic images, `per_case` per case, as images/*.tif and groundTruth/*.json."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "groundTruth").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(images):
        name = f"Case_{i // per_case + 1}-{i % per_case + 1:02d}"
        img, labels = synth_image(np.random.default_rng([seed, i]))
        tifffile.imwrite(out / "images" / f"{name}.tif", img, photometric="rgb")
        (out / "groundTruth" / f"{name}.json").write_text(json.dumps(labels))
        written.append(out / "images" / f"{name}.tif")
        on_image()
    return written


def mosaic(fields: list[np.ndarray], columns: int, margin: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Fields laid out on a white background, `margin` px around and between them, row by row;
    the mosaic and each field's (x, y) top-left."""
    h, w = max(f.shape[0] for f in fields), max(f.shape[1] for f in fields)
    rows = -(-len(fields) // columns)
    canvas = np.full((margin + rows * (h + margin), margin + columns * (w + margin), 3), 255, np.uint8)
    origins = []
    for k, field in enumerate(fields):
        x, y = margin + (k % columns) * (w + margin), margin + (k // columns) * (h + margin)
        canvas[y : y + field.shape[0], x : x + field.shape[1]] = field
        origins.append((x, y))
    return canvas, origins


def write_slide(path: str | Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256) -> Path:
    """A pyramidal tiled TIFF that OpenSlide opens as `generic-tiff`: each level (halved) a page of
    the main IFD chain, with its resolution tags when `mpp` is given (none without)."""
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level = image
        for k in range(levels):
            options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
            if k:
                options["subfiletype"] = 1
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**k)
                options |= {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(level, **options)
            level = level[::2, ::2] if min(level.shape[:2]) >= 2 * tile else level
    return path


def write_sparse_slide(
    path: str | Path, size: tuple[int, int], fields: list[tuple[np.ndarray, int, int]], mpp: float, tile: int = 512
) -> Path:
    """A slide of `size` (w, h) px, white but for `fields` (pixels, x, y), written tile by tile at
    every level down to ~1,000 px a side: a gigapixel-shaped slide in the memory of one tile row."""
    path = Path(path)
    levels, (w, h) = [], size
    while True:
        levels.append((w, h))
        if max(w, h) <= 1024:
            break
        w, h = max(1, w // 2), max(1, h // 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, (lw, lh) in enumerate(levels):
            shrunk = [(f[:: 2**k, :: 2**k], x // 2**k, y // 2**k) for f, x, y in fields]
            options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
            px_per_cm = 1e4 / (mpp * 2**k)
            options |= {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(_tiles(lw, lh, tile, shrunk), shape=(lh, lw, 3), dtype=np.uint8, subfiletype=1 if k else 0,
                      **options)  # fmt: skip
    return path


def _tiles(w: int, h: int, tile: int, fields):
    """The tiles of a white w x h canvas holding `fields`, row by row (what TiffWriter takes)."""
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            for f, x, y in fields:
                x0, y0, x1, y1 = max(x, tx), max(y, ty), min(x + f.shape[1], tx + tile), min(y + f.shape[0], ty + tile)
                if x1 > x0 and y1 > y0:
                    block[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = f[y0 - y : y1 - y, x0 - x : x1 - x]
            yield block
