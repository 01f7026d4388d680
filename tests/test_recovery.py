"""Crashes and races: a SIGKILLed tune worker, promotions started together, no duplicate versions,
refusals that leave nothing behind. Real processes on real sqlite stores; marked slow."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from detection import studies
from tests.conftest import ROOT, TINY, child_env, run_cli

pytestmark = pytest.mark.slow
MODEL = "brecahad-faster-rcnn"
RUNNING = optuna.trial.TrialState.RUNNING


def _storage(kind, tmp_path):
    return str(tmp_path / "journal.log") if kind == "journal" else f"sqlite:///{tmp_path / 'optuna.db'}"


def _load(study_name, storage):
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=study_name, storage=storage)


def _worker(in_store, synth_dir, storage, study, n_trials, *extra):
    env = dict(os.environ) | {"MLFLOW_TRACKING_URI": in_store["uri"]}
    source = MlflowClient().search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]
    return subprocess.Popen(
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
            study,
            "--n-trials",
            str(n_trials),
            "--storage",
            storage,
            "--heartbeat",
            "1",
            *extra,
        ],
        cwd=in_store["workdir"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _training_run_started(study, numbers):
    """The running trial's nested training run exists (the worker is inside its epochs)."""
    client = MlflowClient()
    parent = study.user_attrs.get("mlflow_run_id")
    return parent and client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}' and attributes.run_name = "
        f"'trial {numbers[0]}' and attributes.status = 'RUNNING'",
    )


def _kill_inside_a_trial(worker, storage, study_name, ready=lambda study, numbers: True, timeout=600):
    """SIGKILL the worker while the storage shows one of its trials RUNNING: stop it, look, kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.communicate()[1][-3000:]
        time.sleep(0.3)
        try:
            study = _load(study_name, storage)
        except KeyError:
            continue
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            running = [t.number for t in study.get_trials(deepcopy=False, states=(RUNNING,))]
            now = bool(running) and bool(ready(study, running))
        except Exception:  # stopped while it held a store's write lock ("database is locked"): look again
            now = False
        if now:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            return running
        os.kill(worker.pid, signal.SIGCONT)
    raise AssertionError("the worker never showed a running trial")


@pytest.mark.parametrize(
    "storage_kind, kind",
    [("journal", "postprocess"), ("sqlite", "postprocess"), ("journal", "training"), ("sqlite", "training")],
)
def test_a_killed_worker_does_not_stall_its_study(in_store, synth_dir, tmp_path, storage_kind, kind):
    storage = _storage(storage_kind, tmp_path)
    study_name = f"crash-{storage_kind}-{kind}"
    extra = ["--kind", kind] + (["--train-overrides", "train.epochs=1"] if kind == "training" else [])
    first = _worker(in_store, synth_dir, storage, study_name, 10_000 if kind == "postprocess" else 50, *extra)
    dead = _kill_inside_a_trial(
        first, storage, study_name, _training_run_started if kind == "training" else lambda study, numbers: True
    )
    killed_at = time.monotonic()

    second = _worker(in_store, synth_dir, storage, study_name, 2, *extra)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-3000:]
    assert "registered version" in out and f"failed trial {dead[0]}" in out
    study = _load(study_name, storage)
    states = {t.number: t.state for t in study.trials}
    assert states[dead[0]] == optuna.trial.TrialState.FAIL
    assert RUNNING not in states.values() and optuna.trial.TrialState.WAITING not in states.values()
    # The dead trial was retried with its parameters.
    retried = [t for t in study.trials if studies.retried_trial(t) == dead[0]]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE
    client = MlflowClient()
    parent = client.get_run(study.user_attrs["mlflow_run_id"])
    # This study's runs only: the four cases share one store, and one failure must not fail the rest.
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert parent.info.status == "FINISHED" and parent.data.tags["detection.registered_version"]
    if kind == "training":  # the dead trial's nested training run is KILLED, not left RUNNING
        (nested,) = [
            r
            for r in runs
            if r.info.run_name == f"trial {dead[0]}" and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ]
        assert nested.info.status == "KILLED"
    print(
        f"{storage_kind}/{kind}: the killed trial was failed and its retry done {time.monotonic() - killed_at:.1f} s "
        f"after the kill"
    )


def _trained_version(client):
    """The version the training fixture registered (tuning studies register more under the same name)."""
    return client.search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]


def test_resuming_a_finished_run_is_refused_with_its_version(in_store, synth_dir):
    client = MlflowClient()
    version = _trained_version(client)
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    result = run_cli("train", "--data-dir", str(synth_dir), "--resume", version.run_id, cwd=in_store["workdir"])
    assert (
        result.returncode == 2 and "already finished" in result.stderr and f"version {version.version}" in result.stderr
    )
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before


def test_a_resume_after_a_kill_between_registration_and_alias_reuses_the_version(in_store, synth_dir):
    client = MlflowClient()
    version = _trained_version(client)
    before = len(client.search_model_versions(f"name='{MODEL}'"))
    # What a kill right after registration leaves: a registered version, no alias, a run not FINISHED.
    client.set_terminated(version.run_id, "KILLED")
    client.delete_registered_model_alias(MODEL, "challenger")
    result = run_cli("train", "--data-dir", str(synth_dir), "--resume", version.run_id, cwd=in_store["workdir"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(client.search_model_versions(f"name='{MODEL}'")) == before
    assert client.get_model_version_by_alias(MODEL, "challenger").version == version.version
    assert client.get_run(version.run_id).info.status == "FINISHED"


def test_rerunning_a_study_whose_choice_is_unchanged_registers_nothing(in_store, synth_dir, tmp_path):
    storage = str(tmp_path / "journal.log")
    source = MlflowClient().search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]
    args = (
        "tune",
        "--model",
        f"models:/{MODEL}/{source.version}",
        "--data-dir",
        str(synth_dir),
        "--study",
        "same",
        "--storage",
        storage,
        "--seed",
        "0",
        "--range",
        "score_thresh=0.0:0.0",
        "--range",
        "nms_thresh=0.5:0.5",
        "--range",
        "detections_per_img=100:100",
    )
    first = run_cli(*args, "--n-trials", "2", cwd=in_store["workdir"])
    assert first.returncode == 0 and "registered version" in first.stdout, first.stderr[-3000:]
    versions = len(MlflowClient().search_model_versions(f"name='{MODEL}'"))
    again = run_cli(*args, "--n-trials", "2", cwd=in_store["workdir"])  # every trial is the same point
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing new was registered" in again.stdout and "already carries it" in again.stdout
    assert len(MlflowClient().search_model_versions(f"name='{MODEL}'")) == versions


@pytest.mark.parametrize("problem", ["missing data", "bad image", "bad overrides", "missing driver"])
def test_refused_tune_requests_leave_nothing_behind(in_store, synth_dir, tmp_path, problem):
    client = MlflowClient()
    source = client.search_model_versions(f"name='{MODEL}'", order_by=["version_number ASC"])[0]
    data, storage, extra = synth_dir, str(tmp_path / "journal.log"), []
    if problem == "missing data":
        data = tmp_path / "nowhere"
    elif problem == "bad image":
        data = tmp_path / "copy"
        import shutil

        shutil.copytree(synth_dir, data)
        (data / "images" / "Case_1-01.tif").write_bytes(b"II*\x00 truncated")
    elif problem == "bad overrides":
        extra = ["--kind", "training", "--train-overrides", "train.epochz=1"]
    else:
        storage = "mysql://user@127.0.0.1:9/optuna"
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = run_cli(
        "tune",
        "--model",
        f"models:/{MODEL}/{source.version}",
        "--data-dir",
        str(data),
        "--study",
        "refused",
        "--storage",
        storage,
        *extra,
        cwd=in_store["workdir"],
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()[-1]) > 20
    if problem == "missing driver":
        assert "pip install mysqlclient" in result.stderr
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before
    assert "tune.study.refused" not in client.get_model_version(MODEL, source.version).tags
    if (tmp_path / "journal.log").exists():
        journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
        assert optuna.study.get_all_study_names(storage=journal) == []


def test_mlflow_run_from_another_directory(trained, synth_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env({"MLFLOW_TRACKING_URI": uri})
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")

    def mlflow_run(*params):
        args = [mlflow_bin, "run", str(ROOT), "-e", "train", "--env-manager", "local"]
        for p in params:
            args += ["-P", p]
        return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)

    refused = mlflow_run("data_dir=no/such/folder")  # MLflow itself used to refuse this and leave a RUNNING run
    assert refused.returncode != 0 and "no such folder" in refused.stderr
    assert "the project directory under `mlflow run`" in refused.stderr
    good = mlflow_run("config=experiments/smoke.yaml", f"data_dir={synth_dir}", f"overrides={TINY} train.epochs=1")
    assert good.returncode == 0, good.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
