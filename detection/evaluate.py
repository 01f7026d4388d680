"""Judge a registered model on images it never saw, as the paper did and better.

resolve the model and its recorded split -> refuse leakage -> one raw inference pass (cached)
-> replay the model's post-processing -> metrics, intervals, AP, curves, figures -> one MLflow run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, model_card, tracking
from .config import Config
from .data import Sample, classes_for, content_digest
from .engine import PRECISION_NAMES
from .export import table, to_geojson
from .heldout import EvaluationError, Request, guard, recorded_split, select
from .inference import Cache, Item, Runtime, cell_coverage, paper_items, whole_items
from .matching import Counts
from .metrics import (
    Intervals,
    Scored,
    area_mm2,
    bootstrap,
    box_ap,
    curve,
    exact_curve,
    froc,
    per_image,
    point_ap,
    score,
)
from .pipeline import Pipeline, raw_views
from .postprocess import PostProcess
from .provenance import code_digest
from .split import Split

COUNT_UNITS = {"whole": "cells", "paper": "cell-patch pairs"}
DATASET_CONTEXTS = {"test": "testing", "val": "validation", "all": "evaluation"}  # MLflow's input contexts
MAX_OVERLAYS = 24
CACHE_NAME = "predictions.npz"
PIPELINE_CACHE_NAME = "predictions_reported.npz"  # fused and/or rescored: what the version reports


def resolution(req: Request, cfg: Config, samples: list[Sample]) -> tuple[float, float]:
    """(micrometres per pixel, match radius in micrometres) of an evaluation: the images' own
    resolution where their TIFF records one, else the training images' (data.mpp); one for all."""
    mpps = {s.name: s.mpp() or cfg.data.mpp for s in samples}
    low, high = min(mpps.values()), max(mpps.values())
    if high > low * 1.01:
        listed = ", ".join(f"{n} {v:.4g}" for n, v in sorted(mpps.items())[:8])
        raise EvaluationError(
            f"the evaluated images have different resolutions (micrometres per pixel: {listed}); "
            f"evaluate images of one resolution at a time"
        )
    return float(np.median(list(mpps.values()))), req.match_radius_um or cfg.eval.match_radius_um


def operating_metrics(counts: Counts) -> dict[str, float]:
    """The counts at one post-processing and the rates made of them (also a tune trial's attributes)."""
    return {
        "detection_rate": counts.detection_rate,
        "fdr": counts.false_discovery_rate,
        "precision": counts.precision,
        "f1": counts.f1,
        "tp": counts.tp,
        "fp": counts.fp,
        "fn": counts.fn,
    }


@dataclass
class Report:
    metrics: dict[str, float]
    images: pd.DataFrame
    curve: pd.DataFrame  # on the 0.01 grid: the paper's Fig. 4
    froc: pd.DataFrame  # at every threshold at or above the operating one where what is kept changes
    kept: list[np.ndarray]
    intervals: Intervals


def judge(cache: Cache, pp: PostProcess, matching: str, radius: float, seed: int = 0) -> Report:
    """Every metric of a cache at the post-processing `pp`; pure, so a later run can recompute it."""
    scored = score(cache, pp, matching, radius)
    total = sum(scored.counts(), Counts(0, 0, 0))
    images = per_image(cache, scored)
    area = area_mm2(cache)
    metrics = operating_metrics(total) | {"area_mm2": area, "fp_per_mm2": total.fp / area if area else float("nan")}
    intervals = bootstrap(images, seed)
    for name, (low, high) in intervals.bounds.items():
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
    metrics["ap"] = point_ap(scored, cache)
    metrics["box_ap"], metrics["box_ap50"] = box_ap(cache, scored.kept)
    exact = exact_curve(cache, pp, matching, radius)
    metrics |= froc(exact)
    if cache.n_classes > 1:
        metrics |= class_metrics(cache, scored, score(cache, pp, matching, radius, agnostic=True))
    metrics |= {
        "cells": cache.meta.get("cells", float("nan")),
        "cells_uncovered": cache.meta.get("cells_uncovered", float("nan")),
        "items": len(cache),
        "n_images": len(images),
        "n_cases": images["case"].nunique(),
    }
    return Report(metrics, images, curve(cache, pp, matching, radius), exact, scored.kept, intervals)


def class_metrics(cache: Cache, scored: Scored, agnostic: Scored) -> dict[str, float]:
    """Counts and rates of each class (a detection of the wrong class is a false positive of its class
    and its cell a miss of the cell's), and `any_class/`: every detection matched to every cell
    whatever the labels, as a class-agnostic detector is judged."""
    names = list(cache.meta.get("classes", [])) or [str(c) for c in range(1, cache.n_classes + 1)]
    out = {}
    for label, name in enumerate(names, start=1):
        out |= {f"{name}/{k}": v for k, v in operating_metrics(scored.class_counts(cache, label)).items()}
        out[f"{name}/ap"] = point_ap(scored, cache, label)
    any_class = sum(agnostic.counts(), Counts(0, 0, 0))
    return out | {f"any_class/{k}": v for k, v in operating_metrics(any_class).items()}


def log_report(
    tr: tracking.Tracker, prefix: str, report: Report, cache: Cache, items: list[Item], pp: PostProcess
) -> None:
    tr.log_metrics({f"{prefix}/{k}": v for k, v in report.metrics.items() if np.isfinite(v)}, step=0)
    unit = report.intervals.unit
    notes = (
        ["the evaluated images come from one case: intervals are over images within that patient, not across patients"]
        if unit == "image"
        else []
    ) + ([report.intervals.note()] if report.intervals.missing else [])
    tr.set_tags(
        {"count_unit": COUNT_UNITS.get(cache.meta.get("protocol"), "cells"), "ci_unit": unit}
        | ({"ci_note": "; ".join(notes)} if notes else {})
    )
    tr.client.log_table(tr.run_id, report.images, f"{prefix}_per_image.json")
    tr.client.log_text(tr.run_id, report.curve.to_csv(index=False), f"{prefix}_threshold_curve.csv")
    tr.client.log_text(tr.run_id, report.froc.to_csv(index=False), f"{prefix}_froc_curve.csv")
    title = f"{prefix}: {len(report.images)} images, {len(cache)} items"
    for fig, name in (
        (figures.threshold_curve(report.curve, pp.score_thresh, title), "fig4_tpr_fdr.png"),
        (figures.pr_curve(report.curve, pp.score_thresh, title), "precision_recall.png"),
        (figures.froc(report.froc, report.metrics, title), "froc.png"),
    ):
        tr.client.log_figure(tr.run_id, fig, f"figures/{name}")
        figures.close(fig)
    shown: set[str] = set()
    for i, item in enumerate(items):
        if item.name in shown or len(shown) >= MAX_OVERLAYS:
            continue
        shown.add(item.name)
        k = report.kept[i]
        fig = figures.overlay(
            item.image,
            cache.ground_truth(i)[2],
            cache.det_boxes[k],
            cache.det_scores[k],
            f"{item.name} at {item.origin}, score > {pp.score_thresh:g}",
        )
        tr.client.log_figure(tr.run_id, fig, f"overlays/{item.name}.png")
        figures.close(fig)


def log_geojson(tr: tracking.Tracker, report: Report, cache: Cache, items: list[Item], model_uri: str) -> None:
    """What the version reports on each whole image, as QuPath-importable GeoJSON (detections/NAME.geojson)."""
    classes = cache.meta["classes"]
    with tempfile.TemporaryDirectory(prefix="brecahad-geojson-") as tmp:
        for i, item in enumerate(items):
            k = report.kept[i]
            found = table(cache.det_boxes[k], cache.det_scores[k], cache.det_labels[k], classes)
            path = Path(tmp) / f"{item.name}.geojson"
            path.write_text(json.dumps(to_geojson(found, model_uri)))
            tr.client.log_artifact(tr.run_id, path, "detections")


def evaluate(req: Request, parent: str | None = None) -> tuple[str, dict[str, float]]:
    """Run one evaluation (nested under `parent` if given); returns the run id and the metrics
    logged under `{split}/`."""
    req.check()
    tracking.check_reachable()
    ref = tracking.resolve_model(req.model)
    split = recorded_split(ref) if req.split != "all" else _optional_split(ref)
    samples, hashes = select(req, split)
    overlap = guard(req, ref, split, samples, hashes)
    detector = tracking.load_model(ref)
    cfg, model = detector.config, detector.model
    classes_for(cfg.data.classes, req.data_dir)  # the folder annotates every class the version detects
    pp = PostProcess.of_config(cfg.model)
    mpp, radius_um = resolution(req, cfg, samples)
    try:
        rt = Runtime.choose(req.device or None)
    except (ValueError, RuntimeError) as e:
        raise EvaluationError(str(e)) from None
    with tracking.run(
        cfg.tracking.experiment, parent=parent, name=f"evaluate v{ref.version} {req.split} {req.protocol}"
    ) as tr:
        tr.set_tags(
            {
                "model_name": ref.name,
                "model_version": ref.version,
                "training_run_id": ref.run_id or "",
                "model_uri": ref.uri,
                "protocol": req.protocol,
                "split": req.split,
                "matching": req.matching,
                "seed": req.seed,
                "code_digest": code_digest(),  # what made the numbers: reuse needs the same
                "package_version": tracking.package_version(),
                "evaluation": "true",
                "data_digest": content_digest(samples, hashes),
                "match_radius_um": f"{radius_um:g}",
                "radius_from": "version" if req.match_radius_um is None else "request",
                "mpp": f"{mpp:g}",
            }
            | {f"inference.{k}": v for k, v in rt.describe().items()}
            | ({"allow_overlap": "true", "overlap_images": ",".join(overlap)[:4000]} if req.allow_overlap else {})
        )
        tr.log_params(
            {
                "eval.model": ref.uri,
                "eval.model_version": ref.version,
                "eval.data_dir": str(req.data_dir),
                "eval.split": req.split,
                "eval.protocol": req.protocol,
                "eval.matching": req.matching,
                "eval.seed": req.seed,
                "eval.match_radius_um": radius_um,
                "eval.match_radius_px": radius_um / mpp,
                "eval.mpp": mpp,
                "eval.border_band": cfg.eval.border_band if req.protocol == "paper" else 0.0,
                "eval.score_thresh": pp.score_thresh,
                "eval.nms_thresh": pp.nms_thresh,
                "eval.detections_per_img": pp.detections_per_img,
                "eval.images": len(samples),
            }
        )
        evaluated = pd.DataFrame([{"name": s.name, "case": s.case, "sha256": hashes[s.name]} for s in samples])
        tr.log_dataset(
            evaluated,
            str(req.data_dir),
            content_digest(samples, hashes),
            f"brecahad-{req.split}",
            DATASET_CONTEXTS[req.split],
        )
        meta = {
            "model_uri": ref.uri,
            "model_name": ref.name,
            "model_version": ref.version,
            "training_run_id": ref.run_id,
            "sha256": hashes,
        }
        items, views = infer_views(req, cfg, model, samples, rt, meta)
        radius = views["none"].meta["match_radius"]
        with tempfile.TemporaryDirectory(prefix="brecahad-eval-") as tmp:
            for view, c in views.items():
                name = CACHE_NAME if view == "none" else f"predictions_{view}.npz"
                tr.client.log_artifact(tr.run_id, c.save(Path(tmp) / name), None)
        step = Pipeline.of(cfg, radius, detector.second_look, rt).run(views, [it.image for it in items])
        cache, pp = step.cache, step.pp
        if cfg.eval.tta_views:
            tr.set_tags({"tta_views": ",".join(views), "tta_thresh": cfg.eval.tta_thresh})
        if detector.second_look is not None:  # the classifier rescored what the detector kept
            tr.set_tags({"second_look_weight": cfg.second_look.weight, "second_look_thresh": cfg.second_look.thresh})
        if cache is not views["none"]:  # what the version reports, for compare and replays
            with tempfile.TemporaryDirectory(prefix="brecahad-eval-") as tmp:
                tr.client.log_artifact(tr.run_id, cache.save(Path(tmp) / PIPELINE_CACHE_NAME), None)
            tr.set_tags({"pipeline_thresh": pp.score_thresh})
        report = judge(cache, pp, req.matching, radius, req.seed)
        log_report(tr, req.split, report, cache, items, pp)
        if req.protocol == "whole":
            log_geojson(tr, report, cache, items, ref.pinned)
    model_card.publish(ref.name, ref.version)  # the card's metrics come from the finished run
    return tr.run_id, report.metrics


def infer_views(
    req: Request, cfg: Config, model, samples: list[Sample], rt: Runtime, meta: dict
) -> tuple[list[Item], dict[str, Cache]]:
    """The items of the protocol and the raw cache of the image and of each test-time flip
    (eval.tta_views), each in its own (flipped) pixels."""
    items = paper_items(samples, cfg, req.seed) if req.protocol == "paper" else whole_items(samples, cfg)
    views = raw_views(model, items, cfg, rt, f"infer ({req.protocol}, {rt.device}, {PRECISION_NAMES[rt.dtype]})")
    cache = views["none"]
    cells, uncovered = cell_coverage(samples, items, cfg.data.classes)
    pp = PostProcess.of_config(cfg.model)
    mpp, radius_um = resolution(req, cfg, samples)
    cache.meta = meta | {
        "protocol": req.protocol,
        "split": req.split,
        "seed": req.seed,
        "classes": list(cfg.data.classes),
        "box_size": cfg.data.box_size,
        "mpp": mpp,
        "match_radius_um": radius_um,
        "match_radius": radius_um / mpp,  # px, what matching, merging and fusion use
        "postprocess": pp.__dict__,
        # Whole images have no inner edges; a patch's inner edges get the don't-care band.
        "border_band": cfg.eval.border_band if req.protocol == "paper" else 0.0,
        "device": rt.device.type,
        "precision": PRECISION_NAMES[rt.dtype],
        "cells": cells,
        "cells_uncovered": uncovered,
    }
    for view, flipped in views.items():
        if view != "none":
            flipped.meta = cache.meta | {"view": view}
    return items, views


def load_pipeline_cache(run_id: str) -> Cache | None:
    """The detections an evaluation judged when the version is more than its raw detector (test-time
    flips, a second look), or None."""
    with tempfile.TemporaryDirectory(prefix="brecahad-cache-") as tmp:
        path = tracking.download_if_present(run_id, PIPELINE_CACHE_NAME, Path(tmp))
        return Cache.load(path) if path else None


def _optional_split(ref: tracking.ModelRef) -> Split | None:
    """For split=all the recorded split only guards against leakage; a model without one still evaluates."""
    try:
        return recorded_split(ref)
    except EvaluationError:
        return None


def earlier_evaluation(req: Request, same_matching: bool):
    """A finished evaluation of the same model version, split, protocol and seed on the same image
    contents (and, if asked, the same matching), made by the same code (provenance.code_digest), or None.
    Returns (run, image digest)."""
    ref = tracking.resolve_model(req.model)
    split = recorded_split(ref) if req.split != "all" else _optional_split(ref)
    digest = content_digest(*select(req, split))
    query = (
        f"tags.`detection.evaluation` = 'true' and tags.`detection.model_name` = '{ref.name}' and "
        f"tags.`detection.model_version` = '{ref.version}' and tags.`detection.split` = '{req.split}' and "
        f"tags.`detection.protocol` = '{req.protocol}' and tags.`detection.seed` = '{req.seed}' and "
        f"tags.`detection.data_digest` = '{digest}' and "
        f"tags.`detection.code_digest` = '{code_digest()}'"
    )
    if same_matching:
        query += f" and tags.`detection.matching` = '{req.matching}'"
    if req.match_radius_um is None:  # the version's own radius: fixed by its registered config
        query += " and tags.`detection.radius_from` = 'version'"
    else:
        query += f" and tags.`detection.match_radius_um` = '{req.match_radius_um:g}'"
    found = tracking.find_runs(query)
    return (found[0] if found else None), digest


def cached_evaluation(req: Request, parent: str | None = None) -> tuple[str, Cache]:
    """The raw predictions of an earlier evaluation (matching plays no part in them), or of a new
    one: the tune study replays them instead of running the model."""
    run, _ = earlier_evaluation(req, same_matching=False)
    run_id = run.info.run_id if run else evaluate(req, parent)[0]
    return run_id, load_cache(run_id)


def load_view_caches(run_id: str, views: list[str]) -> dict[str, Cache]:
    """The raw caches of an evaluation's test-time flips (eval.tta_views)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="brecahad-cache-") as tmp:
        for view in views:
            path = tracking.download_if_present(run_id, f"predictions_{view}.npz", Path(tmp))
            if path is None:
                raise EvaluationError(f"evaluation run {run_id} has no predictions_{view}.npz; evaluate again")
            out[view] = Cache.load(path)
    return out


def load_cache(run_id: str) -> Cache:
    """The prediction cache an evaluation run logged, for recomputation or tuning."""
    with tempfile.TemporaryDirectory(prefix="brecahad-cache-") as tmp:
        path = tracking.download_if_present(run_id, CACHE_NAME, Path(tmp))
        if path is None:
            raise EvaluationError(f"run {run_id} has no {CACHE_NAME}; it is not an evaluation run")
        return Cache.load(path)
