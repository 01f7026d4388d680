"""Evaluation of a real (tiny) registered model on real stores; marked slow."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from detection.data import load_dataset
from detection.evaluate import judge, load_cache
from detection.postprocess import PostProcess, apply, raw_outputs, replay
from detection.sampling import validation_patches
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow
MODEL = "brecahad-faster-rcnn"


def _detector():
    return mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger").unwrap_python_model()


def test_replay_equals_running_the_model(in_store, synth_dir):
    detector = _detector()
    model, cfg = detector.model, detector.config
    patches = validation_patches(load_dataset(synth_dir)[:2], cfg.data, seed=5, per_image=2)
    settings = [PostProcess(0.05, 0.8, 200), PostProcess(0.0, 0.5, 100), PostProcess(0.3, 0.3, 20),
                PostProcess(0.01, 0.95, 1000)]
    compared = 0
    with torch.no_grad():
        for patch in patches:
            image = patch.tensors()[0]
            with raw_outputs(model):
                raw = {k: v.numpy() for k, v in model([image])[0].items()}
            assert len(raw["scores"]) > 100  # raw output: far more boxes than the model keeps
            for pp in settings:
                apply(model, pp)
                own = model([image])[0]
                kept = replay(raw["boxes"], raw["scores"], raw["labels"], pp)
                assert np.array_equal(raw["boxes"][kept], own["boxes"].numpy())
                assert np.array_equal(raw["scores"][kept], own["scores"].numpy())
                assert np.array_equal(raw["labels"][kept], own["labels"].numpy())
                compared += len(kept)
    assert compared > 100


def _mlflow(*args, cwd, uri):
    env = dict(os.environ) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([str(Path(sys.executable).parent / "mlflow"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_mlflow_run_evaluate_logs_everything_and_recomputes(in_store, synth_dir):
    result = _mlflow("run", str(ROOT), "-e", "evaluate", "--env-manager", "local", "-P", f"data_dir={synth_dir}",
                     "-P", "protocol=whole", cwd=in_store["workdir"], uri=in_store["uri"])
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "tags.`detection.evaluation` = 'true' and tags.`detection.protocol` = 'whole'")[0]
    assert run.info.status == "FINISHED"
    version = client.get_model_version_by_alias(MODEL, "challenger")
    tags = run.data.tags
    assert tags["detection.model_name"] == MODEL and tags["detection.model_version"] == str(version.version)
    assert tags["detection.training_run_id"] == version.run_id and tags["detection.split"] == "test"
    m = run.data.metrics
    for k in ("detection_rate", "fdr", "precision", "f1", "tp", "fp", "fn", "ap50", "ap",
              "detection_rate_ci_low", "detection_rate_ci_high", "fdr_ci_low", "fdr_ci_high", "f1_ci_low", "f1_ci_high"):
        assert f"test/{k}" in m, k
    assert m["test/tp"] + m["test/fn"] > 50  # the two held-out synthetic images' tumour cells
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.npz", "test_per_image.json", "test_threshold_curve.csv", "figures", "overlays"} <= files
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/fig4_tpr_fdr.png", "figures/precision_recall.png"}

    cache = load_cache(run.info.run_id)
    assert len(cache) == 2 and cache.meta["protocol"] == "whole" and len(cache.det_scores) > len(cache.gt_points)
    pp = PostProcess(**cache.meta["postprocess"])
    again = judge(cache, pp, "greedy", cache.meta["match_radius"]).metrics
    for k in ("detection_rate", "fdr", "ap50"):
        assert again[k] == pytest.approx(m[f"test/{k}"], abs=1e-9)


def test_paper_protocol_draws_ten_patches_per_image(in_store, synth_dir):
    result = run_cli("evaluate", "--data-dir", str(synth_dir), "--matching", "hungarian", cwd=in_store["workdir"])
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split()[1].rstrip(":")
    cache = load_cache(run_id)
    assert len(cache) == 20 and cache.items_size.tolist() == [[256, 340]] * 20  # the tiny config's patch
    assert MlflowClient().get_run(run_id).data.tags["detection.matching"] == "hungarian"


@pytest.mark.parametrize("model, words", [
    ("models:/no-such-model@challenger", "no registered model named 'no-such-model'"),
    (f"models:/{MODEL}/99", "does not exist"),
    (f"models:/{MODEL}@champion", "does not exist"),
    ("runs:/abc/model", "not a registry URI"),
])
def test_unknown_models_fail_cleanly(in_store, synth_dir, model, words):
    before = len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    result = run_cli("evaluate", "--model", model, "--data-dir", str(synth_dir), cwd=in_store["workdir"])
    assert result.returncode == 2 and words in result.stderr
    client = MlflowClient()
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


def test_missing_test_images_and_leakage_are_refused(in_store, synth_dir, copy_of):
    client = MlflowClient()
    version = client.get_model_version_by_alias(MODEL, "challenger")
    split = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/split.json")
    partial = copy_of(synth_dir)
    for name in split["test"]:
        (partial / "images" / f"{name}.tif").unlink()
        (partial / "groundTruth" / f"{name}.json").unlink()
    result = run_cli("evaluate", "--data-dir", str(partial), cwd=in_store["workdir"])
    assert result.returncode == 2 and "lacks 2 of the 2 test images" in result.stderr

    leak = run_cli("evaluate", "--data-dir", str(synth_dir), "--split", "all", cwd=in_store["workdir"])
    assert leak.returncode == 2 and "were in the training split" in leak.stderr
    for name in split["train"]:
        assert name in leak.stderr
    allowed = run_cli("evaluate", "--data-dir", str(synth_dir), "--split", "all", "--allow-overlap", "true",
                      cwd=in_store["workdir"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    run = client.get_run(allowed.stdout.split()[1].rstrip(":"))
    assert run.data.tags["detection.allow_overlap"] == "true" and "all/detection_rate" in run.data.metrics
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1  # evaluation never touches the registry


def test_model_without_a_recorded_split(in_store, synth_dir):
    client = MlflowClient()
    version = client.get_model_version_by_alias(MODEL, "challenger")
    # The same weights, registered from a run that never recorded a split.
    location = client.get_logged_model(version.source.split("/")[-1]).artifact_location
    with mlflow.start_run() as bare:
        pass
    client.create_registered_model("orphan-model")
    orphan = client.create_model_version("orphan-model", location, run_id=bare.info.run_id)
    uri = f"models:/orphan-model/{orphan.version}"
    result = run_cli("evaluate", "--model", uri, "--data-dir", str(synth_dir), cwd=in_store["workdir"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "recorded no split.json" in result.stderr and "split=all" in result.stderr
    cohort = run_cli("evaluate", "--model", uri, "--data-dir", str(synth_dir), "--split", "all",
                     cwd=in_store["workdir"])
    assert cohort.returncode == 0, cohort.stderr[-2000:]  # a new cohort needs no recorded split
    client.delete_registered_model("orphan-model")


def test_mlflow_run_evaluate_on_the_real_sample(tmp_path):
    from tests.conftest import SAMPLE, TINY, need_shared

    sample = need_shared(SAMPLE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained = run_cli("train", "--config", str(ROOT / "experiments" / "smoke.yaml"), "--data-dir", str(sample),
                      "-o", f"{TINY} train.epochs=1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = _mlflow("run", str(ROOT), "-e", "evaluate", "--env-manager", "local", "-P", f"data_dir={sample}",
                     cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`detection.evaluation` = 'true'")
    assert run.info.status == "FINISHED" and run.data.tags["detection.protocol"] == "paper"
    cells = run.data.metrics["test/tp"] + run.data.metrics["test/fn"]
    assert cells > 100  # the held-out real case's tumour cells, seen through 10 patches per image
    assert 0 <= run.data.metrics["test/detection_rate"] <= 1 and "test/ap50" in run.data.metrics
