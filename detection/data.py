"""Read BreCaHAD as distributed: images/Case_N-MM.tif beside groundTruth/Case_N-MM.json.

Each JSON holds the seven class keys, each a list of {"x", "y"} points normalised to [0, 1]
(x by the width, y by the height, origin top-left). A folder written by `python -m detection
import` (a lab's own annotations) has the same layout plus `dataset.json`: its class map, which
replaces BreCaHAD's seven keys, and its microns per pixel; its images may be any RGB size.
`check_dataset` finds every problem in one pass so a user can fix a folder at once; `load_dataset`
refuses a folder with any.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from . import leakage
from .config import ALL_CLASSES, BRECAHAD_CLASSES, Config, ConfigError, check
from .errors import DetectionError

IMAGE_SHAPE = (1024, 1360, 3)  # height, width, RGB
# BreCaHAD's densest image has a few hundred annotated points; 20,000 in one image is not an
# annotation but a broken export, and training on it would ask for hundreds of GB.
MAX_POINTS_PER_IMAGE = 20_000
_NAME = re.compile(r"^(Case_\d+)-\d+$")
DATASET_FILE = "dataset.json"  # an imported dataset's class map, resolution and provenance
MIN_SIDE = 64  # px: an imported image must hold a cell and its surroundings


@dataclass(frozen=True)
class Layout:
    """What a folder's annotations name and how its images must look: BreCaHAD's seven keys and
    1360x1024 images, or an imported dataset's own classes and any RGB size of at least MIN_SIDE."""

    classes: tuple[str, ...] = BRECAHAD_CLASSES
    mpp: float | None = None
    shape: tuple[int, int, int] | None = IMAGE_SHAPE  # None: any size

    @property
    def imported(self) -> bool:
        return self.shape is None


def layout_of(root: str | Path) -> Layout:
    """The folder's layout: its `dataset.json` when it has one, else BreCaHAD's; raises ValueError
    naming the file and the key."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return Layout()
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); write it again with `python -m detection import`") from None
    classes = doc.get("classes") if isinstance(doc, dict) else None
    if not (
        isinstance(classes, list)
        and classes
        and all(isinstance(c, str) and c.strip() for c in classes)
        and len(set(classes)) == len(classes)
    ):
        raise ValueError(f"{path}: classes must be a non-empty list of unique names, got {classes!r}")
    mpp = doc.get("mpp")
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, int | float) or not 0 < mpp < 100):
        raise ValueError(f"{path}: mpp must be microns per pixel (0-100) or null, got {mpp!r}")
    return Layout(tuple(classes), None if mpp is None else float(mpp), None)


class DatasetError(DetectionError, ValueError):
    """A dataset folder with problems; `problems` lists each one, naming its file."""

    def __init__(self, root: Path, problems: list[str]):
        self.root = root
        self.problems = problems
        super().__init__(f"{root}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Sample:
    """One annotated image. `points` maps a class name to an (N, 2) array of (x, y) pixels."""

    name: str
    image_path: Path
    points: dict[str, np.ndarray]

    @property
    def case(self) -> str:
        m = _NAME.match(self.name)
        return m.group(1) if m else self.name

    def read_image(self) -> np.ndarray:
        return tifffile.imread(self.image_path)

    def mpp(self) -> float | None:
        """Micrometres per pixel the TIFF records (XResolution in pixels per centimetre or inch), or
        None: BreCaHAD's files say nothing (resolution unit none), and data.mpp stands in."""
        return tiff_mpp(self.image_path)

    def sha256(self) -> str:
        """Hash of the file's bytes (what split.json recorded before pixel hashes)."""
        return hashlib.sha256(self.image_path.read_bytes()).hexdigest()

    def fingerprint(self) -> tuple[str, str]:
        """(pixel hash, encoded leakage thumbnail) of the decoded image, read once."""
        image = self.read_image()
        return pixel_sha256(image), leakage.encode(leakage.thumbnail(image))


MICRONS_PER_UNIT = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25_400.0}


def tiff_mpp(path: Path) -> float | None:
    """Micrometres per pixel along x from a TIFF's first page, or None when it records no physical unit."""
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        unit, res = tags.get("ResolutionUnit"), tags.get("XResolution")
        if unit is None or res is None or unit.value not in MICRONS_PER_UNIT:
            return None
        num, den = res.value
        return MICRONS_PER_UNIT[unit.value] * den / num if num > 0 and den > 0 else None


def pixel_sha256(image: np.ndarray) -> str:
    """Hash of the decoded pixels and their shape: the same image re-saved with another
    compression or container hashes the same."""
    h = hashlib.sha256(f"{image.shape}{image.dtype}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def image_files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "images").glob("*.tif*"))}


def label_files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "groundTruth").glob("*.json"))}


def image_shape(path: Path) -> tuple[int, ...]:
    """The shape a TIFF declares, from its header alone."""
    with tifffile.TiffFile(path) as tif:
        return tuple(tif.series[0].shape)


def check_image(path: Path, layout: Layout = Layout()) -> str | None:
    """The problem with one TIFF, or None. The declared dtype and shape are checked from the header
    first (a small file may declare gigapixels); then every pixel is read, so a truncated file is caught."""
    try:
        with tifffile.TiffFile(path) as tif:
            problem = _layout_problem(path, tif.series[0].dtype, tuple(tif.series[0].shape), layout)
        if problem:
            return problem
        tifffile.imread(path)
    except Exception as e:  # tifffile raises several types for damaged files
        return f"{path}: unreadable TIFF ({type(e).__name__}: {e}); re-download or re-export the image"
    return None


def _layout_problem(path: Path, dtype, shape: tuple[int, ...], layout: Layout = Layout()) -> str | None:
    if dtype != np.uint8:
        return f"{path}: dtype {dtype}, expected uint8 RGB"
    if len(shape) != 3 or shape[2] != 3:
        channels = shape[2] if len(shape) == 3 else 1
        return f"{path}: {channels} channel(s) (shape {shape}), expected 3 (RGB)"
    if layout.shape is not None and shape != layout.shape:
        return f"{path}: shape {shape}, expected {layout.shape} (1360x1024 RGB at 40x)"
    if min(shape[:2]) < MIN_SIDE:
        return f"{path}: shape {shape}, under {MIN_SIDE} px a side: too small to hold a cell and its surroundings"
    return None


def read_points(
    path: Path, width: int = IMAGE_SHAPE[1], height: int = IMAGE_SHAPE[0], classes: tuple[str, ...] = BRECAHAD_CLASSES
) -> dict[str, np.ndarray]:
    """Parse one ground-truth JSON into pixel coordinates; raises ValueError naming the problem."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    kind = "BreCaHAD" if classes == BRECAHAD_CLASSES else "the dataset's (dataset.json)"
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object with keys {', '.join(classes)}")
    unknown = sorted(set(doc) - set(classes))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; {kind} keys are {', '.join(classes)}")
    missing = [k for k in classes if k not in doc]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    total = sum(len(v) for v in doc.values() if isinstance(v, list))
    if total > MAX_POINTS_PER_IMAGE:
        raise ValueError(
            f"{path}: {total:,} points in one image, more than the {MAX_POINTS_PER_IMAGE:,} any real "
            f"annotation holds; check the export that wrote this file"
        )
    points = {}
    for key in classes:
        entries = doc[key]
        if not isinstance(entries, list):
            raise ValueError(f"{path}: {key} must be a list of {{x, y}} points, got {type(entries).__name__}")
        xy = np.zeros((len(entries), 2), dtype=np.float64)
        for i, p in enumerate(entries):
            if not (isinstance(p, dict) and set(p) == {"x", "y"}):
                raise ValueError(f'{path}: {key}[{i}] = {p!r} is not a point {{"x": .., "y": ..}}')
            for j, axis in enumerate("xy"):
                v = p[axis]
                if (
                    isinstance(v, bool)
                    or not isinstance(v, (int, float))
                    or not math.isfinite(v)
                    or not 0.0 <= v <= 1.0
                ):
                    raise ValueError(
                        f"{path}: {key}[{i}].{axis} = {v!r} is outside [0, 1] (coordinates are normalised)"
                    )
                xy[i, j] = v
        points[key] = xy * np.array([width, height], dtype=np.float64)
    return points


def check_dataset(root: str | Path) -> list[str]:
    """Every problem in a BreCaHAD folder, one line each, naming the file."""
    root = Path(root)
    if not root.is_dir():
        # Under `mlflow run` (it sets MLFLOW_RUN_ID) the working directory is the project, not the
        # user's shell: say so only there.
        where = ", the project directory under `mlflow run`" if os.environ.get("MLFLOW_RUN_ID") else ""
        relative = "" if root.is_absolute() else f" (relative paths are taken from {Path.cwd()}{where})"
        return [
            f"{root}: no such folder{relative}; point data_dir at a folder holding images/ and groundTruth/"
            + ("" if root.is_absolute() else ", best as an absolute path")
        ]
    problems = []
    for sub in ("images", "groundTruth"):
        if not (root / sub).is_dir():
            problems.append(f"{root / sub}: missing folder (BreCaHAD keeps images/ and groundTruth/ side by side)")
    if problems:
        return problems
    try:
        layout = layout_of(root)
    except ValueError as e:
        return [str(e)]
    images, labels = image_files(root), label_files(root)
    if not images and not labels:
        return [f"{root}: images/ and groundTruth/ are empty"]
    for name in sorted(set(images) - set(labels)):
        problems.append(f"{images[name]}: no ground truth (expected {root / 'groundTruth' / (name + '.json')})")
    for name in sorted(set(labels) - set(images)):
        problems.append(f"{labels[name]}: no image (expected {root / 'images' / (name + '.tif')})")
    for name in sorted(set(images) & set(labels)):
        problem = check_image(images[name], layout)
        if problem:
            problems.append(problem)
            continue
        try:
            _points(images[name], labels[name], layout)
        except ValueError as e:
            problems.append(str(e))
    return problems


def _points(image: Path, label: Path, layout: Layout) -> dict[str, np.ndarray]:
    height, width = image_shape(image)[:2] if layout.imported else layout.shape[:2]
    return read_points(label, width, height, layout.classes)


def load_dataset(root: str | Path) -> list[Sample]:
    """All samples of a valid folder, sorted by name; raises DatasetError listing every problem."""
    root = Path(root)
    problems = check_dataset(root)
    if problems:
        raise DatasetError(root, problems)
    images, labels, layout = image_files(root), label_files(root), layout_of(root)
    return [Sample(name, images[name], _points(images[name], labels[name], layout)) for name in sorted(images)]


def classes_for(classes: tuple[str, ...], root: str | Path) -> tuple[str, ...]:
    """The classes to train or judge on the folder: [all] is every class it names; a class the
    folder lacks is refused, naming the classes it has."""
    layout = layout_of(root)
    chosen = layout.classes if classes == (ALL_CLASSES,) else classes
    missing = [c for c in chosen if c not in layout.classes]
    if missing:
        raise ConfigError(
            f"data.classes: {missing[0]!r} is not a class of {root} (it has {', '.join(layout.classes)}); "
            f"name some of those, or data.classes=[{ALL_CLASSES}] for every one"
        )
    return chosen


def configured_for(cfg: Config, root: str | Path) -> Config:
    """`cfg` to train on the folder: its classes (model.num_classes follows) and the resolution its
    dataset.json records in place of data.mpp."""
    classes = classes_for(cfg.data.classes, root)
    data = dataclasses.replace(cfg.data, classes=classes, mpp=layout_of(root).mpp or cfg.data.mpp)
    fitted = dataclasses.replace(cfg, data=data, model=dataclasses.replace(cfg.model, num_classes=len(classes) + 1))
    check(fitted, f"{cfg.name} on {root}")
    return fitted


def points_to_boxes(points: np.ndarray, box_size: float, width: int, height: int) -> np.ndarray:
    """Square boxes of side `box_size` centred on (x, y) points, clipped to the image: (N, 4) x1y1x2y2."""
    half = box_size / 2.0
    boxes = np.concatenate([points - half, points + half], axis=1) if len(points) else np.zeros((0, 4))
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes.astype(np.float32)


def targets(sample: Sample, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Points of the chosen classes and their labels (1-based; 0 is background)."""
    pts = [sample.points[c] for c in classes]
    labels = [np.full(len(p), i + 1, dtype=np.int64) for i, p in enumerate(pts)]
    return np.concatenate(pts).reshape(-1, 2), np.concatenate(labels)


def content_digest(samples: list[Sample], hashes: dict[str, str]) -> str:
    """One digest for the images and their annotations, for mlflow.log_input."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(hashes[s.name].encode())
        for points in s.points.values():  # in the layout's order: BreCaHAD's keys give its old digests
            h.update(np.ascontiguousarray(points).tobytes())
    return h.hexdigest()[:16]
