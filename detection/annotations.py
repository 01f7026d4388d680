"""A lab's own annotations into the project's dataset layout (`python -m detection import`).

Reads cell points from QuPath GeoJSON ("Export objects as GeoJSON": a FeatureCollection, a list of
features, or one feature per line; a polygon is taken at its centroid), COCO JSON (keypoints, or
boxes at their centres) or a CSV of `image, x, y, class`, with their images (TIFF, PNG, JPEG, or
regions of whole slides: an unclassified polygon around the cells, else their box), and writes
images/NAME.tif (with its resolution) + groundTruth/NAME.json + dataset.json (class map, µm
per px, source digests, counts per class). validate, train, evaluate and tune read the result as
they read BreCaHAD. Everything is read and checked first; the folder appears whole or not at all.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from .data import DATASET_FILE, MAX_POINTS_PER_IMAGE, MIN_SIDE, tiff_mpp
from .errors import DetectionError

FORMATS = ("qupath", "coco", "csv")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
# Whole slides: annotated regions of them are imported as images (a tiled, pyramidal TIFF is one too).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide")
REGION_MARGIN = 64  # px around a slide's cells when no region is drawn
MAX_REGION_SIDE = 8192  # px: a region is an image the model sees whole, not a slide
# QuPath objects that stand for cells; others (a TMA core, a tile) are not one.
CELL_OBJECTS = ("annotation", "detection", "cell")
MAX_PROBLEMS = 20  # listed in full; a broken export would otherwise print thousands of lines


class AnnotationError(DetectionError, ValueError):
    """Annotations that cannot be imported; `problems` lists each one, naming its file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_PROBLEMS] + (
            [f"... and {len(problems) - MAX_PROBLEMS} more"] * (len(problems) > MAX_PROBLEMS)
        )
        head = (
            shown[0]
            if len(problems) == 1
            else f"{len(problems)} problems, nothing written:\n" + "\n".join(f"  - {p}" for p in shown)
        )
        super().__init__(head)


@dataclass(frozen=True)
class Cell:
    image: str  # the image's name (file stem)
    x: float  # px, x right
    y: float  # px, y down
    cls: str | None  # None: unclassified
    where: str  # file and feature/row, for messages
    bounds: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 of a polygon


@dataclass
class Read:
    cells: list[Cell] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # (width, height) a file declares
    problems: list[str] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class ImportRequest:
    src: Path
    format: str
    images: Path
    out: Path
    mpp: float | None = None  # µm per px of images that record none
    classes: tuple[str, ...] = ()  # the class map, in label order; empty: every class named, sorted
    default_class: str = ""  # the class of unclassified objects; empty: they are skipped and counted
    units: str = "px"  # px | um: the coordinates' unit

    def check(self) -> None:
        if self.format not in FORMATS:
            raise AnnotationError([f"--format {self.format!r}: use one of {', '.join(FORMATS)}"])
        if self.units not in ("px", "um"):
            raise AnnotationError([f"--units {self.units!r}: use px or um"])
        if self.mpp is not None and not 0 < self.mpp < 100:
            raise AnnotationError([f"--mpp {self.mpp}: microns per pixel lie in (0, 100); BreCaHAD's are 0.514"])
        for what, path in (("annotations", self.src), ("--images", self.images)):
            if not path.exists():
                raise AnnotationError([f"{path}: no such file or folder ({what})"])
        if self.out.exists() and any(self.out.iterdir()):
            raise AnnotationError([f"{self.out}: not empty; give --out a new folder (nothing is overwritten)"])


# ---- reading the three formats -------------------------------------------------------------


def read_qupath(src: Path) -> Read:
    """Every feature of each GeoJSON file; a file's stem names its image (QuPath exports one per image)."""
    out = Read()
    files = sorted(p for p in src.rglob("*") if p.suffix in (".geojson", ".json")) if src.is_dir() else [src]
    for path in files:
        out.sources.append(path)
        try:
            features = _features(path)
        except ValueError as e:
            out.problems.append(str(e))
            continue
        for k, feature in enumerate(features):
            _qupath_feature(out, feature, path.name.split(".")[0], f"{path} feature {k}")
    return out


def _features(path: Path) -> list:
    text = path.read_text(errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as whole:
        try:  # one feature per line (QuPath's "newline-delimited" export)
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not valid JSON ({whole})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        doc = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        doc = [doc]
    if not isinstance(doc, list):
        raise ValueError(f"{path}: not GeoJSON (expected a FeatureCollection, a Feature or a list of features)")
    return doc


def _qupath_feature(out: Read, feature, image: str, where: str) -> None:
    if not (
        isinstance(feature, dict) and feature.get("type") == "Feature" and isinstance(feature.get("geometry"), dict)
    ):
        out.problems.append(f"{where}: not a GeoJSON Feature with a geometry")
        return
    props = feature.get("properties") or {}
    kind = props.get("objectType", "annotation")
    if kind not in CELL_OBJECTS:
        out.problems.append(f"{where}: objectType {kind!r} is not a cell ({', '.join(CELL_OBJECTS)})")
        return
    named = (props.get("classification") or {}).get("name") if isinstance(props.get("classification"), dict) else None
    try:
        points, bounds = _centres(feature["geometry"])
    except ValueError as e:
        out.problems.append(f"{where}: {e}")
        return
    out.cells.extend(Cell(image, x, y, named, where, bounds) for x, y in points)


def _centres(geometry: dict) -> tuple[list[tuple[float, float]], tuple | None]:
    """A Point or each point of a MultiPoint; a (Multi)Polygon at its centroid, refused when
    invalid, with its bounds (an unclassified polygon on a slide is the region annotated)."""
    import shapely.geometry
    import shapely.validation

    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind not in ("Point", "MultiPoint", "Polygon", "MultiPolygon"):
        raise ValueError(f"geometry {kind!r} is not a cell (Point, MultiPoint, Polygon, MultiPolygon)")
    try:
        if kind == "Point":
            return [(float(coords[0]), float(coords[1]))], None
        if kind == "MultiPoint":
            return [(float(c[0]), float(c[1])) for c in coords], None
        shape = shapely.geometry.shape(geometry)
    except (TypeError, IndexError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{kind} with malformed coordinates ({type(e).__name__}: {e})") from None
    if not shape.is_valid:
        raise ValueError(
            f"{kind} is not a valid polygon ({shapely.validation.explain_validity(shape)}); fix it in QuPath"
        )
    if shape.is_empty or shape.area == 0:
        raise ValueError(f"{kind} encloses no area")
    return [(shape.centroid.x, shape.centroid.y)], tuple(float(v) for v in shape.bounds)


def read_coco(src: Path) -> Read:
    """COCO JSON: each annotation's first visible keypoint, else its box's centre; image sizes as declared."""
    out = Read(sources=[src])
    try:
        doc = json.loads(src.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        return Read(problems=[f"{src}: not valid JSON ({e})"], sources=[src])
    if not (
        isinstance(doc, dict) and all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories"))
    ):
        return Read(problems=[f"{src}: not COCO (expected lists images, annotations and categories)"], sources=[src])
    try:
        names = {c["id"]: str(c["name"]) for c in doc["categories"]}
        images = {im["id"]: Path(im["file_name"]).stem for im in doc["images"]}
        out.sizes = {
            Path(im["file_name"]).stem: (int(im["width"]), int(im["height"])) for im in doc["images"] if "width" in im
        }
    except (KeyError, TypeError, ValueError) as e:
        return Read(problems=[f"{src}: a category or image lacks {e} (id, name, file_name)"], sources=[src])
    for k, ann in enumerate(doc["annotations"]):
        where = f"{src} annotation {k}"
        try:
            image = images[ann["image_id"]]
            cls = names[ann["category_id"]]
            x, y = _coco_point(ann)
        except KeyError as e:
            out.problems.append(f"{where}: names {e} that the file does not define (image_id, category_id)")
            continue
        except (TypeError, ValueError, IndexError) as e:
            out.problems.append(f"{where}: {e}")
            continue
        out.cells.append(Cell(image, x, y, cls, where))
    return out


def _coco_point(ann: dict) -> tuple[float, float]:
    kp = ann.get("keypoints") or []
    for i in range(0, len(kp) - 2, 3):
        if kp[i + 2] > 0:
            return float(kp[i]), float(kp[i + 1])
    box = ann.get("bbox")
    if box is None or len(box) != 4:
        raise ValueError("neither a visible keypoint nor a bbox [x, y, w, h]")
    return float(box[0]) + float(box[2]) / 2, float(box[1]) + float(box[3]) / 2


def read_csv(src: Path) -> Read:
    """A CSV with a header naming image, x and y (and class): one cell per row."""
    out = Read(sources=[src])
    with open(src, newline="", errors="replace") as f:
        rows = csv.DictReader(f)
        missing = [c for c in ("image", "x", "y") if c not in (rows.fieldnames or [])]
        if missing:
            return Read(problems=[f"{src}: no column {missing[0]!r} (the header must name image, x, y and class)"])
        for k, row in enumerate(rows, start=2):
            where = f"{src} line {k}"
            try:
                x, y = float(row["x"]), float(row["y"])
            except (TypeError, ValueError):
                out.problems.append(f"{where}: x={row['x']!r}, y={row['y']!r} are not numbers")
                continue
            out.cells.append(Cell(Path(row["image"] or "").stem, x, y, (row.get("class") or "").strip() or None, where))
    return out


READERS = {"qupath": read_qupath, "coco": read_coco, "csv": read_csv}


# ---- images ----------------------------------------------------------------------------------


def image_paths(folder: Path) -> dict[str, Path]:
    files = [folder] if folder.is_file() else sorted(folder.iterdir())
    return {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES + SLIDE_SUFFIXES}


def is_slide(path: Path) -> bool:
    """A whole slide: a scanner's format, or a tiled TIFF with more than one page (a pyramid)."""
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return True
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].is_tiled and len(tif.pages) > 1
    except Exception:  # read_rgb names an unreadable file
        return False


@dataclass(frozen=True)
class Source:
    """Where an imported image's pixels come from: a whole file, or a box of a slide's level 0."""

    path: Path
    box: tuple[int, int, int, int] | None = None  # x, y, w, h in slide px
    mpp: float | None = None  # a slide's recorded (or --mpp) resolution

    def read(self) -> np.ndarray:
        if self.box is None:
            return read_rgb(self.path)
        from .slides import open_slide

        return open_slide(self.path, self.mpp).read(*self.box)


def slide_regions(cells: list[Cell], slides: dict[str, Path], req: ImportRequest, problems: list[str]):
    """Each slide's annotated regions as images NAME-rK, and its cells moved into them. A region is
    an unclassified polygon drawn around the cells (QuPath), else the box around all of a slide's
    cells with a margin; a cell outside every region is refused."""
    from .slides import SlideError, open_slide

    sources, moved = {}, [c for c in cells if c.image not in slides]
    for name, path in slides.items():
        try:
            slide = open_slide(path, req.mpp)
        except SlideError as e:
            problems.append(str(e))
            continue
        mine = [c for c in cells if c.image == name]
        outlines = [c.bounds for c in mine if c.cls is None and c.bounds]
        points = [c for c in mine if not (c.cls is None and c.bounds)]
        if not outlines and points:
            xs, ys = [c.x for c in points], [c.y for c in points]
            outlines = [
                (min(xs) - REGION_MARGIN, min(ys) - REGION_MARGIN, max(xs) + REGION_MARGIN, max(ys) + REGION_MARGIN)
            ]
        w, h = slide.size
        boxes = []
        for x0, y0, x1, y1 in outlines:
            x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
            box = (x0, y0, min(w, int(np.ceil(x1))) - x0, min(h, int(np.ceil(y1))) - y0)
            if max(box[2:]) > MAX_REGION_SIDE or min(box[2:]) < MIN_SIDE:
                problems.append(
                    f"{path}: a region of {box[2]}x{box[3]} px at ({x0}, {y0}); regions are {MIN_SIDE} to "
                    f"{MAX_REGION_SIDE} px a side: draw an unclassified rectangle around each annotated area"
                )
                continue
            boxes.append(box)
        for k, box in enumerate(boxes, start=1):
            sources[f"{name}-r{k}"] = Source(path, box, slide.mpp)
        for c in points:
            inside = [k for k, (x, y, bw, bh) in enumerate(boxes, start=1) if x <= c.x <= x + bw and y <= c.y <= y + bh]
            if not inside:
                problems.append(f"{c.where}: ({c.x:.1f}, {c.y:.1f}) px lies outside every region of {path}")
                continue
            x, y = boxes[inside[0] - 1][:2]
            moved.append(Cell(f"{name}-r{inside[0]}", c.x - x, c.y - y, c.cls, c.where))
    return sources, moved


def read_rgb(path: Path) -> np.ndarray:
    """The image as (H, W, 3) uint8; an alpha channel is dropped. Raises ValueError naming the file."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            image = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                image = np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im)
    except Exception as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path}: {image.dtype} of shape {image.shape}; H&E images are 8-bit RGB")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{path}: {image.shape[1]}x{image.shape[0]} px, under {MIN_SIDE} px a side")
    return np.ascontiguousarray(image)


def image_mpp(path: Path) -> float | None:
    return tiff_mpp(path) if path.suffix.lower() in (".tif", ".tiff") else None


# ---- checking and writing ---------------------------------------------------------------------


@dataclass
class Dataset:
    classes: tuple[str, ...]
    mpp: float
    points: dict[str, dict[str, list[tuple[float, float]]]]  # image -> class -> px points
    images: dict[str, Source]
    shapes: dict[str, tuple[int, int]]  # (height, width)
    unannotated: list[str]
    skipped: int  # unclassified objects left out
    sources: dict[str, str]  # annotation file -> sha256

    def counts(self) -> dict[str, int]:
        total = Counter()
        for per_class in self.points.values():
            total.update({c: len(p) for c, p in per_class.items()})
        return {c: total[c] for c in self.classes}


def build(req: ImportRequest) -> Dataset:
    """Read and check everything; raises AnnotationError listing every problem, before any write."""
    req.check()
    read = READERS[req.format](req.src)
    problems = list(read.problems)
    paths = image_paths(req.images)
    if not paths:
        raise AnnotationError([f"{req.images}: no image ({', '.join(IMAGE_SUFFIXES + SLIDE_SUFFIXES)})"])
    slides = {n: p for n, p in paths.items() if is_slide(p)}
    regions, cells = slide_regions(read.cells, slides, req, problems)
    images = {n: Source(p) for n, p in paths.items() if n not in slides} | regions
    cells = [c if c.cls else Cell(c.image, c.x, c.y, req.default_class or None, c.where) for c in cells]
    skipped = sum(c.cls is None for c in cells)
    cells = [c for c in cells if c.cls is not None]
    classes = req.classes or tuple(sorted({c.cls for c in cells}))
    if not classes and not problems:  # said only when nothing else explains it
        problems.append(f"{req.src}: no classified cell" + ("" if req.default_class else "; give --default-class NAME"))
    for c in cells:
        if c.image not in images:
            problems.append(f"{c.where}: image {c.image!r} is not in {req.images} ({_some(images)})")
        elif c.cls not in classes:
            problems.append(f"{c.where}: class {c.cls!r} is outside the class map ({', '.join(classes)})")
    shapes, mpps = {}, {}
    for name, source in images.items():
        path = source.path
        try:
            # Every pixel read, so a truncated file is found before anything is written; `write` reads
            # each image again rather than hold them all in memory.
            shapes[name] = source.read().shape[:2]
        except (ValueError, DetectionError) as e:
            problems.append(str(e))
            continue
        mpps[name] = source.mpp or req.mpp or image_mpp(path)
        declared = read.sizes.get(name)
        if declared and declared != (shapes[name][1], shapes[name][0]):
            problems.append(
                f"{req.src}: {name} is declared {declared[0]}x{declared[1]} px but {path} is "
                f"{shapes[name][1]}x{shapes[name][0]}; export the annotations from these images"
            )
    mpp = _one_mpp(mpps, req, problems)
    if problems:
        raise AnnotationError(problems)
    points = _place(cells, shapes, mpp, req, problems)
    if problems:
        raise AnnotationError(problems)
    return Dataset(
        classes,
        mpp,
        points,
        images,
        shapes,
        sorted(set(images) - {c.image for c in cells}),
        skipped,
        {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in read.sources},
    )


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def _one_mpp(mpps: dict[str, float | None], req: ImportRequest, problems: list[str]) -> float:
    known = {n: m for n, m in mpps.items() if m}
    unknown = sorted(set(mpps) - set(known))
    if unknown:
        problems.append(
            f"{req.images / unknown[0]}: records no resolution; give --mpp (µm per pixel, 0.514 for BreCaHAD)"
        )
        return float("nan")
    values = sorted(set(known.values()))
    if values and values[-1] > 1.01 * values[0]:
        problems.append(
            f"{req.images}: images at {values[0]:.4g} to {values[-1]:.4g} µm/px; import each resolution on its own"
        )
    return values[0] if values else float("nan")


def _place(cells: list[Cell], shapes, mpp: float, req: ImportRequest, problems: list[str]) -> dict:
    """Pixel points per image and class; coordinates outside their image are refused, and µm
    coordinates given as pixels are recognised by where they fall."""
    scale = 1 / mpp if req.units == "um" else 1.0
    by_image: dict[str, dict[str, list[tuple[float, float]]]] = {n: {} for n in shapes}
    for image, group in _grouped(cells).items():
        h, w = shapes[image]
        if len(group) > MAX_POINTS_PER_IMAGE:
            problems.append(
                f"{image}: {len(group):,} cells, more than the {MAX_POINTS_PER_IMAGE:,} an image's annotation holds"
            )
            continue
        xy = np.array([(c.x * scale, c.y * scale) for c in group])
        outside = ~((xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)) | ~np.isfinite(xy).all(1)
        for k in np.flatnonzero(outside)[:3]:
            problems.append(f"{group[k].where}: ({xy[k, 0]:.1f}, {xy[k, 1]:.1f}) px lies outside {image} ({w}x{h} px)")
        if not outside.any() and req.units == "px" and _looks_like_um(xy, w, h, mpp):
            problems.append(
                f"{req.src}: every point of {image} lies within its top-left {mpp:.3g} of each side, as µm coordinates "
                f"of a {mpp:.3g} µm/px image would; if they are µm, import with --units um"
            )
        for c, (x, y) in zip(group, xy.tolist(), strict=True):
            by_image[image].setdefault(c.cls, []).append((x, y))
    return by_image


def _grouped(cells: list[Cell]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(c.image, []).append(c)
    return out


def _looks_like_um(xy: np.ndarray, w: int, h: int, mpp: float) -> bool:
    """Many points, all within [0, w·mpp] x [0, h·mpp], on an image finer than 0.8 µm/px."""
    return len(xy) >= 10 and mpp < 0.8 and xy[:, 0].max() <= w * mpp and xy[:, 1].max() <= h * mpp


def write(ds: Dataset, req: ImportRequest) -> Path:
    """The dataset folder, written beside `out` and moved into place whole."""
    req.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{req.out.name}.", dir=req.out.parent))
    try:
        (staging / "images").mkdir()
        (staging / "groundTruth").mkdir()
        per_cm = 1e4 / ds.mpp
        for name, source in ds.images.items():
            image = source.read()
            tifffile.imwrite(
                staging / "images" / f"{name}.tif",
                image,
                photometric="rgb",
                resolution=(per_cm, per_cm),
                resolutionunit=tifffile.RESUNIT.CENTIMETER,
            )
            h, w = ds.shapes[name]
            doc = {c: [{"x": x / w, "y": y / h} for x, y in ds.points[name].get(c, [])] for c in ds.classes}
            (staging / "groundTruth" / f"{name}.json").write_text(json.dumps(doc))
        (staging / DATASET_FILE).write_text(json.dumps(summary(ds, req), indent=2))
        if req.out.exists():
            req.out.rmdir()  # checked empty
        staging.rename(req.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return req.out


def summary(ds: Dataset, req: ImportRequest) -> dict:
    """dataset.json: what data.layout_of reads (classes, mpp) and where it came from."""
    return {
        "classes": list(ds.classes),
        "mpp": ds.mpp,
        "format": req.format,
        "source": str(req.src),
        "images_from": str(req.images),
        "sources": ds.sources,
        "images": len(ds.images),
        "counts": ds.counts(),
        "unannotated": ds.unannotated,
        "unclassified_skipped": ds.skipped,
        "regions": {n: {"slide": str(src.path), "box_xywh": list(src.box)} for n, src in ds.images.items() if src.box},
    }


def run_import(req: ImportRequest, experiment: str = "brecahad-imports") -> tuple[str, Dataset]:
    """Check, write, and log the import as one MLflow run: its request, the source files' digests,
    the counts per class and dataset.json. A refused import writes no folder and starts no run."""
    from . import tracking

    ds = build(req)
    tracking.check_reachable()
    with tracking.run(experiment, name=f"import {req.format} {req.src.name}") as tr:
        tr.log_params(
            {"import.format": req.format, "import.src": req.src, "import.images": req.images, "import.out": req.out}
            | {"import.mpp": ds.mpp, "import.units": req.units, "import.classes": ",".join(ds.classes)}
        )
        tr.log_metrics({"images": len(ds.images), "unannotated_images": len(ds.unannotated)}, step=0)
        tr.log_metrics({f"cells/{c}": n for c, n in ds.counts().items()} | {"unclassified_skipped": ds.skipped}, step=0)
        write(ds, req)
        tr.client.log_artifact(tr.run_id, str(req.out / DATASET_FILE))
        tr.set_tags({"dataset": req.out.resolve(), "sources_sha256": _digest(ds.sources)})
    return tr.run_id, ds


def _digest(sources: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
