"""`compare`: FDR at equal detection rate with case intervals, and a version with test-time
augmentation judged on its fused detections, as evaluate, predict and the served model see them."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from detection import tracking
from detection.compare import Units, dr_at_density, interval, reader
from detection.data import load_dataset
from detection.metrics import fdr_at
from detection.predict import log_detector
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
    ci = interval(Units(units, np.ones(6), "case"), reader("fdr", 0.9), seed=0, n=500)
    assert ci.low <= value <= ci.high and ci.high - ci.low < 0.5 and ci.reached == 1.0 and not ci.note
    few = interval(Units(units[:4], np.ones(4), "case"), reader("fdr", 0.9), seed=0, n=500)
    assert np.isnan(few.low) and "4 case(s), fewer than 5" in few.note


def test_an_interval_says_how_many_resamples_reach_the_target():
    """Issue 20: resamples that never reach the target were dropped without saying so."""
    # Four cases find at most 0.8 of their cells, one finds all: a resample reaches 0.9 only when it
    # draws that one (1 - 0.8^5 = 67% of them).
    units = np.stack([_counts([8, 5], [1, 0], [2, 5])] * 4 + [_counts([40, 40], [20, 0], [0, 0])])
    ci = interval(Units(units, np.ones(5), "case"), reader("fdr", 0.9), seed=0, n=1000)
    assert 0.6 <= ci.reached <= 0.74 and np.isfinite(ci.low)


def test_the_froc_reading_takes_the_lowest_threshold_within_the_density():
    # Thresholds rise left to right; 2 mm²: 10, 4, 1, 0 false positives per mm².
    counts = _counts([20, 18, 12, 5], [20, 8, 2, 0], [0, 2, 8, 15])
    assert dr_at_density(counts, 2.0, 5) == pytest.approx(0.9)
    assert dr_at_density(counts, 2.0, 0.5) == pytest.approx(0.25)
    assert dr_at_density(counts[1:], 2.0, 100) == pytest.approx(0.9)  # past the curve's end: its last rate
    assert dr_at_density(_counts([5], [10], [5]), 1.0, 1) == 0.0  # even the highest threshold exceeds it


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
    # Two images: too few units for a 95% interval, and the table says so (issue 20).
    assert table.ci_note.str.contains("2 image\\(s\\), fewer than 5").all()
    assert table[[c for c in table.columns if c.endswith(("_ci_low", "_ci_high"))]].isna().all().all()
    assert table["fdr_at_dr_0.5"].notna().all()
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
    radius = float(run.data.tags["detection.match_radius_um"])
    _, cache, pp = judged(req, tracking.resolve_model(f"models:/brecahad-tta/{tta}"), radius, run_id)
    i = list(cache.items_name).index(name)
    lo, hi = cache.det_range(i)
    fused = cache.det_scores[lo:hi]
    assert len(served) == int((fused > np.float32(pp.score_thresh)).sum()) > 0
    assert np.allclose(np.sort(served.score.to_numpy())[::-1], fused[fused > np.float32(pp.score_thresh)], atol=1e-5)

    # The FROC axis reuses both evaluations and reads detection rates at false positives per mm².
    froc = run_cli(
        "compare",
        "--models",
        f"models:/brecahad-faster-rcnn/{plain.version} models:/brecahad-tta/{tta}",
        "--data-dir",
        str(synth_dir),
        "--axis",
        "froc",
        cwd=in_store["workdir"],
    )
    assert froc.returncode == 0, froc.stderr[-3000:]
    froc_run = froc.stdout.split("run ")[-1].split(":")[0]
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{froc_run}/comparison.csv"))
    assert set(table.evaluation_run) == set(
        pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/comparison.csv")).evaluation_run
    )
    assert {"dr_at_10_fp_per_mm2", "dr_at_300_fp_per_mm2", "froc"} <= set(table.columns)
    assert (table.dr_at_10_fp_per_mm2 <= table.dr_at_300_fp_per_mm2).all()
    assert "figures/froc.png" in {a.path for a in client.list_artifacts(froc_run, "figures")}


def test_the_sweep_reads_every_threshold_where_what_is_kept_changes():
    """Issue 20: a grid of thresholds could move an FDR at a target rate by 0.01; the sweep now reads
    the counts just below every kept score, so the FDR at a rate is the exact one."""
    from detection.metrics import threshold_counts
    from detection.postprocess import PostProcess
    from tests.test_metrics import RADIUS, make_cache

    rng = np.random.default_rng(5)
    cells = [tuple(c) for c in rng.uniform(20, 180, (30, 2))]
    dets = [(x + rng.normal(0, 3), y + rng.normal(0, 3), rng.uniform(0.01, 0.2)) for x, y in cells[:27]]
    dets += [tuple(rng.uniform(20, 180, 2)) + (rng.uniform(0.01, 0.2),) for _ in range(40)]
    cache = make_cache([(dets, cells)])
    _, thresholds, counts = threshold_counts(cache, PostProcess(0.0, 1.0, 1000), "greedy", RADIUS)
    assert len(thresholds) == len({np.float32(s) for *_, s in dets}) + 1 and np.all(np.diff(thresholds) > 0)
    # Brute force: keep the detections scoring at least each score, match greedily, read the FDR.
    from detection.matching import greedy_match

    scores = np.array([s for *_, s in dets], np.float32)
    best = None
    for s in np.sort(scores)[::-1]:
        mine = scores >= s
        tp = int(
            (greedy_match(np.array([d[:2] for d in dets])[mine], scores[mine], np.array(cells), RADIUS) >= 0).sum()
        )
        if tp / len(cells) >= 0.8:
            best = (mine.sum() - tp) / mine.sum()
            break
    assert fdr_at(counts.sum(0), 0.8) == pytest.approx(best)
