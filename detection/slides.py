"""Whole slides: a registered version counts tumour cells over a slide of any size.

    open (OpenSlide, else tiffslide; the slide's µm/px) -> tissue mask (a low-resolution level)
    -> regions at the version's training scale (data.mpp), background skipped
    -> each region read ahead in a thread, run through the version's pipeline (pipeline.detect:
       the same code as a whole image), its detections kept where the region owns them
    -> outputs written atomically once every region is done.

Regions overlap by the tiles' own overlap and each owns the span up to the middle of its overlaps
(inference.core_bounds), so a cell on a cut is reported once. A region's detections are written as
it finishes (`SLIDE.partial/`): a killed job resumes at the first region not done, and a slide is
done only when `SLIDE.done.json` exists, which is written last.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import export
from .errors import DetectionError
from .inference import core_bounds, tile_overlap, tile_starts
from .progress import Bar

REGION = 2048  # px a side at the model's scale: ~12 MB of RGB, a few hundred tiles' worth of context
READ_AHEAD = 2  # regions read while one runs: memory is (READ_AHEAD + 1) regions, whatever the slide
MASK_SIDE = 1024  # px: the tissue mask's level is the coarsest at least this long a side
THUMB_SIDE = 1024  # px: the same for the thumbnail of the outputs
MIN_TISSUE = 0.01  # a region with less tissue than this fraction of its area is background


class SlideError(DetectionError, ValueError):
    """A slide that cannot be read or counted; the message names the file and the fix."""


@dataclass
class Slide:
    path: Path
    handle: object  # openslide.OpenSlide or tiffslide.TiffSlide: the same API
    reader: str  # "openslide" or "tiffslide"
    mpp: float  # µm per level-0 pixel

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) px of level 0."""
        w, h = self.handle.dimensions
        return int(w), int(h)

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 pixels of the w×h px box of `level` whose top-left is (x, y) in level-0 px;
        outside the slide is white, as a scanner's background."""
        try:
            region = np.asarray(self.handle.read_region((x, y), level, (w, h)).convert("RGBA"))
        except Exception as e:  # a truncated tile, a codec error: name the slide and where
            raise SlideError(f"{self.path}: cannot read {w}x{h} px at ({x}, {y}) of level {level} ({e})") from None
        if region[..., 3].min() == 255:  # opaque, as inside any scanned area: no blending to pay for
            return np.ascontiguousarray(region[..., :3])
        rgb, alpha = region[..., :3].astype(np.float32), region[..., 3:].astype(np.float32) / 255
        return (rgb * alpha + 255 * (1 - alpha)).round().astype(np.uint8)

    def overview(self, side: int) -> tuple[np.ndarray, float]:
        """The slide's coarsest level that is still `side` px on its longest side (level 0 when
        none is), read whole, and the level-0 px per overview px. Its size follows `side`, not the
        slide's: a pyramid's levels shrink by 2 to 4 each."""
        dims = [tuple(int(v) for v in d) for d in self.handle.level_dimensions]
        wide = [k for k, (w, h) in enumerate(dims) if max(w, h) >= min(side, max(dims[0]))]
        level = max(wide, key=lambda k: self.handle.level_downsamples[k])
        w, h = dims[level]
        return self.read(0, 0, w, h, level), self.size[0] / w


def open_slide(path: Path, mpp: float | None = None) -> Slide:
    """The slide at `path`, read by OpenSlide where it can, else by tiffslide; its µm per pixel from
    the file, or `mpp` when given."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such slide")
    handle, reader, errors = None, "", []
    for name, opener in (("openslide", _openslide), ("tiffslide", _tiffslide)):
        try:
            handle, reader = opener(path), name
            break
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
    if handle is None:
        raise SlideError(
            f"{path}: neither OpenSlide nor tiffslide reads it ({'; '.join(errors)}); give a slide in a "
            f"format OpenSlide knows (SVS, NDPI, MRXS, tiled TIFF, OME-TIFF)"
        )
    recorded = _recorded_mpp(handle.properties, reader)
    if mpp is None and recorded is None:
        raise SlideError(
            f"{path}: the slide records no resolution (no {reader}.mpp-x); pass --mpp with its "
            f"micrometres per pixel (a 40x scanner: about 0.25; BreCaHAD: 0.514)"
        )
    if mpp is not None and not 0.05 <= mpp <= 20:
        raise SlideError(f"--mpp {mpp} is not micrometres per pixel (0.05 to 20; a 40x scanner: about 0.25)")
    return Slide(path, handle, reader, float(mpp if mpp is not None else recorded))


def _openslide(path: Path):
    import openslide

    return openslide.OpenSlide(str(path))


def _tiffslide(path: Path):
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def _recorded_mpp(properties, reader: str) -> float | None:
    try:
        value = float(properties[f"{reader}.mpp-x"])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


def resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 resampled to (h, w) with antialiasing (skimage), unchanged when it has that size."""
    if image.shape[:2] == tuple(hw):
        return image
    from skimage.transform import resize as sk_resize

    out = sk_resize(image, hw, order=1, anti_aliasing=True, preserve_range=True)
    return out.round().clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Mask:
    tissue: np.ndarray  # (h, w) bool on the thumbnail
    px: float  # level-0 px per mask px

    def fraction(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """The tissue fraction of a box in level-0 px."""
        h, w = self.tissue.shape
        c0, r0 = int(np.clip(x0 / self.px, 0, w)), int(np.clip(y0 / self.px, 0, h))
        c1, r1 = int(np.clip(np.ceil(x1 / self.px), 0, w)), int(np.clip(np.ceil(y1 / self.px), 0, h))
        return float(self.tissue[r0:r1, c0:c1].mean()) if r1 > r0 and c1 > c0 else 0.0

    def covers(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(N,) bool: level-0 points on tissue."""
        h, w = self.tissue.shape
        c = np.clip((np.asarray(x) / self.px).astype(int), 0, w - 1)
        r = np.clip((np.asarray(y) / self.px).astype(int), 0, h - 1)
        return self.tissue[r, c]

    def area_mm2(self, mpp: float) -> float:
        return float(self.tissue.sum()) * (self.px * mpp / 1000) ** 2


def tissue_mask(slide: Slide) -> Mask:
    """Tissue on a low-resolution level: stained pixels are saturated, a scanner's background is
    white or grey. Otsu's threshold on saturation (never below a floor, so an all-tissue slide is not
    halved), closed, holes (lumens) filled, specks dropped."""
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_objects

    thumb, px = slide.overview(MASK_SIDE)
    saturation = rgb2hsv(thumb)[..., 1]
    spread = float(saturation.max() - saturation.min())
    threshold = min(threshold_otsu(saturation), TISSUE_SATURATION) if spread > 1e-3 else TISSUE_SATURATION
    tissue = saturation > threshold
    tissue = ndimage.binary_fill_holes(closing(tissue, disk(2)))
    # Specks under ~(50 µm)^2: dust and pen marks, not tissue.
    min_px = max(1, int((50 / (px * slide.mpp)) ** 2))
    return Mask(remove_small_objects(tissue, max_size=min_px), px)


TISSUE_SATURATION = 0.08  # H&E tissue: saturation 0.1-0.6; glass and background: under 0.05


@dataclass(frozen=True)
class Region:
    """A square of the slide at the model's scale, and the part of it the region owns."""

    index: int
    x: int  # model px of the top-left corner
    y: int
    side: tuple[int, int]  # (h, w) model px
    core: tuple[float, float, float, float]  # x0, y0, x1, y1 model px of the slide: what it owns
    tissue: float  # fraction of its area


def plan(slide: Slide, mask: Mask, scale: float, side: int, overlap: int) -> list[Region]:
    """The regions that cover the slide at `scale` level-0 px per model px, in row order."""
    w, h = (round(v / scale) for v in slide.size)
    sw, sh = min(side, w), min(side, h)
    xs, ys = tile_starts(w, sw, overlap), tile_starts(h, sh, overlap)
    regions = []
    for y, (cy0, cy1) in zip(ys, core_bounds(ys, sh)):
        for x, (cx0, cx1) in zip(xs, core_bounds(xs, sw)):
            tissue = mask.fraction(x * scale, y * scale, (x + sw) * scale, (y + sh) * scale)
            regions.append(Region(len(regions), x, y, (sh, sw), (cx0, cy0, cx1, cy1), tissue))
    return regions


def read_region(slide: Slide, region: Region, scale: float) -> np.ndarray:
    """A region's pixels at the model's scale, read from the finest level that is not finer than needed."""
    level = int(slide.handle.get_best_level_for_downsample(scale))
    down = float(slide.handle.level_downsamples[level])
    h, w = region.side
    x0, y0 = round(region.x * scale), round(region.y * scale)
    lw, lh = round(w * scale / down), round(h * scale / down)
    return resize(slide.read(x0, y0, lw, lh, level), (h, w))


def owned(table: pd.DataFrame, region: Region, mask: Mask, scale: float) -> pd.DataFrame:
    """A region's detections in the part it owns and on tissue (counts are per mm² of tissue),
    moved to the slide's model-scale pixels."""
    x0, y0, x1, y1 = region.core
    cx, cy = table.cx + region.x, table.cy + region.y
    keep = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1) & mask.covers(cx * scale, cy * scale)
    out = table[keep].copy()
    for col in ("x1", "x2", "cx"):
        out[col] += region.x
    for col in ("y1", "y2", "cy"):
        out[col] += region.y
    return out


def in_slide_pixels(table: pd.DataFrame, scale: float, mpp: float) -> pd.DataFrame:
    """Model-scale px to the slide's level-0 px, with µm beside them."""
    out = table.drop(columns=["image"]).copy()
    for col in ("x1", "y1", "x2", "y2", "cx", "cy"):
        out[col] = out[col] * scale
    out["cx_um"], out["cy_um"] = out.cx * mpp, out.cy * mpp
    return out.reset_index(drop=True)


@dataclass(frozen=True)
class Job:
    """What a slide is counted with: it names the partial state a resume may reuse."""

    model: str  # the pinned models:/NAME/VERSION
    model_mpp: float
    region: int
    overlap: int
    mpp: float | None  # given on the command line; None: the slide's own

    @classmethod
    def of(cls, model: str, data, region: int = REGION, mpp: float | None = None) -> Job:
        """A job for the version whose config has `data`: its training scale, its tiles' overlap."""
        return cls(model, data.mpp, region, tile_overlap(data), mpp)

    def key(self, slide: Slide) -> str:
        stat = slide.path.stat()
        fields = asdict(self) | {"slide": slide.path.name, "bytes": stat.st_size, "slide_mpp": slide.mpp}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Outputs:
    """Where one slide's results go: OUT/STEM.* and OUT/STEM.partial/ while it runs."""

    out: Path
    stem: str

    @property
    def partial(self) -> Path:
        return self.out / f"{self.stem}.partial"

    @property
    def done(self) -> Path:
        return self.out / f"{self.stem}.done.json"

    def region_file(self, region: Region) -> Path:
        return self.partial / f"region-{region.index:06d}.parquet"

    def paths(self) -> dict[str, Path]:
        return {
            "geojson": self.out / f"{self.stem}.geojson.gz",
            "parquet": self.out / f"{self.stem}.parquet",
            "thumbnail": self.out / f"{self.stem}.thumbnail.png",
            "summary": self.done,
        }


def stem(path: Path) -> str:
    """The slide's name without its format's suffix (`.svs`, `.ome.tiff`): its outputs' prefix."""
    return re.sub(r"(\.ome)?\.[^.]+$", "", path.name, flags=re.IGNORECASE)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write` a temporary file beside `path`, then rename it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _start_partial(o: Outputs, key: str) -> None:
    """Keep the regions a killed run of the same job left; start over for any other job."""
    stamp = o.partial / "job.json"
    if o.partial.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
        shutil.rmtree(o.partial)
    o.partial.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write(stamp, lambda p: p.write_text(json.dumps({"key": key})))


def prefetched(slide: Slide, regions: list[Region], scale: float) -> Iterator[tuple[Region, np.ndarray]]:
    """Regions with their pixels, read READ_AHEAD ahead in a thread while the model runs."""
    with ThreadPoolExecutor(1) as pool:
        queue = [pool.submit(read_region, slide, r, scale) for r in regions[:READ_AHEAD]]
        for k, region in enumerate(regions):
            if k + READ_AHEAD < len(regions):
                queue.append(pool.submit(read_region, slide, regions[k + READ_AHEAD], scale))
            yield region, queue.pop(0).result()


def count(slide: Slide, job: Job, run_region: Callable[[np.ndarray], pd.DataFrame], out: Path) -> dict:
    """Count one slide's cells: every tissue region not done yet through `run_region` (the version's
    pipeline on one image), then the outputs. Returns the slide's summary."""
    o, key = Outputs(Path(out), stem(slide.path)), job.key(slide)
    done = json.loads(o.done.read_text()) if o.done.is_file() else {}
    if done.get("key") == key:
        shutil.rmtree(o.partial, ignore_errors=True)  # a kill after the summary, before the clean-up
        return done  # counted already by this job
    mask = tissue_mask(slide)
    scale = job.model_mpp / slide.mpp  # level-0 px per model px
    regions = plan(slide, mask, scale, job.region, job.overlap)
    tissue = [r for r in regions if r.tissue >= MIN_TISSUE]
    _start_partial(o, key)
    todo = [r for r in tissue if not o.region_file(r).is_file()]
    resumed = f", {len(tissue) - len(todo)} done before" if len(todo) < len(tissue) else ""
    with Bar(len(todo), f"{slide.path.name}: {len(tissue)} tissue regions{resumed}", every=5) as bar:
        for region, pixels in prefetched(slide, todo, scale):
            found = owned(run_region(pixels), region, mask, scale)
            atomic_write(o.region_file(region), lambda p, f=found: f.to_parquet(p, engine="pyarrow", index=False))
            bar.advance(detections=len(found))
    parts = [pd.read_parquet(o.region_file(r)) for r in tissue]
    table = in_slide_pixels(pd.concat(parts, ignore_index=True) if parts else _empty(), scale, slide.mpp)
    summary = _summary(slide, key, job, mask, regions, tissue, table)
    _write_outputs(o, slide, table, summary)
    shutil.rmtree(o.partial)
    return summary


def _empty() -> pd.DataFrame:
    return export.table(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), ())


def _summary(slide: Slide, key: str, job: Job, mask: Mask, regions, tissue, table: pd.DataFrame) -> dict:
    area = mask.area_mm2(slide.mpp)
    per_class = table["class"].value_counts().to_dict()
    return {
        "key": key,
        "slide": str(slide.path),
        "reader": slide.reader,
        "mpp": slide.mpp,
        "size": list(slide.size),
        "model": job.model,
        "regions": len(regions),
        "tissue_regions": len(tissue),
        "background_regions": len(regions) - len(tissue),
        "tissue_mm2": area,
        "detections": len(table),
        "counts": {k: int(v) for k, v in per_class.items()},
        "per_mm2": {k: (int(v) / area if area else 0.0) for k, v in per_class.items()},
        "empty_tissue": area == 0,
    }


def _write_outputs(o: Outputs, slide: Slide, table: pd.DataFrame, summary: dict) -> None:
    from . import figures

    paths = o.paths()
    atomic_write(paths["parquet"], lambda p: table.to_parquet(p, engine="pyarrow", index=False))
    doc = json.dumps(export.to_geojson(table, str(slide.path)))
    atomic_write(paths["geojson"], lambda p: p.write_bytes(gzip.compress(doc.encode(), mtime=0)))
    thumb, px = slide.overview(THUMB_SIDE)
    x, y, px_mm = table.cx.to_numpy() / px, table.cy.to_numpy() / px, px * slide.mpp / 1000
    fig = figures.density(thumb, x, y, px_mm, slide.path.name, summary)
    atomic_write(paths["thumbnail"], lambda p: fig.savefig(p, format="png", dpi=100))
    figures.close(fig)
    atomic_write(paths["summary"], lambda p: p.write_text(json.dumps(summary, indent=2)))
