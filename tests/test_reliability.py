"""Issue 21's recovery parts that need no server: the server watch on a clock of its own, and
checkpoints that never wait for an upload. Each waits on events, not on how fast the machine is."""

import json
import threading
from pathlib import Path

import torch

from detection import tracking
from detection.train import Checkpoints


def test_the_server_watch_calls_a_server_down_after_its_grace_on_its_own_clock(monkeypatch):
    monkeypatch.setattr(tracking.mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:9")
    now, answers, probed = [0.0], [True], threading.Event()

    def probe():
        probed.set()
        now[0] += 4.0  # every probe is 4 s of the watch's clock
        if not answers[0]:
            raise OSError("connection refused")

    with tracking.ServerWatch(every=0.001, grace=10.0, clock=lambda: now[0], probe=probe) as watch:
        assert probed.wait(30) and not watch.down.is_set()
        answers[0] = False  # the server dies: down once 10 s of its clock pass without an answer
        assert watch.down.wait(30) and now[0] >= 10.0


class _Tracker:
    """A run's logging whose uploads block until the test lets them go (a server that hangs)."""

    def __init__(self, run_id: str):
        self.run_id, self.metrics, self.uploaded = run_id, [], []
        self.release, self.uploading = threading.Event(), threading.Event()
        self.client = self

    def log_metrics(self, values, step):
        self.metrics.append((step, values))

    def log_artifact(self, run_id, path, folder):
        self.uploading.set()
        assert self.release.wait(60)
        self.uploaded.append(Path(path).name)

    def log_text(self, run_id, text, name):
        self.uploaded.append(name)


def test_a_hung_upload_never_stalls_the_local_checkpoint(tmp_path, monkeypatch):
    """Issue 21: saving waited for the stuck upload, so the local checkpoint stopped too."""
    monkeypatch.setenv("BRECAHAD_CHECKPOINTS", str(tmp_path))
    tr = _Tracker("run1")
    ckpt = Checkpoints(tr, every=1, epochs=4)
    state = {"model": {"w": torch.zeros(3)}}
    ckpt.save({"epoch": 0, "step": 5} | state)
    assert tr.uploading.wait(60)  # epoch 1's upload hangs
    for epoch in (1, 2):
        ckpt.save({"epoch": epoch, "step": 5 * (epoch + 1)} | state)  # returns though the upload hangs
    ckpt._finish(ckpt.local, "train/checkpoint_seconds")
    assert json.loads((tmp_path / "run1" / "latest.json").read_text())["epoch"] == 2
    skipped = [v["train/checkpoint_uploads_skipped"] for _, v in tr.metrics if "train/checkpoint_uploads_skipped" in v]
    assert skipped == [1, 2]  # epochs 2 and 3 were due while the first upload hung
    tr.release.set()
    ckpt.save({"epoch": 3, "step": 20} | state)  # the last epoch's upload is never skipped
    ckpt.close()
    assert tr.uploaded == ["slot-0.pt", "checkpoints/latest.json", "slot-1.pt", "checkpoints/latest.json"]


def test_requests_give_up_in_seconds_unless_the_user_chose_otherwise(monkeypatch):
    """A request under way when the server dies retried with MLflow's backoff (0, 4, 8 s) and kept a
    training alive 42.6 s after its server was killed; with backoff 1 (0, 2, 4 s) it ends in 24 s."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    tracking.bound_requests()
    assert (MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()) == (30, 3)
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "5")
    tracking.bound_requests()
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 5
