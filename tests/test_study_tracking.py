"""Issue 26: a postprocess study tracks what its trials cost, not a run per trial. Real Optuna
journal storages and a real sqlite MLflow store in a temp dir, a hand-built cache (no model)."""

import io
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from detection import config, studies, tracking, tune
from detection.metrics import Replayer
from tests.conftest import SMOKE
from tests.test_metrics import RADIUS, make_cache


def _cache(seed: int = 0):
    """Four 200 px items, each with 6 cells and 12 scored detections near or far from them."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(4):
        cells = [tuple(rng.uniform(20, 180, 2)) for _ in range(6)]
        near = [(x + rng.normal(0, 3), y + rng.normal(0, 3), float(rng.uniform(0.3, 1))) for x, y in cells]
        far = [(*rng.uniform(0, 200, 2), float(rng.uniform(0, 0.6))) for _ in range(6)]
        items.append((near + far, cells))
    return make_cache(items)


def _study(tmp_path: Path, objective: str, n_trials: int, sampler: str = "tpe"):
    req = tune.TuneRequest(
        "models:/x/1", tmp_path, f"s-{objective}", n_trials, str(tmp_path / "journal.log"), objective=objective,
        seed=0, sampler=sampler,
    )  # fmt: skip
    storage = studies.open_storage(req.storage_url, None)
    study = optuna.create_study(study_name=req.study, storage=storage, directions=tune.directions(objective))
    study.sampler = tune.make_sampler(sampler, 0, n_trials)
    parent = tracking.create_run("brecahad", f"tune {req.study}", {"study": req.study})
    s = studies.Study(req, study, parent, None, config.load(SMOKE), None, tracking.StepLog(parent))
    return s, tune.postprocess_objective(s, Replayer(_cache(), "greedy", RADIUS))


def _end(s):
    """What the study's end tracks: its table and figures, and nested runs for the trials a user opens."""
    chosen = tune.choose(s.study)
    with tracking.reopen(s.parent) as tr:
        tune.log_study(tr, s, chosen)
    return chosen


def _nested(parent: str) -> dict[int, mlflow.entities.Run]:
    runs = tracking.client().search_runs(
        [tracking.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    return {int(r.data.tags["detection.trial"]): r for r in runs}


@pytest.mark.parametrize("objective", ["f1", "pareto"])
def test_every_trial_is_kept_and_only_the_looked_at_ones_are_runs(store, tmp_path, objective):
    s, objective_fn = _study(tmp_path, objective, 40)
    studies.run(s, objective_fn, beat=False)

    trials = s.study.get_trials(deepcopy=False)
    assert len(trials) == 40 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for t in trials:  # Optuna's storage keeps each trial whole: what it would run and what it scored
        assert set(t.user_attrs) == {"settings", "val"}
        assert tune.trial_postprocess(t).score_thresh == t.params["score_thresh"]
        assert t.user_attrs["val"]["tp"] + t.user_attrs["val"]["fn"] == 24
    history = tracking.client().get_metric_history(s.parent, "trial/f1")
    assert sorted(m.step for m in history) == list(range(40))  # a point per trial, step = trial number
    by_step = {m.step: m.value for m in history}
    assert all(by_step[t.number] == pytest.approx(t.user_attrs["val"]["f1"]) for t in trials)
    assert _nested(s.parent) == {}  # no run per trial while the study runs

    chosen = _end(s)
    nested = _nested(s.parent)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if objective == "f1":
        top = sorted(done, key=lambda t: (-t.value, t.number))[:10]
        assert set(nested) == {t.number for t in top} | {chosen.number}
    else:
        assert set(nested) == {t.number for t in s.study.best_trials} | {chosen.number}
    run = nested[chosen.number]
    assert run.data.params["pp.score_thresh"] == str(chosen.params["score_thresh"])
    assert run.data.metrics["val/f1"] == pytest.approx(tune.trial_metrics(chosen)["f1"])

    experiment = tracking.get_run(s.parent).info.experiment_id
    table = tracking.client().load_table(experiment, "study_trials.json", run_ids=[s.parent])
    assert sorted(table["trial"]) == list(range(40)) and {"state", "param.score_thresh", "val.f1"} <= set(table)
    files = {a.path for a in tracking.client().list_artifacts(s.parent)} | {
        a.path for a in tracking.client().list_artifacts(s.parent, "figures")
    }
    assert {"study_trials.csv", "figures/parallel_coordinates.png", "figures/tradeoff.png"} <= files
    # The UI previews a CSV's first 500 rows: the best trials come first there.
    shown = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{s.parent}/study_trials.csv")))
    assert len(shown) == 40
    if objective == "f1":
        assert shown["objective"].is_monotonic_decreasing and shown["trial"].iloc[0] == chosen.number
    else:
        assert set(shown["trial"].iloc[: len(s.study.best_trials)]) == {t.number for t in s.study.best_trials}

    _end(s)  # a study resumed and ended again opens no second run for the same trial, nor a second row
    assert set(_nested(s.parent)) == set(nested)
    again = tracking.client().load_table(experiment, "study_trials.json", run_ids=[s.parent])
    assert sorted(again["trial"]) == list(range(40))


def test_the_step_log_writes_a_batch_per_thousand_metrics_or_per_interval(store, monkeypatch):
    parent = tracking.create_run("brecahad", "steps", {})
    calls = []
    log_batch = tracking.client().log_batch
    monkeypatch.setattr(
        tracking.client(), "log_batch", lambda run_id, **kw: calls.append(kw) or log_batch(run_id, **kw)
    )
    now = [0.0]
    log = tracking.StepLog(parent, every=10.0, clock=lambda: now[0])
    for step in range(600):  # 1,800 metrics at a standstill clock: one full batch of 1,000 is written
        log.add({"trial/f1": 0.5, "trial/fdr": 0.1, "trial/detection_rate": 0.9}, step)
    assert [len(c["metrics"]) for c in calls] == [1000]
    now[0] = 10.0  # ten seconds later the next trial writes what has waited
    log.add({"trial/f1": 0.5}, 600)
    assert [len(c["metrics"]) for c in calls] == [1000, 801]
    log.flush()
    log.flush()  # nothing left: no empty write
    assert len(calls) == 2
    assert len(tracking.client().get_metric_history(parent, "trial/f1")) == 601


def test_the_auto_sampler_is_tpe_up_to_a_thousand_trials_then_qmc():
    assert isinstance(tune.make_sampler("auto", 0, 1000), optuna.samplers.TPESampler)
    assert isinstance(tune.make_sampler("auto", 0, 1001), optuna.samplers.QMCSampler)
    assert isinstance(tune.make_sampler("random", 0, 10), optuna.samplers.RandomSampler)
    with pytest.raises(tune.TuneError, match="sampler='grid'"):
        tune.TuneRequest("models:/x/1", Path("."), "s", 5, sampler="grid").check()


def test_a_qmc_study_covers_the_thresholds_evenly(store, tmp_path):
    s, objective_fn = _study(tmp_path, "f1", 64, sampler="qmc")
    studies.run(s, objective_fn, beat=False)
    thresholds = np.sort([t.params["score_thresh"] for t in s.study.trials])
    low, high = tune.TUNE_RANGES["score_thresh"]
    # A Sobol sequence leaves no stretch of the range empty: 64 points, no gap wider than 4 slots.
    assert np.diff(np.concatenate([[low], thresholds, [high]])).max() < 4 * (high - low) / 64


def test_trials_recorded_before_issue_26_still_read():
    """Earlier studies wrote each setting and figure as an attribute of its own; they resume."""
    legacy = optuna.trial.create_trial(
        params={"score_thresh": 0.3},
        distributions={"score_thresh": optuna.distributions.FloatDistribution(0, 1)},
        value=0.5,
        user_attrs={
            "pp.score_thresh": 0.3,
            "pp.nms_thresh": 0.5,
            "pp.detections_per_img": 100,
            "pp.class_agnostic": False,
            "tta.tta_thresh": 0.2,
            "f1": 0.5,
            "tp": 3,
            "heartbeat": 1.0,
        },
    )
    assert tune.trial_postprocess(legacy).nms_thresh == 0.5 and tune.trial_tta_thresh(legacy) == 0.2
    assert tune.trial_metrics(legacy) == {"f1": 0.5, "tp": 3}
    row = tune.trial_row(legacy, 1)  # as the study's table shows it
    assert row["settings.tta_thresh"] == 0.2 and row["val.f1"] == 0.5 and row["objective"] == 0.5


def test_top_k_is_searched_on_a_log_grid_that_keeps_both_ends():
    """A plan of the replay is made once per top-k value: a grid lets a long study reuse them."""
    grid = tune.topk_grid(*tune.TUNE_RANGES["detections_per_img"])
    assert grid[0] == 10 and grid[-1] == 1000 and len(grid) == 21
    assert np.all(grid[1:] / grid[:-1] <= 1.34)  # no step wider than a third
    assert tune.topk_grid(7, 33).tolist() == [7, 8, 10, 12, 15, 20, 25, 30, 33]
    assert tune.topk_grid(100, 100).tolist() == [100]
