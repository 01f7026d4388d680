"""`compare`: FDR at equal detection rate with case intervals, and a version with test-time
augmentation judged on its fused detections, as evaluate, predict and the served model see them."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from detection import tracking
from detection.compare import THRESHOLDS, intervals
from detection.data import load_dataset
from detection.metrics import fdr_at
from detection.train import log_detector
from tests.conftest import run_cli


def _counts(tp, fp, fn):
    return np.stack([np.asarray(tp, float), np.asarray(fp, float), np.asarray(fn, float)], -1)


def test_fdr_is_read_at_the_highest_threshold_that_reaches_the_rate():
    # Thresholds rise left to right: detection rate 1.0, 0.95, 0.9, 0.5; FDR 0.5, 0.3, 0.1, 0.0.
    counts = _counts([20, 19, 18, 10], [20, 8, 2, 0], [0, 1, 2, 10])
    assert fdr_at(counts, 0.95) == pytest.approx(8 / 27)
    assert fdr_at(counts, 0.90) == pytest.approx(0.1)
    assert fdr_at(counts, 0.99) == pytest.approx(0.5)
    assert np.isnan(fdr_at(_counts([5], [0], [5]), 0.9))  # never reached


def test_intervals_resample_cases_and_contain_the_estimate():
    rng = np.random.default_rng(0)
    units = np.stack(
        [
            _counts(
                np.linspace(30, 5, 50).round() + rng.integers(0, 3, 50),
                np.linspace(40, 0, 50).round(),
                np.linspace(0, 25, 50).round(),
            )
            for _ in range(6)
        ]
    )
    value = fdr_at(units.sum(0), 0.9)
    low, high = intervals(units, 0.9, seed=0, n=500)
    assert low <= value <= high and high - low < 0.5
    single = intervals(units[:1], 0.9, seed=0, n=500)
    assert single[0] == single[1] == pytest.approx(float(fdr_at(units[0], 0.9)))


def test_the_highest_common_detection_rate_is_reached_by_every_version():
    from detection.compare import highest_common

    curves = {
        "a": pd.DataFrame({"detection_rate": [0.5, 0.76346, np.nan]}),
        "b": pd.DataFrame({"detection_rate": [0.95, 0.8]}),
    }
    assert highest_common(curves) == 0.7634
    counts = np.array([[[76346, 10, 100000 - 76346]]], float)
    assert np.isfinite(fdr_at(counts, highest_common(curves))).all()


@pytest.mark.slow
def test_compare_logs_one_run_and_a_tta_version_is_judged_on_fused_detections(in_store, synth_dir):
    client = MlflowClient()
    plain = client.get_model_version_by_alias("brecahad-faster-rcnn", "challenger")
    detector = mlflow.pyfunc.load_model(f"models:/brecahad-faster-rcnn/{plain.version}").unwrap_python_model()
    split = mlflow.artifacts.load_dict(f"runs:/{plain.run_id}/split.json")
    # Not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to every later test's subprocesses.
    with mlflow.start_run(run_name="tta", experiment_id=client.create_experiment("tta-versions")):
        mlflow.log_text(json.dumps(split), "split.json")
        cfg = detector.config.replace("eval.tta_views=[none,h,v,hv]", "eval.tta_thresh=0.05")
        uri = log_detector(cfg, detector.model)
    # Under a name of its own: the shared store's tests count the trained model's versions.
    tta = tracking.register(uri, "brecahad-tta", "tta", {"case": "tta"})

    result = run_cli(
        "compare",
        "--models",
        f"models:/brecahad-faster-rcnn/{plain.version} models:/brecahad-tta/{tta}",
        "--data-dir",
        str(synth_dir),
        "--targets",
        "0.5 0.9",
        cwd=in_store["workdir"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("run ")[-1].split(":")[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["detection.comparison"] == "true"
    files = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"comparison.json", "comparison.csv", "figures/dr_vs_fdr.png"} <= files
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/comparison.csv"))
    assert len(table) == 2 and (table.ci_unit == "image").all()  # the synthetic test split is one case
    for col in [c for c in table.columns if c.startswith("fdr_at_dr_") and not c.endswith(("low", "high"))]:
        for _, row in table.iterrows():
            if np.isfinite(row[col]):
                assert row[col + "_ci_low"] - 1e-9 <= row[col] <= row[col + "_ci_high"] + 1e-9
    # The TTA version's evaluation holds a raw cache per flip and judges the fused detections.
    evaluation = client.get_run(table.evaluation_run[1])
    assert evaluation.data.tags["detection.tta_views"] == "none,h,v,hv"
    logged = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"predictions.npz", "predictions_h.npz", "predictions_v.npz", "predictions_hv.npz"} <= logged
    # ... and its pyfunc returns, on a test image, what that evaluation counted.
    from detection.compare import CompareRequest, judged

    name = split["test"][0]
    image = [s for s in load_dataset(synth_dir) if s.name == name][0].read_image()
    served = mlflow.pyfunc.load_model(f"models:/brecahad-tta/{tta}").predict(pd.DataFrame({"image": [image]}))
    req = CompareRequest((f"models:/brecahad-tta/{tta}",), synth_dir)
    _, cache, pp = judged(req, tracking.resolve_model(f"models:/brecahad-tta/{tta}"), run_id)
    i = list(cache.items_name).index(name)
    lo, hi = cache.det_range(i)
    fused = cache.det_scores[lo:hi]
    assert len(served) == int((fused > np.float32(pp.score_thresh)).sum()) > 0
    assert np.allclose(np.sort(served.score.to_numpy())[::-1], fused[fused > np.float32(pp.score_thresh)], atol=1e-5)
    assert len(THRESHOLDS) > 300
