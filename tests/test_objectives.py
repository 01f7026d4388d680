"""A postprocess study's objectives, driven through the study's own objective function on a
hand-built cache and a real sqlite MLflow store (fast: no model)."""

from pathlib import Path

import optuna
import pytest

from detection import config, tracking
from detection.metrics import Replayer, exact_curve, froc
from detection.postprocess import PostProcess
from detection.tune import Study, TuneRequest, postprocess_objective
from tests.conftest import SMOKE
from tests.test_metrics import RADIUS, make_cache

# 200 x 200 px at 0.5 um/px: 0.01 mm², so each false positive is 100 per mm².
DETECTIONS = [(30, 30, 0.9), (60, 150, 0.8), (90, 90, 0.7), (120, 30, 0.6), (150, 150, 0.5), (170, 60, 0.4)]
CELLS = [(30, 30), (90, 90), (150, 150)]


@pytest.mark.parametrize(
    "score_thresh, expected", [(0.0, (1 / 3 * 3 + 2 / 3 + 1 + 1) / 6), (0.55, (1 + 2 / 3 * 3) / 6)]
)
def test_the_froc_objective_scores_a_trial_by_the_froc_of_what_it_keeps(store, score_thresh, expected):
    """Issue 20: objective=froc. Above 0.55 the trial keeps 2 of 3 cells at most: its FROC is lower."""
    cache = make_cache([(DETECTIONS, CELLS)])
    req = TuneRequest("models:/x/1", Path("."), "froc", 1, objective="froc")
    parent = tracking.create_run("brecahad", "tune froc", {})
    s = Study(req, optuna.create_study(), parent, None, config.load(SMOKE), None, tracking.StepLog(parent))
    objective = postprocess_objective(s, Replayer(cache, "greedy", RADIUS))
    trial = optuna.trial.FixedTrial({"score_thresh": score_thresh, "nms_step": 16, "topk_step": 10})
    value = objective(trial)
    assert value == pytest.approx(expected)
    pp = PostProcess(score_thresh, 0.9, 100)
    assert value == pytest.approx(froc(exact_curve(cache, pp, "greedy", RADIUS))["froc"])
    # The trial's figures are in Optuna's storage and, once written, on the parent's trial/ series.
    assert trial.user_attrs["val"]["froc"] == pytest.approx(expected) and "froc_dr_at_300" in trial.user_attrs["val"]
    assert trial.user_attrs["settings"]["score_thresh"] == score_thresh
    s.log.flush()
    (point,) = tracking.client().get_metric_history(parent, "trial/froc")
    assert point.value == pytest.approx(expected) and point.step == trial.number
