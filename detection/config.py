"""One typed, frozen config, loaded from experiments/*.yaml and checked once at the edge.

A YAML file may name `_base_: other.yaml` (relative to itself) and override only what differs,
as mmdetection's configs do. Entry-point overrides are `section.key=value` strings whose values
are parsed as YAML, so `train.epochs=1` and `data.patch_size=[256,340]` both work.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import choices
from .errors import DetectionError

# The config schema's version. A registered model keeps the config it was trained with; when a key
# is renamed or moved, the version goes up and UPGRADES gains the step from the previous one, so
# every model registered before still loads (detectron2 keeps its configs' VERSION the same way).
CONFIG_VERSION = 2
BRECAHAD_CLASSES = ("mitosis", "non_mitosis", "apoptosis", "tumor", "non_tumor", "lumen", "non_lumen")
ALL_CLASSES = "all"  # data.classes=[all]: every class the dataset names, resolved when the data is read
MICRONS_PER_PIXEL = 0.514  # BreCaHAD at 40x: 0.514 x 0.527 um per pixel


PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(DetectionError, ValueError):
    """A config file or override that cannot be used; the message names the key, value and fix."""


@dataclass(frozen=True)
class SplitConfig:
    mode: str = "case"  # "case": no case in two splits; "paper": random images, as the paper did
    seed: int = 0
    # The paper held out 12 of 162 images for validation and 12 for testing.
    val_fraction: float = 0.0741
    test_fraction: float = 0.0741


@dataclass(frozen=True)
class DataConfig:
    classes: tuple[str, ...] = ("tumor",)  # the paper: malignant (tumour) cells against background
    # Side of the square box drawn around each annotated point. BreCaHAD nuclei are about 30-40 px
    # across at 40x; 32 px (16.4 um) covers a nucleus, and after the paper's 2x upsampling it is
    # 64 px, exactly one of the FPN anchor sizes, so the 0.9 IoU threshold can be met.
    box_size: int = 32
    patch_size: tuple[int, int] = (512, 680)  # (height, width): a quarter of a 1024x1360 image
    hflip: bool = True
    # HED stain jitter of training patches (Tellez et al. 2018): each of haematoxylin, eosin and DAB
    # scaled by U(1-s, 1+s) and shifted by U(-s, s) in optical density. 0 (the paper) turns it off.
    stain_jitter: float = 0.0
    val_patches: int = 5  # fixed patches per validation image, the same every epoch
    # Micrometres per pixel of the training images (BreCaHAD at 40x: 0.514 x 0.527, the x value):
    # what turns the match radius into pixels, and counts into densities per mm².
    mpp: float = MICRONS_PER_PIXEL
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    # imagenet (backbone) | coco (detector) | none | path to a state_dict | models:/NAME@ALIAS (or
    # /VERSION): fine-tune a registered version (a fresh box predictor when the class count differs).
    weights: str = "imagenet"
    trainable_backbone_layers: int = 3
    num_classes: int = 2  # background + each class in data.classes
    image_mean: tuple[float, float, float] = (0.75141764, 0.6385864, 0.8118883)
    image_std: tuple[float, float, float] = (0.00398171, 0.00440513, 0.00163838)
    min_size: int = 1024
    max_size: int = 1360
    rpn_fg_iou_thresh: float = 0.9
    rpn_bg_iou_thresh: float = 0.1
    rpn_nms_thresh: float = 0.8
    box_fg_iou_thresh: float = 0.9
    box_bg_iou_thresh: float = 0.1
    box_nms_thresh: float = 0.8
    box_score_thresh: float = 0.05
    # Per-class thresholds, in data.classes order, applied after post-processing (tune's study of a
    # version with several classes picks them); empty: box_score_thresh alone for every class.
    class_score_thresh: tuple[float, ...] = ()
    # Per model input: per tile of a whole image and per patch, as torchvision applies it, in every
    # evaluation protocol, in predict and in the served model (the cap grows with the image's area).
    box_detections_per_img: int = 200
    # One NMS over every class (a cell gets one label) instead of one per class.
    box_nms_class_agnostic: bool = False
    roi_featmap_names: tuple[str, ...] = ("0", "1")
    roi_output_size: int = 21
    roi_sampling_ratio: int = 2
    representation_size: int = 1024


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 1
    # The paper does not name its optimizer. 2e-5 is an Adam-scale rate (SGD would barely move in
    # 100 epochs at it), and Adam with L2 weight decay is the common PyTorch recipe of the time.
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 2e-5
    lr_decay: float = 0.98  # multiplied into the learning rate after every epoch
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    amp: bool = True  # CUDA only: bf16 autocast where the card has it, else fp16 with loss scaling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    figure_every: int = 10  # log validation overlays every N epochs and after the last one
    # Upload the checkpoint every N epochs and after the last one; the latest is on local disk every
    # epoch. A paper.yaml checkpoint is ~1.7 GB (weights plus Adam's two moments).
    checkpoint_every: int = 10
    # Log the epoch's model (weights and config, no optimizer) as an MLflow LoggedModel every N
    # epochs and after the last one, its validation metrics linked to it: 0.58 GB a paper.yaml model.
    model_every: int = 10
    workers: int = -1  # DataLoader processes making patches; -1: on CUDA one per core but one (at most 4), else 0


@dataclass(frozen=True)
class EvalConfig:
    # A detection matches a cell when its box centre lies within this radius of the point, in um:
    # MIDOG's 7.5 um (14.6 px at 0.514 um/px), about a tumour nucleus's radius. Pixels follow from
    # the images' resolution (data.mpp unless their TIFF records one).
    match_radius_um: float = 7.5
    # Paper protocol: a cell or detection whose centre lies within this many px of a patch edge that
    # is not an image edge is neither TP, FP nor FN (the nucleus may be cut off by the patch).
    border_band: float = 16.0
    # Test-time augmentation (detection/tta.py): flips to run beside the image, e.g. [none, h, v, hv];
    # empty (the paper) runs the image alone. Fused scores are thresholded at tta_thresh.
    tta_views: tuple[str, ...] = ()
    tta_thresh: float = 0.05


@dataclass(frozen=True)
class SecondLookConfig:
    # A learned second look (detection/second_look.py): a ResNet-18 on a crop around each kept
    # detection, trained on the detector's own true and false positives of the training split by
    # `python -m detection second-look`, which also sets weight and thresh on the val split.
    # Fused score: (1 - weight) x detector + weight x classifier, kept above thresh. weight 0 (the
    # paper) turns it off; a version with weight > 0 carries the classifier's weights.
    weight: float = 0.0
    thresh: float = 0.05
    crop: int = 64  # px side of the square crop, centred on the detection: a nucleus and its surroundings
    epochs: int = 10
    lr: float = 1.0e-3
    batch_size: int = 64
    # Crops per split at most, drawn at random; a class with fewer than half keeps all of its own (a
    # detector at the paper's 0.05 threshold keeps tens of false positives per true one).
    max_examples: int = 20000


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "brecahad"  # used when not launched by `mlflow run`
    registered_model: str = choices.MODEL_NAME
    alias: str = choices.CHALLENGER
    system_metrics: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    second_look: SecondLookConfig = field(default_factory=SecondLookConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str = "default"
    version: int = CONFIG_VERSION  # a file without it was written before versions: version 1

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Every resolved value as `section.key` (nested sections joined by dots), for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = v

        walk("", self.to_dict())
        return out

    @property
    def match_radius_px(self) -> float:
        """The match radius in pixels of images at the training resolution."""
        return self.eval.match_radius_um / self.data.mpp

    def replace(self, *overrides: str) -> Config:
        return from_dict(_merge(self.to_dict(), parse_overrides(overrides)), source="overrides")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """`["train.epochs=1", "data.box_size=30"]` (or one space-separated string) as a nested dict."""
    tree: dict[str, Any] = {}
    for item in [tok for o in overrides if o for tok in o.split()]:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value, e.g. train.epochs=1")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML ({e})") from None
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pick one of experiments/*.yaml")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(doc).__name__}")
    base = doc.pop("_base_", None)
    if base is None:
        return doc
    return _merge(_read_yaml(path.parent / base, seen + (path,)), doc)


def locate(path: str | Path) -> Path:
    """A config path as given (absolute, or relative to the working directory); failing that,
    relative to the project, so `experiments/smoke.yaml` resolves from any directory and under
    `mlflow run` from a git URL."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    inside = PROJECT_ROOT / path
    return inside if inside.exists() else path


def load(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a config file, apply `section.key=value` overrides, and check the result."""
    path = locate(path)
    tree = _read_yaml(path)
    tree.setdefault("name", path.stem)
    top = parse_overrides(overrides)
    unknown = _unknown_key(Config, top)
    if unknown:  # the typo is in the override, not in the file
        key, valid = unknown
        raise ConfigError(f"unknown key {key} in the overrides (not in {path}); valid keys here: {', '.join(valid)}")
    return from_dict(_merge(tree, top), source=str(path))


def _unknown_key(cls: type, tree: dict[str, Any], prefix: str = "") -> tuple[str, list[str]] | None:
    """The first key of an override tree that `cls` has no field for, and the keys valid there."""
    hints = typing.get_type_hints(cls)
    for key, value in tree.items():
        if key not in hints:
            return prefix + key, sorted(f.name for f in dataclasses.fields(cls))
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            found = _unknown_key(hints[key], value, f"{prefix}{key}.")
            if found:
                return found
    return None


# UPGRADES[v] turns a version-v config tree into a version v+1 one. Steps only rename and move keys
# (rename_key); a value whose meaning changed needs a new key, or old models would change behaviour.
def _radius_in_micrometres(tree: dict[str, Any]) -> dict[str, Any]:
    """Version 1 gave the match radius in pixels of BreCaHAD images (eval.match_radius); version 2 in
    micrometres (eval.match_radius_um), with the same pixels at data.mpp."""
    tree = copy.deepcopy(tree)
    section = tree.get("eval")
    if isinstance(section, dict) and "match_radius" in section:
        px = section.pop("match_radius")
        section["match_radius_um"] = round(float(px) * MICRONS_PER_PIXEL, 9) if isinstance(px, (int, float)) else px
    return tree


UPGRADES: dict[int, typing.Callable[[dict[str, Any]], dict[str, Any]]] = {1: _radius_in_micrometres}


def rename_key(tree: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of `tree` with the dotted key `old` (e.g. 'tracking.system_metrics') moved to `new`."""
    tree = copy.deepcopy(tree)
    *parents, leaf = old.split(".")
    node = tree
    for p in parents:
        node = node.get(p)
        if not isinstance(node, dict):
            return tree
    if leaf not in node:
        return tree
    value = node.pop(leaf)
    *parents, leaf = new.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return tree


def upgrade(tree: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A config tree of any earlier version as one of CONFIG_VERSION, step by step."""
    tree = copy.deepcopy(tree)
    version = tree.get("version", 1)
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        why = (
            "a newer release of brecahad-detection wrote it: upgrade the package"
            if isinstance(version, int) and version > CONFIG_VERSION
            else "a config version is a whole number from 1"
        )
        raise ConfigError(
            f"{source}: version={version!r} is not a config version this release reads (1 to {CONFIG_VERSION}); {why}"
        )
    for v in range(version, CONFIG_VERSION):
        tree = UPGRADES[v](tree)
    tree["version"] = CONFIG_VERSION
    return tree


def from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """The typed, checked config of a tree of any version (a file, or a registered model's)."""
    cfg = _build(Config, upgrade(tree, source), source, "")
    check(cfg, source)
    return cfg


def _build(cls: type, tree: Any, source: str, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, source, prefix + k) for k, v in tree.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, source, key) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), source, key)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return _finite(float(value), source, key)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, bool, str, float) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value


def _finite(value: float, source: str, key: str) -> float:
    """No setting means anything at NaN or infinity (a learning rate of .inf trains nothing)."""
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    return value


def is_registered(weights: str) -> bool:
    """model.weights names a registered version to fine-tune."""
    return weights.startswith("models:/") and len(weights) > len("models:/")


def check(cfg: Config, source: str = "config") -> None:
    """Cross-field checks; each message names the key, the value and what would be accepted."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    d, m, t, s = cfg.data, cfg.model, cfg.train, cfg.data.split
    # Which names exist is the dataset's to say (BreCaHAD's seven keys, or an imported class map):
    # data.configured_for checks them against the folder, and [all] takes every one of them.
    need(
        len(d.classes) > 0 and len(set(d.classes)) == len(d.classes) and all(c.strip() for c in d.classes),
        f"data.classes {list(d.classes)} must be non-empty and unique",
    )
    need(
        ALL_CLASSES not in d.classes or len(d.classes) == 1,
        f"data.classes {list(d.classes)}: [{ALL_CLASSES}] stands alone (every class of the dataset)",
    )
    need(
        d.classes == (ALL_CLASSES,) or m.num_classes == len(d.classes) + 1,
        f"model.num_classes={m.num_classes} must be len(data.classes)+1 = {len(d.classes) + 1} "
        f"(background + {list(d.classes)})",
    )
    need(d.box_size > 0, f"data.box_size={d.box_size} must be > 0 pixels")
    need(
        all(p >= 2 * d.box_size for p in d.patch_size),
        f"data.patch_size={list(d.patch_size)} must be at least twice data.box_size ({2 * d.box_size} px) a side "
        f"(height, width): a patch must hold a cell and its surroundings",
    )
    need(d.val_patches > 0, f"data.val_patches={d.val_patches} must be > 0")
    need(s.mode in ("case", "paper"), f"data.split.mode={s.mode!r} must be 'case' or 'paper'")
    need(
        0 < s.val_fraction < 1 and 0 < s.test_fraction < 1 and s.val_fraction + s.test_fraction < 1,
        f"data.split val_fraction={s.val_fraction}, test_fraction={s.test_fraction} must be in (0, 1) and sum below 1",
    )
    need(
        m.backbone in ("resnet18", "resnet34", "resnet50", "resnet101"),
        f"model.backbone={m.backbone!r} must be resnet18, resnet34, resnet50 or resnet101",
    )
    need(
        m.weights in ("imagenet", "coco", "none") or m.weights.endswith((".pt", ".pth")) or is_registered(m.weights),
        f"model.weights={m.weights!r} must be imagenet, coco, none, a path to a .pt/.pth state_dict or a "
        f"registered version (models:/NAME@ALIAS or models:/NAME/VERSION)",
    )
    need(
        m.weights != "coco" or m.backbone == "resnet50",
        f"model.weights=coco needs model.backbone=resnet50, not {m.backbone}",
    )
    need(
        0 <= m.trainable_backbone_layers <= 5,
        f"model.trainable_backbone_layers={m.trainable_backbone_layers} must be 0..5",
    )
    need(all(x > 0 for x in m.image_std), f"model.image_std={list(m.image_std)} must be > 0 in every channel")
    need(0 < m.min_size <= m.max_size, f"model.min_size={m.min_size} must be > 0 and <= model.max_size={m.max_size}")
    for name in (
        "rpn_fg_iou_thresh",
        "rpn_bg_iou_thresh",
        "rpn_nms_thresh",
        "box_fg_iou_thresh",
        "box_bg_iou_thresh",
        "box_nms_thresh",
        "box_score_thresh",
    ):
        v = getattr(m, name)
        need(0.0 <= v <= 1.0, f"model.{name}={v} must be in [0, 1]")
    need(
        m.rpn_bg_iou_thresh <= m.rpn_fg_iou_thresh,
        f"model.rpn_bg_iou_thresh={m.rpn_bg_iou_thresh} must be <= rpn_fg_iou_thresh={m.rpn_fg_iou_thresh}",
    )
    need(
        m.box_bg_iou_thresh <= m.box_fg_iou_thresh,
        f"model.box_bg_iou_thresh={m.box_bg_iou_thresh} must be <= box_fg_iou_thresh={m.box_fg_iou_thresh}",
    )
    need(
        all(0.0 <= t <= 1.0 for t in m.class_score_thresh)
        and (not m.class_score_thresh or d.classes == (ALL_CLASSES,) or len(m.class_score_thresh) == len(d.classes)),
        f"model.class_score_thresh={list(m.class_score_thresh)} must hold one threshold in [0, 1] per class "
        f"of data.classes {list(d.classes)}, or none",
    )
    need(m.box_detections_per_img > 0, f"model.box_detections_per_img={m.box_detections_per_img} must be > 0")
    need(
        set(m.roi_featmap_names) <= {"0", "1", "2", "3", "pool"} and len(m.roi_featmap_names) > 0,
        f"model.roi_featmap_names={list(m.roi_featmap_names)} must be FPN levels among 0, 1, 2, 3, pool",
    )
    need(
        m.roi_output_size > 0 and m.representation_size > 0,
        "model.roi_output_size and model.representation_size must be > 0",
    )
    need(t.epochs > 0, f"train.epochs={t.epochs} must be > 0")
    need(t.batch_size > 0, f"train.batch_size={t.batch_size} must be > 0")
    need(t.optimizer in ("adam", "adamw", "sgd"), f"train.optimizer={t.optimizer!r} must be adam, adamw or sgd")
    need(t.lr > 0, f"train.lr={t.lr} must be > 0")
    need(0 < t.lr_decay <= 1, f"train.lr_decay={t.lr_decay} must be in (0, 1]")
    need(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    need(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device={t.device!r} must be auto, cpu, cuda or cuda:N",
    )
    need(t.figure_every > 0, f"train.figure_every={t.figure_every} must be > 0")
    need(t.workers >= -1, f"train.workers={t.workers} must be >= 0, or -1 for one per core but one")
    e = cfg.eval
    views = choices.TTA_VIEWS
    need(
        all(v in views for v in e.tta_views)
        and len(set(e.tta_views)) == len(e.tta_views)
        and (not e.tta_views or "none" in e.tta_views),
        f"eval.tta_views={list(e.tta_views)} must be distinct views of {list(views)} including none, or []",
    )
    need(0 <= e.tta_thresh < 1, f"eval.tta_thresh={e.tta_thresh} must be within [0, 1)")
    need(0 <= d.stain_jitter <= 0.5, f"data.stain_jitter={d.stain_jitter} must be within 0..0.5 (0.05 is usual)")
    sl = cfg.second_look
    need(0 <= sl.weight <= 1, f"second_look.weight={sl.weight} must be within [0, 1] (0 turns the second look off)")
    need(0 <= sl.thresh < 1, f"second_look.thresh={sl.thresh} must be within [0, 1)")
    need(32 <= sl.crop <= 256, f"second_look.crop={sl.crop} must be 32..256 px")
    need(sl.max_examples >= 2, f"second_look.max_examples={sl.max_examples} must be >= 2")
    need(
        sl.epochs > 0 and sl.batch_size > 0 and sl.lr > 0,
        f"second_look epochs={sl.epochs}, batch_size={sl.batch_size}, lr={sl.lr} must all be > 0",
    )
    need(t.checkpoint_every > 0, f"train.checkpoint_every={t.checkpoint_every} must be > 0")
    need(t.model_every > 0, f"train.model_every={t.model_every} must be > 0")
    need(cfg.eval.match_radius_um > 0, f"eval.match_radius_um={cfg.eval.match_radius_um} must be > 0 micrometres")
    need(
        0.05 <= d.mpp <= 20, f"data.mpp={d.mpp} must be micrometres per pixel (BreCaHAD 0.514; many 40x scanners 0.25)"
    )
    need(cfg.eval.border_band >= 0, f"eval.border_band={cfg.eval.border_band} must be >= 0 pixels")
    need(bool(cfg.tracking.registered_model.strip()), "tracking.registered_model must not be empty")
    need(bool(cfg.tracking.experiment.strip()), "tracking.experiment must not be empty (brecahad is the default)")
    reserved = choices.promoted_alias_problem(cfg.tracking.alias)
    need(reserved is None, f"tracking.alias: {reserved}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
