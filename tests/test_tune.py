"""Optuna studies on a real (tiny) registered model; marked slow."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from mlflow.tracking import MlflowClient

from detection.data import load_dataset
from detection.evaluate import Request, cached_evaluation, load_cache
from detection.inference import paper_items
from detection.matching import Counts, box_centres, greedy_match
from detection.metrics import Replayer
from detection.postprocess import PostProcess, apply, keep
from detection.sampling import to_float
from detection.split import Split
from detection.tune import TuneError, TuneRequest, parse_ranges, trial_metrics
from tests.conftest import ROOT, run_cli

MODEL = "brecahad-faster-rcnn"


@pytest.mark.slow
def test_a_trial_equals_running_the_model_with_its_settings(in_store, synth_dir):
    detector = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger").unwrap_python_model()
    model, cfg = detector.model, detector.config
    version = MlflowClient().get_model_version_by_alias(MODEL, "challenger")
    _, cache = cached_evaluation(Request(f"models:/{MODEL}/{version.version}", synth_dir, "val", "paper"))
    cache.meta["border_band"] = 0.0  # without the don't-care band, a trial counts what the model finds per patch
    split = Split.from_dict(mlflow.artifacts.load_dict(f"runs:/{version.run_id}/split.json"))
    by_name = {s.name: s for s in load_dataset(synth_dir)}
    items = paper_items([by_name[n] for n in split.val], cfg, seed=0)
    assert [it.name for it in items] == cache.items_name.tolist()
    replayer = Replayer(cache, "greedy", cfg.match_radius_px)
    # Thresholds from the scores this (barely trained) model gives, so every setting keeps boxes.
    low, high = (float(q) for q in np.quantile(cache.det_scores, [0.5, 0.95]))
    for pp in (PostProcess(0.0, 0.8, 200), PostProcess(low, 0.4, 30), PostProcess(high, 0.65, 1000)):
        apply(model, pp)
        total = Counts(0, 0, 0)
        with torch.no_grad():
            for item in items:
                image = to_float(item.image)
                out = model([image])[0]
                tp = (
                    greedy_match(
                        box_centres(out["boxes"].numpy()), out["scores"].numpy(), item.points, cfg.match_radius_px
                    )
                    >= 0
                )
                total = total + Counts(int(tp.sum()), int(len(tp) - tp.sum()), len(item.points) - int(tp.sum()))
        assert replayer.counts(pp) == total
        assert total.tp + total.fp > 0


def _mlflow_tune(workdir, uri, *params):
    env = dict(os.environ) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    args = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "tune", "--env-manager", "local"]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def _study_runs(client, study: str):
    """A postprocess study's parent run, the nested runs of the trials a user opens (the chosen one,
    the top ten or the Pareto front), and the study's table of every trial."""
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`detection.study` = '{study}' and tags.`detection.study_kind` = 'postprocess'",
    )
    trials = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`detection.trial` != ''",
    )
    table = client.load_table(parent.info.experiment_id, "study_trials.json", run_ids=[parent.info.run_id])
    return parent, trials, table


@pytest.mark.slow
def test_postprocess_study_through_mlflow_run(in_store, synth_dir, tmp_path):
    client = MlflowClient()
    before = {int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")}
    source = client.get_model_version_by_alias(MODEL, "challenger")
    journal = f"storage={tmp_path / 'journal.log'}"
    result = _mlflow_tune(
        in_store["workdir"],
        in_store["uri"],
        f"data_dir={synth_dir}",
        "study=pp",
        "n_trials=40",
        f"model=models:/{MODEL}/{source.version}",
        journal,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parent, trials, table = _study_runs(client, "pp")
    assert sorted(table["trial"]) == list(range(40)) and table["val.f1"].notna().all()
    assert len(client.get_metric_history(parent.info.run_id, "trial/f1")) == 40
    # Nested runs for the chosen trial and the top ten, not forty.
    assert 10 <= len(trials) <= 11 and all("val/f1" in t.data.metrics for t in trials)
    assert all(t.data.params["pp.score_thresh"] for t in trials)
    assert parent.info.status == "FINISHED"
    for k in ("detection_rate", "fdr", "f1", "ap", "box_ap50", "cells"):
        assert f"test/{k}" in parent.data.metrics
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/study.png", "figures/tradeoff.png", "figures/fig4_tpr_fdr.png"} <= files
    assert "figures/parallel_coordinates.png" in files

    assert client.get_model_version(MODEL, source.version).tags["tune.study.pp"] == parent.info.run_id
    new = client.get_model_version_by_alias(MODEL, "challenger")
    assert int(new.version) not in before and new.tags["study"] == "pp"
    chosen = parent.data.tags["detection.chosen_trial"]
    assert new.tags["trial"] == chosen and new.tags["source_version"] == str(source.version)
    tuned = mlflow.pyfunc.load_model(f"models:/{MODEL}/{new.version}").unwrap_python_model().config
    assert tuned.model.box_score_thresh == pytest.approx(float(parent.data.params["chosen.score_thresh"]))
    assert tuned.model.box_nms_thresh == pytest.approx(float(parent.data.params["chosen.nms_thresh"]))

    again = _mlflow_tune(
        in_store["workdir"],
        in_store["uri"],
        f"data_dir={synth_dir}",
        "study=pp",
        "n_trials=5",
        f"model=models:/{MODEL}/{source.version}",
        journal,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    # The rerun resumed the same study under the same parent run, whose table now holds every trial.
    assert sorted(_study_runs(client, "pp")[2]["trial"]) == list(range(45))

    # Both runs replayed one inference pass per split of the source version (made by the first
    # study, or by an earlier evaluation of the same version and images).
    evals = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`detection.evaluation` = 'true' and "
        f"tags.`detection.model_version` = '{source.version}' and "
        "tags.`detection.protocol` = 'whole' and tags.`detection.model_name` = "
        f"'{MODEL}'",
    )
    splits = [r.data.tags["detection.split"] for r in evals]
    assert splits.count("val") == 1 and "test" in splits

    # The tuned version keeps on each test image exactly what the study's replay kept at the chosen point.
    (test_eval,) = [r for r in evals if r.data.tags["detection.split"] == "test"]
    cache = load_cache(test_eval.info.run_id)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{new.version}")
    chosen_pp = PostProcess.of_config(tuned.model)
    for i, name in enumerate(cache.items_name):
        kept = cache.det_range(i)[0] + keep(cache.tiles(i), chosen_pp, tuned.match_radius_px)
        image = tifffile.imread(synth_dir / "images" / f"{name}.tif")
        served = pyfunc.predict(pd.DataFrame({"image": [image]}))
        assert len(served) == len(kept) > 0
        assert np.array_equal(served[["x1", "y1", "x2", "y2"]].to_numpy(np.float32), cache.det_boxes[kept])


@pytest.mark.slow
def test_a_froc_study_maximises_the_mean_detection_rate_at_10_to_300_fp_per_mm2(in_store, synth_dir, tmp_path):
    """Issue 20: the FROC as a tune objective. Each trial's FROC is read off its replayed curve."""
    from detection.metrics import exact_curve, froc

    client = MlflowClient()
    source = client.get_model_version_by_alias(MODEL, "challenger")
    result = run_cli(
        "tune",
        "--model",
        f"models:/{MODEL}/{source.version}",
        "--data-dir",
        str(synth_dir),
        "--study",
        "froc",
        "--objective",
        "froc",
        "--n-trials",
        "12",
        "--seed",
        "0",
        "--storage",
        str(tmp_path / "journal.log"),
        cwd=in_store["workdir"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parent, trials, table = _study_runs(client, "froc")
    assert len(table) == 12 and table["val.froc"].notna().all() and table["val.froc_dr_at_300"].notna().all()
    by_trial = {t.data.tags["detection.trial"]: t for t in trials}
    chosen = by_trial[parent.data.tags["detection.chosen_trial"]]
    assert chosen.data.metrics["val/froc"] == pytest.approx(table["val.froc"].max())
    assert "val/froc_dr_at_300" in chosen.data.metrics
    best = chosen
    # A trial's FROC is the evaluation's FROC of the same settings on the val cache.
    _, cache = cached_evaluation(Request(f"models:/{MODEL}/{source.version}", synth_dir, "val"))
    params = best.data.params
    pp = PostProcess(
        float(params["pp.score_thresh"]), float(params["pp.nms_thresh"]), int(params["pp.detections_per_img"])
    )
    again = froc(exact_curve(cache, pp, "greedy", cache.meta["match_radius"]))
    assert again["froc"] == pytest.approx(best.data.metrics["val/froc"], abs=1e-9)


@pytest.mark.slow
def test_three_workers_share_one_fresh_sqlite_study(in_store, synth_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    source = MlflowClient().search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]
    env = dict(os.environ) | {"MLFLOW_TRACKING_URI": in_store["uri"]}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "detection",
                "tune",
                "--model",
                f"models:/{MODEL}/{source.version}",
                "--data-dir",
                str(synth_dir),
                "--study",
                "shared",
                "--n-trials",
                "20",
                "--storage",
                storage,
                "--seed",
                str(seed),
                "--objective",
                "pareto",
            ],
            cwd=in_store["workdir"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2, 3)
    ]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (_out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert sorted(t.number for t in study.trials if t.state in done) == list(range(60))
    # A trial that keeps nothing (FDR 0) is pruned, never on the Pareto front.
    assert all(trial_metrics(t)["tp"] + trial_metrics(t)["fp"] > 0 for t in study.best_trials)
    assert sum("registered version" in out for out, _ in outputs) == 1  # one worker finished the study
    client = MlflowClient()
    parent = client.get_run(study.user_attrs["mlflow_run_id"])
    # The three workers' trials are one series on the shared parent run, and one table.
    steps = sorted(m.step for m in client.get_metric_history(parent.info.run_id, "trial/f1"))
    assert steps == list(range(60))
    table = client.load_table(parent.info.experiment_id, "study_trials.json", run_ids=[parent.info.run_id])
    assert sorted(table["trial"]) == list(range(60))
    trials = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`detection.trial` != ''",
    )
    assert {int(t.data.tags["detection.trial"]) for t in trials} >= {t.number for t in study.best_trials}
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "pareto_front.json" in files


@pytest.mark.slow
def test_training_study_trains_a_model_per_trial(in_store, synth_dir):
    result = run_cli(
        "tune",
        "--data-dir",
        str(synth_dir),
        "--study",
        "iou",
        "--kind",
        "training",
        "--n-trials",
        "2",
        "--seed",
        "0",
        "--train-overrides",
        "train.epochs=1",
        cwd=in_store["workdir"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`detection.study` = 'iou'"
    )
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trained = [c for c in children if "model.rpn_fg_iou_thresh" in c.data.params]
    assert len(trained) == 2 and all("val/f1" in c.data.metrics for c in trained)
    new = client.get_model_version_by_alias(MODEL, "challenger")
    assert new.tags["study"] == "iou" and new.run_id in {c.info.run_id for c in trained}
    assert any(c.data.tags.get("detection.evaluation") == "true" and "test/f1" in c.data.metrics for c in children)


def test_every_kind_of_study_has_its_class():
    from detection import tune
    from detection.choices import TUNE_KINDS

    assert set(tune.KINDS) == set(TUNE_KINDS)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"ranges": {"score_thresh": (0.6, 0.2)}}, "low > high"),
        ({"n_trials": 0}, "n_trials=0 must be > 0"),
        ({"objective": "accuracy"}, "objective='accuracy'"),
        ({"kind": "grid"}, "kind='grid'"),
        ({"ranges": {"nms": (0.1, 0.2)}}, "range 'nms' is unknown"),
        ({"objective": "froc", "kind": "training"}, "use kind=postprocess"),
    ],
)
def test_bad_requests_fail_before_any_trial(change, words, tmp_path):
    base = {"model": "models:/x@y", "data_dir": tmp_path, "study": "s", "n_trials": 5}
    with pytest.raises(TuneError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TuneRequest(**(base | change)).check()


@pytest.mark.slow
def test_unreachable_storage_and_bad_ranges_from_the_cli(in_store, synth_dir, tmp_path):
    bad = run_cli(
        "tune", "--data-dir", str(synth_dir), "--study", "x", "--range", "score_thresh=0.9:0.1", cwd=in_store["workdir"]
    )
    assert bad.returncode == 2 and "low > high" in bad.stderr
    (tmp_path / "a-file").write_text("not a folder")
    dead = run_cli(
        "tune",
        "--data-dir",
        str(synth_dir),
        "--study",
        "x",
        "--storage",
        f"sqlite:///{tmp_path}/a-file/optuna.db",
        cwd=in_store["workdir"],
    )
    assert dead.returncode == 2 and "cannot be opened" in dead.stderr
    assert parse_ranges(["score_thresh=0.1:0.5 nms_thresh=0.3:0.6"]) == {
        "score_thresh": (0.1, 0.5),
        "nms_thresh": (0.3, 0.6),
    }
    with pytest.raises(TuneError, match="NAME=LOW:HIGH"):
        parse_ranges(["score_thresh=0.1"])


@pytest.mark.slow
def test_a_postprocess_study_of_a_tta_version_searches_the_fused_threshold(in_store, synth_dir, tmp_path):
    """The fused threshold joins the search, replayed from each view's cache; the chosen trial's
    counts are what evaluating the registered version on val gives."""
    import json

    import optuna

    from detection import tracking
    from detection.evaluate import evaluate
    from detection.predict import log_detector

    client = MlflowClient()
    source = client.search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]
    detector = mlflow.pyfunc.load_model(f"models:/{MODEL}/{source.version}").unwrap_python_model()
    with mlflow.start_run(run_name="tta", experiment_id=client.create_experiment("tta-tune")):
        mlflow.log_text(json.dumps(mlflow.artifacts.load_dict(f"runs:/{source.run_id}/split.json")), "split.json")
        uri = log_detector(detector.config.replace("eval.tta_views=[none,h]"), detector.model)
    name = "brecahad-tta-tune"  # its own name: the shared store's tests count the trained model's versions
    tracking.register(uri, name, "tta", {})
    storage = tmp_path / "journal.log"
    result = run_cli(
        "tune",
        "--model",
        f"models:/{name}@tta",
        "--data-dir",
        str(synth_dir),
        "--study",
        "tta",
        "--n-trials",
        "8",
        "--storage",
        str(storage),
        "--seed",
        "3",
        cwd=in_store["workdir"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(
        study_name="tta",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage))),
    )
    assert all("tta_thresh" in t.params for t in study.trials)
    chosen = study.best_trial
    tuned = tracking.resolve_model(f"models:/{name}@challenger")
    cfg = tracking.load_model(tuned).config
    assert cfg.eval.tta_views == ("none", "h") and cfg.eval.tta_thresh == chosen.params["tta_thresh"]
    assert cfg.model.box_score_thresh == chosen.params["score_thresh"]
    _, metrics = evaluate(Request(tuned.pinned, synth_dir, "val"))
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == tuple(trial_metrics(chosen)[k] for k in ("tp", "fp", "fn"))
