"""A learned second look: the paper's score-level fusion of two networks, to drop false positives.

The detector keeps what it keeps (its post-processing, and the fused flips where the version has
them). A small classifier, ResNet-18 on a `second_look.crop`-pixel square centred on each kept
detection, says how much the crop looks like a tumour cell. The version reports

    fused score = (1 - weight) x detector score + weight x classifier probability

above `second_look.thresh`. The classifier learns from the detector's own true and false positives
on the training split (a detection is true when it matches a cell within the match radius). Weight
and threshold are chosen on the val split: the weight whose fused score has the lowest FDR at the
detection rate the version reaches alone, and the highest threshold that still reaches that rate,
so the second look removes false positives and keeps the true positives.

This module is the stage over caches (what the detector kept, rescored and re-thresholded), which
the pipeline runs for evaluate and the served model; the network is classifier.py, and
`second_look_train.py` trains it, chooses the weight and registers the pair as a new version
(`python -m detection second-look --model models:/NAME/V`; one pyfunc runs both).
"""

from __future__ import annotations

import numpy as np
import torch

from .classifier import fused_score, probabilities
from .config import Config
from .errors import DetectionError
from .inference import Cache, Runtime
from .postprocess import PostProcess
from .progress import Bar
from .tta import fused_postprocess, kept_cache, kept_in_view, kept_where


class SecondLookError(DetectionError, ValueError):
    """A second look that cannot be trained or used; the message names the fix."""


# --- on caches (evaluate, and choosing the weight) ----------------------------------------------


def above(cache: Cache, thresh: float) -> Cache:
    """A kept cache reduced to detections scoring above `thresh`."""
    return kept_where(cache, lambda k: cache.det_scores[k] > np.float32(thresh), {})


def kept(cache: Cache, pp: PostProcess, radius: float) -> Cache:
    """What `pp` keeps of a cache, as a kept cache (one pseudo-tile per item): a raw cache is
    post-processed as the deployed detector does it, a kept one (fused flips) thresholded."""
    if cache.meta.get("kept"):
        return above(cache, pp.score_thresh)
    return kept_cache(
        cache, [kept_in_view(cache, i, "none", pp, radius) for i in range(len(cache))], {"postprocess": pp.__dict__}
    )


def item_probabilities(
    net: torch.nn.Module, cache: Cache, images: list[np.ndarray], size: int, rt: Runtime, progress: bool = True
) -> list[np.ndarray]:
    """The classifier's probabilities of each item's kept detections, item by item."""
    out = []
    with Bar(len(cache), f"second look ({rt.device})", every=max(1, len(cache) // 10), quiet=not progress) as bar:
        for i in range(len(cache)):
            lo, hi = cache.det_range(i)
            out.append(probabilities(net, images[i], cache.det_boxes[lo:hi], size, rt))
            bar.advance()
    return out


def rescored(cache: Cache, probs: list[np.ndarray], weight: float) -> Cache:
    """A kept cache with each detection's score fused with the classifier's (re-sorted per item)."""
    parts = []
    for i in range(len(cache)):
        lo, hi = cache.det_range(i)
        parts.append(
            (cache.det_boxes[lo:hi], fused_score(cache.det_scores[lo:hi], probs[i], weight), cache.det_labels[lo:hi])
        )
    return kept_cache(cache, parts, {"second_look_weight": weight})


def apply(
    cache: Cache, images: list[np.ndarray], net: torch.nn.Module, cfg: Config, rt: Runtime, progress: bool = True
) -> tuple[Cache, PostProcess]:
    """The version's second look over a kept cache: the rescored cache and what judges it."""
    probs = item_probabilities(net, cache, images, cfg.second_look.crop, rt, progress)
    return rescored(cache, probs, cfg.second_look.weight), fused_postprocess(cfg.second_look.thresh)
