"""End-to-end training on real MLflow stores in temp dirs (marked slow: seconds to a minute each)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from detection import tracking
from detection.data import load_dataset
from tests.conftest import ROOT, SMOKE, TINY, free_port, run_cli, tiny_args, tracking_server, train_tiny

pytestmark = pytest.mark.slow
MODEL = "brecahad-faster-rcnn"


def _runs(client: MlflowClient):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, a.path) if a.is_dir else [a.path])
    return out


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _epoch_models(run, order_by=None):
    """The READY LoggedModels a training run logged, one per epoch (oldest first unless `order_by`)."""
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND status = 'READY'",
        order_by=order_by or [{"field_name": "creation_time", "ascending": True}],
        output_format="list",
    )
    return found


def _mlflow_run(store: Path, data_dir: Path, overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ) | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }  # sample within a short run
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "run",
            str(ROOT),
            "-e",
            "train",
            "--env-manager",
            "local",
            "-P",
            f"config={SMOKE}",
            "-P",
            f"data_dir={data_dir}",
            "-P",
            f"overrides={overrides}",
        ],
        cwd=store,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.subprocess
def test_mlflow_run_trains_logs_and_registers(store, synth_dir):
    result = _mlflow_run(store, synth_dir, f"train.epochs=1 {TINY}")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["train.epochs"] == "1"
    assert params["model.rpn_nms_thresh"] == "0.8" and params["data.split.mode"] == "case"
    assert "train.epochs=1" in params["overrides"]  # the entry point's own params too
    assert _steps(client, run.info.run_id, "train/loss") == [0, 1]  # 2 training images, batch 1
    val = client.get_metric_history(run.info.run_id, "val/detection_rate")[0].value
    assert "epoch 1/1: val loss " in result.stderr and f"detection rate {val:.3f}, FDR " in result.stderr
    assert "integer column" not in result.stderr  # issue 22: MLflow's hint, once per split
    for key in ("train/loss_classifier", "train/loss_box_reg", "train/loss_objectness", "train/loss_rpn_box_reg"):
        assert _steps(client, run.info.run_id, key) == [0, 1]
    for key in ("val/loss", "val/detection_rate", "val/fdr", "lr"):
        assert _steps(client, run.info.run_id, key) == [0]
    assert any(k.startswith("system/") for k in run.data.metrics)
    files = _artifacts(client, run.info.run_id)
    for f in ("config.yaml", "split.json", "loss_curve.png", "checkpoints/latest.json"):
        assert f in files
    # Overlays are images with a step, so the UI's image slider walks them across epochs.
    assert any(f.startswith("images/val_overlay_0_") and "+step+1+" in f and f.endswith(".png") for f in files)
    assert run.info.run_name == "train smoke"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    split = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/split.json"))
    assert run.data.tags["detection.split_hash"] and len(split["train"]) == 2 and len(split["sha256"]) == 6
    contexts = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(contexts) == {"training", "validation", "testing"} and contexts["training"].digest

    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert version.run_id == run.info.run_id and int(version.version) == 1
    # Issue 26: the version's description is its model card, also among its files.
    for words in ("config `smoke`", "| train | 2 | 1: Case_", run.info.run_id, "Training's last validation"):
        assert words in version.description
    assert "## Intended use" in version.description and "## Known limits" in version.description
    card = mlflow.artifacts.load_text(f"models:/{MODEL}/{version.version}/model_card.md")
    assert card == version.description
    # The version is the last epoch's MLflow LoggedModel, its validation metrics linked to it.
    (epoch,) = _epoch_models(run)
    assert epoch.name == "epoch-1" and version.source == f"models:/{epoch.model_id}"
    linked = {m.key: m for m in epoch.metrics}
    assert linked["val/f1"].value == run.data.metrics["val/f1"] and linked["val/f1"].dataset_name == "brecahad-val"
    assert f"logged model `{epoch.model_id}`" in card
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")
    image = load_dataset(synth_dir)[0].read_image()
    out = model.predict(pd.DataFrame({"image": [image]}))
    assert list(out.columns)[:6] == ["image", "x1", "y1", "x2", "y2", "score"]
    from detection.inference import tile_starts

    tiles = len(tile_starts(1024, 256, 64)) * len(tile_starts(1360, 340, 64))  # the tiny config's model inputs
    assert (out["score"] > 0.05).all() and len(out) <= 200 * tiles  # top-k 200 per model input
    torch_model = model.unwrap_python_model().model
    assert not any(p.is_cuda for p in torch_model.parameters())


@pytest.mark.subprocess
def test_invalid_data_fails_the_mlflow_run_and_creates_no_run_directly(store, synth_dir, copy_of):
    bad = copy_of(synth_dir)
    (bad / "groundTruth" / "Case_1-01.json").write_text("{oops")
    result = _mlflow_run(store, bad, f"train.epochs=1 {TINY}")
    assert result.returncode != 0
    client = MlflowClient()
    (run,) = _runs(client)
    assert run.info.status == "FAILED"
    problems = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/problems.txt")
    assert "Case_1-01.json" in problems and "not valid JSON" in problems
    assert not client.search_registered_models()

    direct = run_cli("train", "--config", SMOKE, "--data-dir", str(bad), cwd=store)
    assert direct.returncode == 2 and "Case_1-01.json: not valid JSON" in direct.stderr
    assert len(_runs(client)) == 1


@pytest.mark.subprocess
def test_unreachable_tracking_server_is_a_clear_error(tmp_path, synth_dir):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = run_cli(
        "train", "--config", SMOKE, "--data-dir", str(synth_dir), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}
    )
    assert result.returncode == 2 and f"tracking server {uri} is unreachable" in result.stderr
    assert time.monotonic() - start < 60


@pytest.mark.subprocess
def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(store, synth_dir):
    # An absurd learning rate: the first step is finite, the second (epoch 2) is not.
    result = train_tiny(synth_dir, "train.epochs=2 train.batch_size=2 train.lr=1e30", cwd=store)
    assert result.returncode == 1 and "loss is not finite at step 1" in result.stderr
    client = MlflowClient()
    (run,) = _runs(client)
    assert run.info.status == "FAILED" and "NonFiniteLoss" in run.data.tags["detection.error"]
    latest = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/checkpoints/latest.json"))
    assert latest["epoch"] == 0
    path = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/checkpoints/{latest['file']}")
    state = torch.load(path, weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not client.search_registered_models()


@pytest.mark.subprocess
def test_killed_run_resumes_without_duplicated_or_missing_steps(store, synth_dir):
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detection",
            *tiny_args(synth_dir, "train.epochs=3"),
        ],
        cwd=store,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not list(store.glob("mlruns/*/*/artifacts/checkpoints/latest.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard crash: no handler runs
        proc.wait()
    client = MlflowClient()
    (run,) = _runs(client)
    assert run.info.status == "RUNNING"
    run_id = run.info.run_id
    done_before = len(client.get_metric_history(run_id, "val/loss"))
    assert done_before in (1, 2)

    result = run_cli("train", "--data-dir", str(synth_dir), "--resume", run_id, cwd=store)
    assert result.returncode == 0, result.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(_runs(client)) == 1
    assert _steps(client, run_id, "train/loss") == [0, 1, 2, 3, 4, 5]
    for key in ("val/loss", "val/detection_rate", "val/fdr", "lr"):
        assert _steps(client, run_id, key) == [0, 1, 2]
    lrs = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert np.allclose(lrs, [1e-4, 0.95e-4, 0.95**2 * 1e-4])  # the schedule carried over the restart
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert version.run_id == run_id
    # Issue 26: an epoch's model each, across the kill: what the killed process logged for the epochs
    # the resume trained again was removed. The version is the last epoch's.
    epochs = {m.name: m for m in _epoch_models(run)}
    assert sorted(epochs) == ["epoch-1", "epoch-2", "epoch-3"]
    assert version.source == f"models:/{epochs['epoch-3'].model_id}"
    f1 = {m.step: m.value for m in client.get_metric_history(run_id, "val/f1")}
    for name, m in epochs.items():  # epoch 2's figures may be the killed process's, logged before its model
        linked = {x.key: x.value for x in m.metrics}
        assert linked.get("val/f1", f1[int(name[-1]) - 1]) == f1[int(name[-1]) - 1]
    best = _epoch_models(run, [{"field_name": "metrics.val/f1", "ascending": False}])[0]
    assert {x.key: x.value for x in best.metrics}["val/f1"] == max(
        {x.key: x.value for x in m.metrics}.get("val/f1", -1) for m in epochs.values()
    )


@pytest.mark.subprocess
def test_training_against_a_real_tracking_server(tmp_path, synth_dir, monkeypatch):
    with tracking_server(tmp_path) as server:
        uri = server.uri
        work, scratch = tmp_path / "client", tmp_path / "client-tmp"
        work.mkdir()
        scratch.mkdir()
        result = train_tiny(synth_dir, cwd=work, env={"MLFLOW_TRACKING_URI": uri, "TMPDIR": str(scratch)})
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri)
        version = client.get_model_version_by_alias(MODEL, "challenger")
        assert client.get_run(version.run_id).info.status == "FINISHED"
        assert "checkpoints/latest.json" in _artifacts(client, version.run_id)
        assert not (work / "mlruns").exists() and not (work / "mlflow.db").exists()  # all went to the server
        assert list((tmp_path / "served-artifacts").rglob("slot-0.pt"))
        # A model fetched from a server is a download: none may stay behind in the temp dir (each is a
        # full copy of the model; a team's evaluations and tune workers filled a 50 GB disk).
        assert _downloads_left(scratch) == []
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            detector = tracking.load_model(tracking.resolve_model(f"models:/{MODEL}/{version.version}"))
        finally:
            mlflow.set_tracking_uri(before)
        assert detector.model is not None and _downloads_left(scratch) == []


def _downloads_left(folder: Path) -> list[str]:
    """What a process left in its temp dir, but torch's compile cache."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("torchinductor"))


@pytest.mark.subprocess
def test_a_kill_between_uploads_resumes_from_the_local_checkpoint(store, synth_dir, tmp_path, monkeypatch):
    local = tmp_path / "checkpoints"
    monkeypatch.setenv("BRECAHAD_CHECKPOINTS", str(local))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detection",
            *tiny_args(synth_dir, "train.epochs=3 train.checkpoint_every=2"),
        ],
        cwd=store,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:  # killed in epoch 2: epoch 1 is on local disk only, the first upload is due after epoch 2
        while not list(local.glob("*/latest.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    client = MlflowClient()
    (run,) = _runs(client)
    run_id = run.info.run_id
    assert "checkpoints/latest.json" not in _artifacts(client, run_id)
    assert json.loads((local / run_id / "latest.json").read_text())["epoch"] == 0

    result = run_cli("train", "--data-dir", str(synth_dir), "--resume", run_id, cwd=store)
    assert result.returncode == 0, result.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["detection.resumed_from"] == "local epoch 1"  # lost nothing but epoch 2's start
    assert _steps(client, run_id, "train/loss") == [0, 1, 2, 3, 4, 5]
    # A write's seconds are logged once it is done, in the background of the next epoch: epoch 1's
    # went down with the killed process, which had no next epoch to log it in.
    assert _steps(client, run_id, "train/checkpoint_seconds") == [1, 2]
    uploaded = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/checkpoints/latest.json"))
    assert uploaded["epoch"] == 2  # the last epoch is always uploaded
    assert not (local / run_id).exists()  # a finished run's local copy is removed
