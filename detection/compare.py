"""Compare registered versions on one split by what the paper asks for: false positives at the same
detection rate. Each version is evaluated once (or its earlier evaluation reused), all at one match
radius; its detection rate and false positives are read at every score threshold where what it keeps
changes (the fused threshold for a version with test-time augmentation), every curve goes on one
plot, and per version and target one figure with a 95% interval from resampling cases (patients).

Two axes: `fdr` reads the FDR at detection rates (0.90, 0.95, 0.99 and the highest rate that all
versions reach); `froc` reads the detection rate at false positives per mm² (10 to 300, the MONKEY
challenge's FROC) and their mean. One MLflow run holds the table, the figure and a metric per
version and target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, second_look, tracking
from .choices import COMPARE_AXES, MATCHERS, PREFIX_MATCHERS, PROTOCOLS
from .evaluate import EvaluationError, Request, earlier_evaluation, evaluate, load_cache, load_pipeline_cache
from .inference import Cache
from .metrics import FROC_TARGETS, MIN_UNITS, case_of, counted_area_mm2, fdr_at, rates, threshold_counts
from .postprocess import PostProcess
from .tta import fused_postprocess, kept_where

TARGETS = {"fdr": (0.90, 0.95, 0.99), "froc": FROC_TARGETS}
EXPERIMENT = "brecahad"
RESAMPLED_VALUES = 20_000_000  # counts held at once while resampling: ~160 MB


@dataclass(frozen=True)
class CompareRequest:
    models: tuple[str, ...]
    data_dir: Path
    split: str = "test"
    protocol: str = PROTOCOLS[0]
    matching: str = MATCHERS[0]
    targets: tuple[float, ...] = ()  # empty: the axis's own (TARGETS)
    seed: int = 0
    n_resamples: int = 2000
    axis: str = COMPARE_AXES[0]
    match_radius_um: float | None = None  # None: the first version's eval.match_radius_um, for all

    @property
    def goals(self) -> tuple[float, ...]:
        return self.targets or TARGETS[self.axis]

    def check(self) -> None:
        if len(self.models) < 1:
            raise EvaluationError("name at least one model version to compare")
        if self.axis not in COMPARE_AXES:
            raise EvaluationError(f"axis={self.axis!r} must be one of {', '.join(COMPARE_AXES)}")
        if self.matching not in PREFIX_MATCHERS:
            raise EvaluationError(
                f"matching={self.matching!r}: the threshold sweep needs a matcher whose result at a "
                f"higher threshold is a prefix ({', '.join(PREFIX_MATCHERS)})"
            )
        if self.axis == "fdr" and not all(0 < t < 1 for t in self.goals):
            raise EvaluationError(f"targets {list(self.goals)} must be detection rates within (0, 1)")
        if self.axis == "froc" and not all(t > 0 for t in self.goals):
            raise EvaluationError(f"targets {list(self.goals)} must be false positives per mm², > 0")


def judged(
    req: CompareRequest, ref: tracking.ModelRef, radius_um: float, parent: str
) -> tuple[str, Cache, PostProcess]:
    """The version's evaluation on the split at `radius_um` (reused when one exists, else made as a
    nested run) and the cache and post-processing it is judged on."""
    ev = Request(ref.pinned, req.data_dir, req.split, req.protocol, req.matching, req.seed, match_radius_um=radius_um)
    run, _ = earlier_evaluation(ev, same_matching=False)
    run_id = run.info.run_id if run else evaluate(ev, parent=parent)[0]
    reported = load_pipeline_cache(run_id)  # fused flips and/or a second look
    if reported is not None:
        thresh = float(tracking.get_run(run_id).data.tags[tracking.TAG + "pipeline_thresh"])
        return run_id, reported, fused_postprocess(thresh)
    cache = load_cache(run_id)
    return run_id, cache, PostProcess(**cache.meta["postprocess"])


# --- what each axis reads off a curve ------------------------------------------------------------


def dr_at_density(counts: np.ndarray, area: np.ndarray, target: float) -> np.ndarray:
    """Detection rate at the lowest threshold whose false positives per mm² stay within `target`, 0
    if none does (the FROC's reading). counts (..., T, 3), area (...) in mm²."""
    dr, _ = rates(counts)
    density = counts[..., 1] / np.asarray(area, np.float64)[..., None]
    return np.where(density <= target, np.nan_to_num(dr, nan=0.0), 0.0).max(-1)


def reader(axis: str, target: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(counts, area) -> the axis's figure at `target`."""
    if axis == "fdr":
        return lambda counts, area: fdr_at(counts, target)
    return lambda counts, area: dr_at_density(counts, area, target)


def column(axis: str, target: float) -> str:
    return f"fdr_at_dr_{target:g}" if axis == "fdr" else f"dr_at_{target:g}_fp_per_mm2"


@dataclass(frozen=True)
class Units:
    """What the bootstrap resamples: counts per case (per image when the images are one case)."""

    counts: np.ndarray  # (U, T, 3) tp, fp, fn at each threshold
    area: np.ndarray  # (U,) mm² their false positives are counted over
    unit: str  # "case" or "image"

    @classmethod
    def of(cls, cache: Cache, images: list[str], counts: np.ndarray) -> Units:
        cases = [case_of(n) for n in images]
        unit = "case" if len(set(cases)) >= 2 else "image"
        keys = cases if unit == "case" else images
        names = [str(n) for n in cache.items_name]
        area = {n: sum(counted_area_mm2(cache, i) for i, m in enumerate(names) if m == n) for n in images}
        groups = sorted(set(keys))
        return cls(
            np.stack([counts[[k for k, c in enumerate(keys) if c == g]].sum(0) for g in groups]),
            np.array([sum(area[n] for n, c in zip(images, keys) if c == g) for g in groups]),
            unit,
        )

    def pooled(self) -> tuple[np.ndarray, float]:
        return self.counts.sum(0), float(self.area.sum())


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    reached: float  # share of resamples in which the figure exists (the target rate is reached)
    note: str = ""


def interval(units: Units, read, seed: int, n: int) -> Interval:
    """95% percentile interval of a figure, resampling units. With fewer than MIN_UNITS units there is
    none; resamples that never reach the target have no figure and are left out (`reached` says how
    many stayed), and below half there is none."""
    if len(units.counts) < MIN_UNITS:
        return Interval(math.nan, math.nan, math.nan, f"{len(units.counts)} {units.unit}(s), fewer than {MIN_UNITS}")
    rng = np.random.default_rng(seed)
    weights = np.stack(
        [
            np.bincount(rng.integers(0, len(units.counts), len(units.counts)), minlength=len(units.counts))
            for _ in range(n)
        ]
    )
    block = max(1, RESAMPLED_VALUES // max(1, units.counts[0].size))
    values = np.concatenate(
        [
            read(np.einsum("bu,utk->btk", w, units.counts), w @ units.area)
            for w in (weights[k : k + block] for k in range(0, n, block))
        ]
    )
    values = values[np.isfinite(values)]
    reached = len(values) / n
    if reached < 0.5:
        return Interval(math.nan, math.nan, reached, f"only {reached:.0%} of resamples reach the target")
    return Interval(float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)), reached)


# --- the comparison ------------------------------------------------------------------------------


def class_view(cache: Cache, pp: PostProcess, label: int) -> tuple[Cache, PostProcess]:
    """One class of what the version keeps: post-processed with every class, as it runs (down to
    threshold 0, so the sweep sees every score), then that class's detections and cells alone."""
    kept = second_look.kept(cache, replace(pp, score_thresh=0.0), cache.meta["match_radius"])
    one = kept_where(kept, lambda k: kept.det_labels[k] == label, {})
    cells = one.gt_labels == label
    one = replace(one, gt_item=one.gt_item[cells], gt_points=one.gt_points[cells], gt_labels=one.gt_labels[cells])
    return one, fused_postprocess(0.0)


def views_of(cache: Cache, pp: PostProcess) -> list[tuple[str, Cache, PostProcess]]:
    """(class, cache, post-processing) to read curves off: every class pooled (`all`), then, with
    several classes, each one on its own."""
    out = [("all", cache, pp)]
    if cache.n_classes > 1:
        names = list(cache.meta.get("classes", [])) or [str(c) for c in range(1, cache.n_classes + 1)]
        out += [(name, *class_view(cache, pp, label)) for label, name in enumerate(names, start=1)]
    return out


def compare(req: CompareRequest) -> tuple[str, pd.DataFrame]:
    """Evaluate (or reuse evaluations of) every version and log the comparison as one run."""
    req.check()
    tracking.check_reachable()
    refs = [tracking.resolve_model(m) for m in req.models]  # every name checked before a run exists
    radius_um = req.match_radius_um or tracking.load_model(refs[0]).config.eval.match_radius_um
    with tracking.run(EXPERIMENT, name=f"compare {req.split} {req.protocol} {req.axis}") as tr:
        curves, per_version = {}, []
        for ref in refs:
            run_id, judged_cache, judged_pp = judged(req, ref, radius_um, tr.run_id)
            for cls, cache, pp in views_of(judged_cache, judged_pp):
                images, thresholds, counts = threshold_counts(cache, pp, req.matching, cache.meta["match_radius"])
                units = Units.of(cache, images, counts)
                label = f"{ref.name} v{ref.version}" + ("" if cls == "all" else f" {cls}")
                if cls == "all":  # the figure's curves: what each version keeps, every class pooled
                    pooled, area = units.pooled()
                    dr, fdr = rates(pooled)
                    curves[label] = pd.DataFrame(
                        {"threshold": thresholds, "detection_rate": dr, "fdr": fdr, "fp_per_mm2": pooled[:, 1] / area}
                    )
                per_version.append((ref, run_id, label, units, judged_pp, cls))
        targets = list(req.goals)
        if req.axis == "fdr":
            reachable = highest_common(curves)
            targets = sorted(set(targets) | {reachable})
        table = pd.DataFrame([_row(req, targets, *v) for v in per_version])
        _log(tr, req, table, curves, targets, radius_um)
        return tr.run_id, table


def highest_common(curves: dict[str, pd.DataFrame]) -> float:
    """The highest detection rate every curve reaches, rounded down to 4 decimals (rounded up, it
    could lie past the lowest curve's top, where that version has no FDR)."""
    return math.floor(min(float(np.nanmax(c.detection_rate)) for c in curves.values()) * 1e4) / 1e4


def _row(
    req: CompareRequest, targets: list[float], ref, run_id: str, label: str, units: Units, pp: PostProcess, cls: str
) -> dict:
    row = {
        "version": label,
        "class": cls,
        "model": ref.pinned,
        "evaluation_run": run_id,
        "ci_unit": units.unit,
        "operating_thresh": pp.score_thresh,
    }
    notes = set()
    for t in targets:
        read, name = reader(req.axis, t), column(req.axis, t)
        row[name] = float(read(*units.pooled()))
        ci = interval(units, read, req.seed, req.n_resamples)
        row[f"{name}_ci_low"], row[f"{name}_ci_high"], row[f"{name}_ci_reached"] = ci.low, ci.high, ci.reached
        notes |= {ci.note} - {""}
    if req.axis == "froc":
        row["froc"] = float(np.mean([row[column("froc", t)] for t in targets]))
    row["ci_note"] = "; ".join(sorted(notes))
    return row


def _log(
    tr: tracking.Tracker,
    req: CompareRequest,
    table: pd.DataFrame,
    curves: dict[str, pd.DataFrame],
    targets: list[float],
    radius_um: float,
) -> None:
    tr.set_tags(
        {
            "comparison": "true",
            "split": req.split,
            "protocol": req.protocol,
            "matching": req.matching,
            "axis": req.axis,
            "match_radius_um": f"{radius_um:g}",
            "versions": ", ".join(table.version[table["class"] == "all"]),
        }
        | ({"highest_common_detection_rate": f"{targets[-1]:.4f}"} if req.axis == "fdr" else {})
    )
    tr.log_params(
        {
            "compare.models": " ".join(req.models),
            "compare.split": req.split,
            "compare.protocol": req.protocol,
            "compare.axis": req.axis,
            "compare.targets": " ".join(f"{t:g}" for t in targets),
            "compare.match_radius_um": radius_um,
        }
    )
    shown = figure_columns(table)
    for values in table.to_dict("records"):
        key = str(values["version"]).replace(" ", "_")
        tr.log_metrics({f"{key}/{k}": values[k] for k in shown if np.isfinite(values[k])}, step=0)
    tr.client.log_table(tr.run_id, table, "comparison.json")
    tr.client.log_text(tr.run_id, table.to_csv(index=False), "comparison.csv")
    title = f"{req.split} split, {req.protocol} protocol"
    if req.axis == "fdr":
        fig, name = figures.dr_vs_fdr(curves, targets, title), "figures/dr_vs_fdr.png"
    else:
        fig, name = figures.froc_versions(curves, targets, title), "figures/froc.png"
    tr.client.log_figure(tr.run_id, fig, name)
    figures.close(fig)


def figure_columns(table: pd.DataFrame) -> list[str]:
    """The table's figures (one per target, and the FROC score), without their intervals."""
    return [
        c
        for c in table.columns
        if (c.startswith(("fdr_at_dr_", "dr_at_")) or c == "froc") and not c.endswith(("_low", "_high", "_reached"))
    ]
