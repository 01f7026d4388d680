"""Judge a registered model on images it never saw, as the paper did and better.

resolve the model and its recorded split -> refuse leakage -> one raw inference pass (cached)
-> replay the model's post-processing -> metrics, intervals, AP, curves, figures -> one MLflow run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import figures, tracking
from .config import Config
from .data import Sample, content_digest, load_dataset
from .engine import pick_device
from .inference import Cache, Item, paper_items, raw_inference, whole_items
from .matching import MATCHERS, Counts
from .metrics import bootstrap, coco_ap, curve, per_image, score
from .postprocess import PostProcess
from .progress import Bar
from .split import Split

PROTOCOLS = ("paper", "whole")
SPLIT_CHOICES = ("test", "val", "all")
MAX_OVERLAYS = 24
CACHE_NAME = "predictions.npz"


class EvaluationError(ValueError):
    """Bad input to an evaluation, found before any run or registry entry is written."""


@dataclass(frozen=True)
class Request:
    model: str
    data_dir: Path
    split: str = "test"
    protocol: str = "paper"
    matching: str = "greedy"
    seed: int = 0
    allow_overlap: bool = False
    device: str = "auto"

    def check(self) -> None:
        for name, value, choices in (("split", self.split, SPLIT_CHOICES), ("protocol", self.protocol, PROTOCOLS),
                                     ("matching", self.matching, MATCHERS)):
            if value not in choices:
                raise EvaluationError(f"{name}={value!r} must be one of {', '.join(choices)}")


def recorded_split(ref: tracking.ModelRef) -> Split:
    if not ref.run_id:
        raise EvaluationError(f"{ref.uri} (version {ref.version}) has no training run; use split=all")
    try:
        return Split.from_dict(yaml.safe_load(tracking.read_artifact_text(ref.run_id, "split.json")))
    except tracking.TrackingError:
        raise EvaluationError(
            f"{ref.uri} (version {ref.version}): its training run {ref.run_id} recorded no split.json, "
            f"so its held-out images are unknown; evaluate a folder of new images with split=all") from None


def select(req: Request, split: Split | None) -> tuple[list[Sample], dict[str, str]]:
    """The samples to evaluate and the content hash of each."""
    samples = load_dataset(req.data_dir)
    if req.split != "all":
        wanted = split.names(req.split)
        by_name = {s.name: s for s in samples}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise EvaluationError(
                f"{req.data_dir} lacks {len(missing)} of the {len(wanted)} {req.split} images recorded by the "
                f"model's training run: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        samples = [by_name[n] for n in wanted]
    if not samples:
        raise EvaluationError(f"no {req.split} images to evaluate in {req.data_dir}")
    return samples, {s.name: s.sha256() for s in samples}


def leaked(split: Split | None, hashes: dict[str, str]) -> list[str]:
    """Evaluated images whose content was in the model's training split."""
    if split is None:
        return []
    trained = {split.sha256[n] for n in split.train if n in split.sha256}
    return sorted(n for n, h in hashes.items() if h in trained)


def operating_metrics(counts: Counts) -> dict[str, float]:
    return {"detection_rate": counts.detection_rate, "fdr": counts.false_discovery_rate,
            "precision": counts.precision, "f1": counts.f1, "tp": counts.tp, "fp": counts.fp, "fn": counts.fn}


@dataclass
class Report:
    metrics: dict[str, float]
    images: pd.DataFrame
    curve: pd.DataFrame
    kept: list[np.ndarray]


def judge(cache: Cache, pp: PostProcess, matching: str, radius: float, seed: int = 0) -> Report:
    """Every metric of a cache at the post-processing `pp`; pure, so a later run can recompute it."""
    scored = score(cache, pp, matching, radius)
    total = sum(scored.counts(), Counts(0, 0, 0))
    images = per_image(cache, scored)
    metrics = operating_metrics(total)
    for name, (low, high) in bootstrap(images, seed).items():
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    metrics["ap"], metrics["ap50"] = coco_ap(cache, scored.kept)
    return Report(metrics, images, curve(cache, pp, matching, radius), scored.kept)


def _items_and_cache(req: Request, cfg: Config, model, samples: list[Sample]) -> tuple[list[Item], Cache]:
    items = paper_items(samples, cfg, req.seed) if req.protocol == "paper" else whole_items(samples, cfg)
    with Bar(len(items), f"infer ({req.protocol})", every=max(1, len(items) // 10)) as bar:
        cache = raw_inference(model, items, cfg, pick_device(req.device), on_item=bar.advance)
    return items, cache


def log_report(tr: tracking.Tracker, prefix: str, report: Report, cache: Cache, items: list[Item],
               pp: PostProcess) -> None:
    tr.log_metrics({f"{prefix}/{k}": v for k, v in report.metrics.items() if np.isfinite(v)}, step=0)
    tr.log_table(report.images, f"{prefix}_per_image.json")
    tr.log_text(report.curve.to_csv(index=False), f"{prefix}_threshold_curve.csv")
    title = f"{prefix}: {len(report.images)} images, {len(cache)} items"
    for fig, name in ((figures.threshold_curve(report.curve, pp.score_thresh, title), "fig4_tpr_fdr.png"),
                      (figures.pr_curve(report.curve, pp.score_thresh, title), "precision_recall.png")):
        tr.log_figure(fig, f"figures/{name}")
        figures.close(fig)
    shown: set[str] = set()
    for i, item in enumerate(items):
        if item.name in shown or len(shown) >= MAX_OVERLAYS:
            continue
        shown.add(item.name)
        boxes, scores, _ = cache.detections(i)
        k = report.kept[i]
        fig = figures.overlay(item.image, cache.ground_truth(i)[2], boxes[k], scores[k],
                              f"{item.name} at {item.origin}, score > {pp.score_thresh:g}")
        tr.log_figure(fig, f"overlays/{item.name}.png")
        figures.close(fig)


def evaluate(req: Request, parent: str | None = None) -> tuple[str, dict[str, float]]:
    """Run one evaluation (nested under `parent` if given); returns the run id and the metrics
    logged under `{split}/`."""
    req.check()
    tracking.check_reachable()
    ref = tracking.resolve_model(req.model)
    split = recorded_split(ref) if req.split != "all" else _optional_split(ref)
    samples, hashes = select(req, split)
    overlap = leaked(split, hashes)
    if overlap and not req.allow_overlap:
        raise EvaluationError(
            f"{len(overlap)} evaluated image(s) were in the training split of {ref.uri} (by content hash): "
            f"{', '.join(overlap[:8])}; pass allow_overlap=true to evaluate anyway (the run is tagged)")
    detector = tracking.load_model(ref)
    cfg, model = detector.config, detector.model
    pp = PostProcess.of_config(cfg.model)
    with tracking.run(cfg.tracking.experiment, parent=parent, name=f"evaluate-{req.split}-{req.protocol}") as tr:
        tr.set_tags({"model_name": ref.name, "model_version": ref.version, "training_run_id": ref.run_id or "",
                     "model_uri": ref.uri, "protocol": req.protocol, "split": req.split, "matching": req.matching,
                     "seed": req.seed,
                     "evaluation": "true", "data_digest": content_digest(samples, hashes)}
                    | ({"allow_overlap": "true", "overlap_images": ",".join(overlap)[:4000]} if req.allow_overlap else {}))
        tr.log_params({"eval.model": ref.uri, "eval.model_version": ref.version, "eval.data_dir": str(req.data_dir),
                       "eval.split": req.split, "eval.protocol": req.protocol, "eval.matching": req.matching,
                       "eval.seed": req.seed, "eval.match_radius": cfg.eval.match_radius,
                       "eval.score_thresh": pp.score_thresh, "eval.nms_thresh": pp.nms_thresh,
                       "eval.detections_per_img": pp.detections_per_img, "eval.images": len(samples)})
        items, cache = _items_and_cache(req, cfg, model, samples)
        cache.meta = {"model_uri": ref.uri, "model_name": ref.name, "model_version": ref.version,
                      "training_run_id": ref.run_id, "protocol": req.protocol, "split": req.split, "seed": req.seed,
                      "classes": list(cfg.data.classes), "box_size": cfg.data.box_size,
                      "match_radius": cfg.eval.match_radius, "postprocess": pp.__dict__, "sha256": hashes}
        with tempfile.TemporaryDirectory(prefix="brecahad-eval-") as tmp:
            tr.log_file(cache.save(Path(tmp) / CACHE_NAME), None)
        report = judge(cache, pp, req.matching, cfg.eval.match_radius, req.seed)
        log_report(tr, req.split, report, cache, items, pp)
        return tr.run_id, report.metrics


def _optional_split(ref: tracking.ModelRef) -> Split | None:
    """For split=all the recorded split only guards against leakage; a model without one still evaluates."""
    try:
        return recorded_split(ref)
    except EvaluationError:
        return None


def earlier_evaluation(req: Request, same_matching: bool):
    """A finished evaluation of the same model version, split, protocol and seed on the same image
    contents (and, if asked, the same matching), or None. Returns (run, image digest)."""
    ref = tracking.resolve_model(req.model)
    split = recorded_split(ref) if req.split != "all" else _optional_split(ref)
    digest = content_digest(*select(req, split))
    query = (f"tags.`detection.evaluation` = 'true' and tags.`detection.model_name` = '{ref.name}' and "
             f"tags.`detection.model_version` = '{ref.version}' and tags.`detection.split` = '{req.split}' and "
             f"tags.`detection.protocol` = '{req.protocol}' and tags.`detection.seed` = '{req.seed}' and "
             f"tags.`detection.data_digest` = '{digest}'")
    if same_matching:
        query += f" and tags.`detection.matching` = '{req.matching}'"
    found = tracking.find_runs(query)
    return (found[0] if found else None), digest


def cached_evaluation(req: Request, parent: str | None = None) -> tuple[str, Cache]:
    """The raw predictions of an earlier evaluation (matching plays no part in them), or of a new
    one: the tune study replays them instead of running the model."""
    run, _ = earlier_evaluation(req, same_matching=False)
    run_id = run.info.run_id if run else evaluate(req, parent)[0]
    return run_id, load_cache(run_id)


def load_cache(run_id: str) -> Cache:
    """The prediction cache an evaluation run logged, for recomputation or tuning."""
    with tempfile.TemporaryDirectory(prefix="brecahad-cache-") as tmp:
        path = tracking.download_if_present(run_id, CACHE_NAME, Path(tmp))
        if path is None:
            raise EvaluationError(f"run {run_id} has no {CACHE_NAME}; it is not an evaluation run")
        return Cache.load(path)

