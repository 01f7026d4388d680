"""Issue 21: kills at chosen calls (tests/faults.py) and concurrent processes, on real sqlite stores.
Nothing registered twice, nothing lost, no record that lies. Marked slow: they train and tune."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, tiny_args, train_tiny
from tests.faults import KILLED, run_killed_at
from tests.test_promote import _aliases

pytestmark = pytest.mark.slow
MODEL = "brecahad-faster-rcnn"


def _killed_training(store, synth_dir, epochs: int = 3):
    """A tiny training killed right after its first checkpoint upload: its run id."""
    killed = run_killed_at(
        "detection.train.Checkpoints._upload", tiny_args(synth_dir, f"train.epochs={epochs}"), cwd=store
    )
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    (run,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "RUNNING"
    return run.info.run_id


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.subprocess
def test_two_resumes_of_one_killed_run_at_once_train_it_once(store, synth_dir):
    """Before: both ran; the run held versions 2 and 3 and steps 4-5 of train/loss twice."""
    run_id = _killed_training(store, synth_dir)
    env = dict(os.environ) | {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    args = [sys.executable, "-m", "detection", "train", "--data-dir", str(synth_dir), "--resume", run_id]
    procs = [subprocess.Popen(args, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(args, cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = [err for code, err in results if code == 2][0]
    assert "is being trained by another process" in refused or "already finished" in refused
    assert refused.strip().count("\n") == 0 or "error:" in refused.splitlines()[-1]  # one line says why
    client = MlflowClient()
    assert len(client.search_model_versions(f"run_id='{run_id}'")) == 1
    for key in ("train/loss", "val/loss"):
        steps = _steps(client, run_id, key)
        assert len(steps) == len(set(steps)), key  # no step logged twice


def test_a_rerun_after_a_kill_between_registering_and_recording_registers_nothing(in_store, synth_dir, tmp_path):
    """Before: the rerun registered a second version for the same study and trial."""
    client = MlflowClient()
    source = client.search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]
    study = ["tune", "--model", f"models:/{MODEL}/{source.version}", "--data-dir", str(synth_dir)]
    study += ["--study", "killed", "--storage", str(tmp_path / "journal.log"), "--seed", "0"]
    killed = run_killed_at("detection.tracking.register", [*study, "--n-trials", "6"], cwd=in_store["workdir"])
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    mine = lambda: [v for v in client.search_model_versions(f"name='{MODEL}'") if v.tags.get("study") == "killed"]  # noqa: E731
    assert len(mine()) == 1
    # The rerun's one trial keeps nearly nothing (F1 ~ 0), so the earlier choice stands.
    again = run_cli(*study, "--n-trials", "1", "--range", "score_thresh=0.99:0.99", cwd=in_store["workdir"])
    assert again.returncode == 0, again.stderr[-3000:]
    (version,) = mine()
    assert client.get_model_version_by_alias(MODEL, "challenger").version == version.version


def _copy_versions(client, name, source_name, source_versions):
    client.create_registered_model(name)
    made = []
    for v in source_versions:
        source = client.get_model_version(source_name, str(v))
        made.append(int(client.create_model_version(name, source.source, source.run_id).version))
    return made


def test_a_promotion_killed_between_its_alias_moves_is_settled_by_the_next(in_store, synth_dir, versions):
    """Before: previous = champion = v7 while v9 carried promotion.decision=promoted and its run said so."""
    client = MlflowClient()
    weak, strong, other = _copy_versions(
        client, "settled", versions["name"], [versions["none"], versions["all"], versions["none"]]
    )

    def promote(candidate):
        return ["promote", "--data-dir", str(synth_dir), "--metric", "test/detection_rate", "--candidate", candidate]

    assert run_cli(*promote(f"models:/settled/{weak}"), cwd=in_store["workdir"]).returncode == 0  # first champion
    client.set_registered_model_alias("settled", "previous", str(other))
    killed = run_killed_at(
        "mlflow.tracking.MlflowClient.set_registered_model_alias",
        promote(f"models:/settled/{strong}"),
        cwd=in_store["workdir"],
    )
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    # What the kill left: previous moved, champion not, and nothing that says otherwise but the plan.
    plan = json.loads(client.get_registered_model("settled").tags["promotion.pending"])
    assert plan["aliases"] == {"previous": weak, "champion": strong}
    assert _aliases("settled") == {"champion": weak, "previous": weak}
    assert "promotion.decision" not in client.get_model_version("settled", str(strong)).tags
    assert client.get_run(plan["run"]).info.status == "RUNNING"
    # The next promotion carries the plan out first, then decides its own candidate.
    again = run_cli(*promote(f"models:/settled/{other}"), cwd=in_store["workdir"])
    assert again.returncode == 0 and again.stdout.startswith("kept champion"), again.stderr[-3000:]
    assert _aliases("settled") == {"champion": strong, "previous": weak}
    run = client.get_run(plan["run"])
    assert run.info.status == "FINISHED" and run.data.tags["detection.decision"] == "promoted"
    assert "detection.settled" in run.data.tags
    assert client.get_model_version("settled", str(strong)).tags["promotion.decision"] == "promoted"
    assert "promotion.pending" not in client.get_registered_model("settled").tags


@pytest.mark.subprocess
def test_a_kill_mid_upload_leaves_nothing_behind_and_a_finished_run_keeps_one_checkpoint(store, synth_dir):
    """Before: .artifact.uploading.* stayed in the run for good, and every finished run kept two."""
    run_id = _killed_training(store, synth_dir, epochs=2)
    run = MlflowClient().get_run(run_id)
    folder = run.info.artifact_uri.replace("file://", "") + "/checkpoints"
    planted = os.path.join(folder, ".artifact.uploading.slot-1.pt.tmp0")
    with open(planted, "wb") as f:  # what a kill while the file was being written leaves
        f.write(b"\0" * 1024)
    resumed = train_tiny(synth_dir, cwd=store, extra=("--resume", run_id))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not os.path.exists(planted)
    left = sorted(a.path for a in MlflowClient().list_artifacts(run_id, "checkpoints"))
    assert left == ["checkpoints/latest.json", "checkpoints/slot-1.pt"]  # the last epoch's slot alone
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/checkpoints/latest.json"))["file"] == "slot-1.pt"


@pytest.mark.subprocess
def test_a_training_whose_server_dies_stops_at_once_and_resumes_without_a_gap(tmp_path, synth_dir):
    """Before: it went on printing 'Failed to log run data', lost that epoch's val/loss for good,
    stopped writing its local checkpoint, hung 12 minutes and ended in a traceback."""
    import signal
    import time

    from tests.conftest import tracking_server

    folder, work, saved = tmp_path / "server", tmp_path / "client", tmp_path / "checkpoints"
    folder.mkdir()
    work.mkdir()
    env = dict(os.environ) | {
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "BRECAHAD_CHECKPOINTS": str(saved),
    }
    command = [sys.executable, "-m", "detection", *tiny_args(synth_dir, "train.epochs=4")]
    with tracking_server(folder) as server:
        proc = subprocess.Popen(
            command, cwd=work, env=env | {"MLFLOW_TRACKING_URI": server.uri}, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 600
        while not list(saved.glob("*/latest.json")):  # the first epoch's local checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, "training never saved a checkpoint"
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-training
        died = time.monotonic()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1 and time.monotonic() - died < 180, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "stopped answering" in last and "resume with: python -m detection train --resume" in last, last
    run_id = last.rsplit("--resume ", 1)[1].strip()
    assert (saved / run_id / "latest.pt").exists()  # the local checkpoint did not wait for the server
    with tracking_server(folder) as server:  # back, on the same store
        resumed = subprocess.run(
            [sys.executable, "-m", "detection", "train", "--data-dir", str(synth_dir), "--resume", run_id],
            cwd=work,
            env=env | {"MLFLOW_TRACKING_URI": server.uri},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        client = MlflowClient(tracking_uri=server.uri)
        assert sorted(_steps(client, run_id, "val/loss")) == [0, 1, 2, 3]  # every epoch once: none lost, none twice
        steps = _steps(client, run_id, "train/loss")
        assert sorted(steps) == list(range(len(steps)))
