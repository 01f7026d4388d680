"""Leave-one-case-out cross-validation: how the detector does on a patient it never saw.

One held-out split says little when its test images are one or two patients. Here every case of
the folder is the test split once (the next case, in name order, is its validation split, the
rest trains), one nested training run per fold, each fold judged on its held-out case's whole
images; the counts are then pooled and bootstrapped over cases. Meant for a GPU (BreCaHAD has 17
cases: 17 trainings); on CPU it runs with the smoke config on a few cases.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import tracking
from .config import Config
from .data import Sample, load_dataset
from .evaluate import COUNT_UNITS, judge, log_report, operating_metrics
from .inference import Runtime, cell_coverage, raw_inference, whole_items
from .matching import Counts
from .metrics import bootstrap
from .postprocess import PostProcess
from .split import Split, SplitError


def folds(samples: list[Sample], cases: list[str] | None = None) -> list[tuple[str, dict[str, list[str]]]]:
    """(held-out case, {train, val, test} image names) for each case asked for (default: every case)."""
    by_case: dict[str, list[str]] = {}
    for s in samples:
        by_case.setdefault(s.case, []).append(s.name)
    order = sorted(by_case)
    if len(order) < 3:
        raise SplitError(
            f"leave-one-case-out needs at least 3 cases (test, val, train), found {len(order)}: {', '.join(order)}"
        )
    unknown = sorted(set(cases or []) - set(order))
    if unknown:
        raise SplitError(f"case(s) {', '.join(unknown)} are not in the folder; its cases are {', '.join(order)}")
    out = []
    for k, case in enumerate(order):
        if cases and case not in cases:
            continue
        val = order[(k + 1) % len(order)]
        train = [n for c in order if c not in (case, val) for n in by_case[c]]
        out.append((case, {"train": sorted(train), "val": sorted(by_case[val]), "test": sorted(by_case[case])}))
    return out


def _judge_fold(cfg: Config, model, samples: list[Sample], device: str):
    items = whole_items(samples, cfg)
    cache = raw_inference(model, items, cfg, Runtime.choose(device))
    cells, uncovered = cell_coverage(samples, items, cfg.data.classes)
    cache.meta = {
        "protocol": "whole",
        "box_size": cfg.data.box_size,
        "classes": list(cfg.data.classes),
        "mpp": cfg.data.mpp,
        "match_radius_um": cfg.eval.match_radius_um,
        "match_radius": cfg.match_radius_px,
        "border_band": 0.0,
        "device": Runtime.choose(device).device.type,
        "cells": cells,
        "cells_uncovered": uncovered,
    }
    return judge(cache, PostProcess.of_config(cfg.model), "greedy", cfg.match_radius_px), cache


def leave_one_case_out(cfg: Config, data_dir: Path, cases: list[str] | None = None) -> tuple[str, dict[str, float]]:
    """Train and judge one fold per case; returns the parent run id and the pooled `cv/` metrics."""
    from .train import train_nested

    tracking.check_reachable()
    samples = load_dataset(data_dir)
    plan = folds(samples, cases)
    prints = {s.name: s.fingerprint() for s in samples}
    by_name = {s.name: s for s in samples}
    tables = []
    with tracking.run(cfg.tracking.experiment, name=f"cv {cfg.name}") as tr:
        tr.set_tags({"cv": "case", "config": cfg.name, "count_unit": COUNT_UNITS["whole"]})
        tr.log_params({"cv.folds": len(plan), "cv.data_dir": str(data_dir), "cv.config": cfg.name})
        for case, parts in plan:
            split = Split(
                "cv-case",
                cfg.data.split.seed,
                tuple(parts["train"]),
                tuple(parts["val"]),
                tuple(parts["test"]),
                {n: h for n, (h, _) in prints.items()},
                "pixels",
                {n: prints[n][1] for n in parts["train"]},
            )
            run_id, _, model = train_nested(cfg, data_dir, split, tr.run_id, f"cv fold {case}")
            report, cache = _judge_fold(cfg, model, [by_name[n] for n in parts["test"]], cfg.train.device)
            with tracking.reopen(run_id) as fold:
                log_report(fold, "test", report, cache, [], PostProcess.of_config(cfg.model))
            tables.append(report.images)
        images = pd.concat(tables, ignore_index=True)
        total = Counts(int(images.tp.sum()), int(images.fp.sum()), int(images.fn.sum()))
        metrics = operating_metrics(total) | {"n_cases": images["case"].nunique(), "n_images": len(images)}
        intervals = bootstrap(images)
        for name, (low, high) in intervals.bounds.items():
            metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
        if intervals.missing:
            tr.set_tags({"ci_note": intervals.note()})
        tr.log_metrics({f"cv/{k}": v for k, v in metrics.items() if pd.notna(v)}, step=0)
        tr.client.log_table(tr.run_id, images, "cv_per_image.json")
        per_case = images.groupby("case", as_index=False)[["tp", "fp", "fn"]].sum()
        tr.client.log_table(tr.run_id, per_case, "cv_per_case.json")
        return tr.run_id, metrics
