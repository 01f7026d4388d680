"""Compare registered versions on one split by what the paper asks for: false positives at the same
detection rate. Each version is evaluated once (or its earlier evaluation reused); its detection
rate and FDR are swept over the score threshold (the fused one for a version with test-time
augmentation), every curve goes on one plot, and the FDR at detection rates 0.90, 0.95 and 0.99
(and at the highest rate that all of them reach) gets a 95% interval from resampling cases
(patients). One MLflow run holds the table, the figure and a metric per version and target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, tracking
from .choices import MATCHERS, PREFIX_MATCHERS, PROTOCOLS
from .evaluate import EvaluationError, Request, earlier_evaluation, evaluate, load_cache, load_pipeline_cache
from .inference import Cache
from .metrics import SWEEP as THRESHOLDS
from .metrics import case_of, fdr_at, rates, threshold_counts
from .postprocess import PostProcess
from .tta import fused_postprocess

TARGETS = (0.90, 0.95, 0.99)
EXPERIMENT = "brecahad"


@dataclass(frozen=True)
class CompareRequest:
    models: tuple[str, ...]
    data_dir: Path
    split: str = "test"
    protocol: str = PROTOCOLS[0]
    matching: str = MATCHERS[0]
    targets: tuple[float, ...] = TARGETS
    seed: int = 0
    n_resamples: int = 2000

    def check(self) -> None:
        if len(self.models) < 1:
            raise EvaluationError("name at least one model version to compare")
        if self.matching not in PREFIX_MATCHERS:
            raise EvaluationError(
                f"matching={self.matching!r}: the threshold sweep needs a matcher whose result at a "
                f"higher threshold is a prefix ({', '.join(PREFIX_MATCHERS)})"
            )
        if not all(0 < t < 1 for t in self.targets):
            raise EvaluationError(f"targets {list(self.targets)} must be detection rates within (0, 1)")


def judged(req: CompareRequest, ref: tracking.ModelRef, parent: str) -> tuple[str, Cache, PostProcess]:
    """The version's evaluation on the split (reused when one exists, else made as a nested run)
    and the cache and post-processing it is judged on."""
    ev = Request(ref.pinned, req.data_dir, req.split, req.protocol, req.matching, req.seed)
    run, _ = earlier_evaluation(ev, same_matching=False)
    run_id = run.info.run_id if run else evaluate(ev, parent=parent)[0]
    reported = load_pipeline_cache(run_id)  # fused flips and/or a second look
    if reported is not None:
        thresh = float(tracking.get_run(run_id).data.tags[tracking.TAG + "pipeline_thresh"])
        return run_id, reported, fused_postprocess(thresh)
    cache = load_cache(run_id)
    return run_id, cache, PostProcess(**cache.meta["postprocess"])


def intervals(units: np.ndarray, target: float, seed: int, n: int) -> tuple[float, float]:
    """95% percentile interval of the FDR at `target`, resampling units (cases or images)."""
    if len(units) < 2:
        value = float(fdr_at(units.sum(0), target))
        return value, value
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, len(units), len(units)), minlength=len(units)) for _ in range(n)])
    resampled = np.einsum("bu,utk->btk", weights, units)
    values = fdr_at(resampled, target)
    values = values[np.isfinite(values)]
    if len(values) < n / 2:  # most resamples never reach the target: no interval worth giving
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def compare(req: CompareRequest) -> tuple[str, pd.DataFrame]:
    """Evaluate (or reuse evaluations of) every version and log the comparison as one run."""
    req.check()
    tracking.check_reachable()
    refs = [tracking.resolve_model(m) for m in req.models]  # every name checked before a run exists
    with tracking.run(EXPERIMENT, name=f"compare {req.split} {req.protocol}") as tr:
        curves, per_version = {}, []
        for ref in refs:
            run_id, cache, pp = judged(req, ref, tr.run_id)
            images, counts = threshold_counts(cache, pp, req.matching, cache.meta["match_radius"])
            units, unit = _units(images, counts)
            label = f"{ref.name} v{ref.version}"
            dr, fdr = rates(units.sum(0))
            curves[label] = pd.DataFrame({"threshold": THRESHOLDS, "detection_rate": dr, "fdr": fdr})
            per_version.append((ref, run_id, label, units, unit, pp))
        reachable = highest_common(curves)
        targets = sorted(set(req.targets) | {reachable})
        table = pd.DataFrame([_row(req, targets, *v) for v in per_version])
        _log(tr, req, table, curves, targets, reachable)
        return tr.run_id, table


def highest_common(curves: dict[str, pd.DataFrame]) -> float:
    """The highest detection rate every curve reaches, rounded down to 4 decimals (rounded up, it
    could lie past the lowest curve's top, where that version has no FDR)."""
    return math.floor(min(float(np.nanmax(c.detection_rate)) for c in curves.values()) * 1e4) / 1e4


def _units(images: list[str], counts: np.ndarray) -> tuple[np.ndarray, str]:
    """Counts summed per case (per image when the images are one case): what the bootstrap resamples."""
    cases = [case_of(n) for n in images]
    unit = "case" if len(set(cases)) >= 2 else "image"
    keys = cases if unit == "case" else images
    return np.stack([counts[[k for k, c in enumerate(keys) if c == key]].sum(0) for key in sorted(set(keys))]), unit


def _row(
    req: CompareRequest,
    targets: list[float],
    ref,
    run_id: str,
    label: str,
    units: np.ndarray,
    unit: str,
    pp: PostProcess,
) -> dict:
    row = {
        "version": label,
        "model": ref.pinned,
        "evaluation_run": run_id,
        "ci_unit": unit,
        "operating_thresh": pp.score_thresh,
    }
    for t in targets:
        low, high = intervals(units, t, req.seed, req.n_resamples)
        row[f"fdr_at_dr_{t:g}"] = float(fdr_at(units.sum(0), t))
        row[f"fdr_at_dr_{t:g}_ci_low"], row[f"fdr_at_dr_{t:g}_ci_high"] = low, high
    return row


def _log(
    tr: tracking.Tracker,
    req: CompareRequest,
    table: pd.DataFrame,
    curves: dict[str, pd.DataFrame],
    targets: list[float],
    reachable: float,
) -> None:
    tr.set_tags(
        {
            "comparison": "true",
            "split": req.split,
            "protocol": req.protocol,
            "matching": req.matching,
            "versions": ", ".join(table.version),
            "highest_common_detection_rate": f"{reachable:.4f}",
        }
    )
    tr.log_params(
        {
            "compare.models": " ".join(req.models),
            "compare.split": req.split,
            "compare.protocol": req.protocol,
            "compare.targets": " ".join(f"{t:g}" for t in targets),
        }
    )
    for values in table.to_dict("records"):
        key = str(values["version"]).replace(" ", "_")
        tr.log_metrics(
            {f"{key}/{k}": v for k, v in values.items() if k.startswith("fdr_at_dr_") and np.isfinite(v)}, step=0
        )
    tr.client.log_table(tr.run_id, table, "comparison.json")
    tr.client.log_text(tr.run_id, table.to_csv(index=False), "comparison.csv")
    fig = figures.dr_vs_fdr(curves, targets, f"{req.split} split, {req.protocol} protocol")
    tr.client.log_figure(tr.run_id, fig, "figures/dr_vs_fdr.png")
    figures.close(fig)
