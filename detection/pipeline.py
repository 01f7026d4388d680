"""What a registered version does to images, as one list of stages:

    raw views (the image and each test-time flip, every candidate box kept)
    -> post-processing (the version's score threshold, NMS and top-k, replayed per tile)
    -> flip fusion (eval.tta_views)  -> per-class thresholds (model.class_score_thresh)
    -> second look (a classifier rescoring what is kept)

built once from the config. Every stage works on caches (inference.Cache), so the evaluation of a
split and the served model's one image run the same code: `evaluate`, `second-look`, `predict` and
the pyfunc call `Pipeline.run`, and `detect` is that run on one image at a time. A new stage (a
slide tiler, another rescorer) is one class with `__call__(views, step, images) -> Step`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from . import export, second_look
from .config import Config
from .inference import Cache, Item, Runtime, raw_inference
from .postprocess import PostProcess
from .progress import Bar
from .tta import flip, fused_cache, fused_postprocess, kept_where


@dataclass(frozen=True)
class Step:
    """Detections between stages: a cache (raw, or kept) and the post-processing that keeps the
    version's detections from it."""

    cache: Cache
    pp: PostProcess


class Stage(Protocol):
    def __call__(self, views: dict[str, Cache], step: Step, images: list[np.ndarray]) -> Step: ...


@dataclass(frozen=True)
class FuseFlips:
    """Test-time flips: each view post-processed, fused per cell, thresholded at eval.tta_thresh."""

    thresh: float
    radius: float

    def __call__(self, views: dict[str, Cache], step: Step, images: list[np.ndarray]) -> Step:
        return Step(fused_cache(views, step.pp, self.radius), fused_postprocess(self.thresh))


@dataclass(frozen=True)
class ClassThresholds:
    """Each class kept above its own score threshold (label 1 first), after what came before."""

    thresholds: tuple[float, ...]
    radius: float

    def __call__(self, views: dict[str, Cache], step: Step, images: list[np.ndarray]) -> Step:
        kept = second_look.kept(step.cache, step.pp, self.radius)
        bars = np.asarray(self.thresholds, np.float32)
        meta = {"class_score_thresh": list(self.thresholds)}
        passed = kept_where(kept, lambda k: kept.det_scores[k] > bars[kept.det_labels[k] - 1], meta)
        # What passed is judged as kept: above the lowest threshold, which every survivor clears.
        return Step(passed, fused_postprocess(min(bars)))


def replay_stages(radius: float, tta_thresh: float | None, class_thresh: tuple[float, ...] = ()) -> tuple:
    """The stages over caches that a version's flips and per-class thresholds add (tune replays
    each trial's settings through them; Pipeline.of builds the same from a config)."""
    stages: list[Stage] = []
    if tta_thresh is not None:
        stages.append(FuseFlips(tta_thresh, radius))
    if class_thresh:
        stages.append(ClassThresholds(tuple(class_thresh), radius))
    return tuple(stages)


@dataclass(frozen=True)
class SecondLook:
    """The classifier's probability fused with each kept detection's score, re-thresholded."""

    net: torch.nn.Module
    cfg: Config
    rt: Runtime
    radius: float
    progress: bool = True

    def __call__(self, views: dict[str, Cache], step: Step, images: list[np.ndarray]) -> Step:
        kept = second_look.kept(step.cache, step.pp, self.radius)
        return Step(*second_look.apply(kept, images, self.net, self.cfg, self.rt, self.progress))


@dataclass(frozen=True)
class Pipeline:
    pp: PostProcess  # the version's own post-processing, applied to the raw views
    radius: float  # px: merging across tile cuts, fusing flips and keeping share the match radius
    stages: tuple[Stage, ...]

    @classmethod
    def of(
        cls,
        cfg: Config,
        radius: float,
        second_look_net: torch.nn.Module | None = None,
        rt: Runtime | None = None,
        progress: bool = True,
    ) -> Pipeline:
        tta_thresh = cfg.eval.tta_thresh if cfg.eval.tta_views else None
        stages = list(replay_stages(radius, tta_thresh, cfg.model.class_score_thresh))
        if second_look_net is not None:
            stages.append(SecondLook(second_look_net, cfg, rt or Runtime(torch.device("cpu")), radius, progress))
        return cls(PostProcess.of_config(cfg.model), radius, tuple(stages))

    def run(self, views: dict[str, Cache], images: list[np.ndarray]) -> Step:
        """What the version reports on the items of `views` (`images`: their pixels, unflipped)."""
        step = Step(views["none"], self.pp)
        for stage in self.stages:
            step = stage(views, step, images)
        return step

    def kept(self, step: Step) -> Cache:
        """The detections the version reports, one pseudo-tile per item, best first."""
        return second_look.kept(step.cache, step.pp, self.radius)


def raw_views(model, items: list[Item], cfg: Config, rt: Runtime, label: str | None = None) -> dict[str, Cache]:
    """The raw cache of the items and of each test-time flip (eval.tta_views), each in its own
    (flipped) pixels; with `label`, a progress bar per view."""
    views = {}
    for view in ("none", *(v for v in cfg.eval.tta_views if v != "none")):
        flipped = items if view == "none" else [replace(it, image=flip(it.image, view)) for it in items]
        if label is None:
            views[view] = raw_inference(model, flipped, cfg, rt)
            continue
        title = label if view == "none" else f"{label}, flip {view}"
        with Bar(len(items), title, every=max(1, len(items) // 10)) as bar:
            views[view] = raw_inference(model, flipped, cfg, rt, on_item=bar.advance)
    return views


def image_item(image: np.ndarray, i: int) -> Item:
    """A whole image without annotations, as the served model gets it."""
    none = np.zeros((0, 2), np.float32)
    return Item(f"image {i}", (0, 0), image, none, np.zeros(0, np.int64), tuple(image.shape[:2]))


def detect(
    model: torch.nn.Module,
    images: list[np.ndarray],
    cfg: Config,
    rt: Runtime | None = None,
    second_look_net: torch.nn.Module | None = None,
) -> pd.DataFrame:
    """The version's detections on whole images: the pipeline the `whole` evaluation runs, on one
    image at a time (memory stays that of one image)."""
    rt = rt or Runtime(torch.device("cpu"))
    pipe = Pipeline.of(cfg, cfg.match_radius_px, second_look_net, rt, progress=False)
    rows = []
    for i, image in enumerate(images):
        kept = pipe.kept(pipe.run(raw_views(model, [image_item(image, i)], cfg, rt), [image]))
        rows.append(export.table(kept.det_boxes, kept.det_scores, kept.det_labels, cfg.data.classes, i))
    return pd.concat(rows, ignore_index=True)
