"""tracking.py on a real sqlite store: one client per store, every call names its run, a resumed
run logs no step or param twice."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import pytest

from detection import tracking


def test_one_client_per_store(store, tmp_path):
    first = tracking.client()
    assert tracking.client() is first
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    other = tracking.client()
    assert other is not first and other.tracking_uri.endswith("other.db")


def test_a_fresh_store_starts_without_the_experiment_an_earlier_command_chose(store, tmp_path, monkeypatch):
    """CI, issue 21: `tracking.run` calls `mlflow.set_experiment` in-process; the next test's fresh
    store then got `start_run()` into experiment 3, which it never had."""
    from tests.conftest import point_mlflow_at

    with tracking.run("tracking-test", name="first"):
        pass
    with tracking.run("another-experiment", name="second"):
        pass
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    point_mlflow_at(fresh, monkeypatch)
    with mlflow.start_run() as active:
        assert active.info.experiment_id == "0"


def test_a_tracker_logs_into_its_own_run_while_another_is_active(store):
    with (
        tracking.run("tracking-test", name="mine") as tr,
        mlflow.start_run(nested=True, run_name="someone else's") as active,
    ):
        tr.log_metrics({"loss": 0.5}, step=3)
        tr.log_params({"lr": 0.01})
        tr.set_tags({"kind": "test"})
        fig = plt.figure()
        tr.log_image(fig, "overlay", step=1)
        tr.client.log_figure(tr.run_id, fig, "figures/x.png")
        plt.close(fig)
        tr.log_dataset(pd.DataFrame({"name": ["a"]}), "/data", "abc123", "imgs", "testing")
    mine = tracking.get_run(tr.run_id)
    theirs = tracking.get_run(active.info.run_id)
    assert mine.info.status == "FINISHED" and mine.info.run_name == "mine"
    assert tracking.metric_history(tr.run_id, "loss") == [(3, 0.5)]
    assert mine.data.params == {"lr": "0.01"} and mine.data.tags["detection.kind"] == "test"
    assert [i.dataset.digest for i in mine.inputs.dataset_inputs] == ["abc123"]
    assert {i.tags[0].value for i in mine.inputs.dataset_inputs} == {"testing"}
    listed = {a.path for a in tracking.client().list_artifacts(tr.run_id, "figures")}
    assert listed == {"figures/x.png"}
    assert not theirs.data.metrics and not theirs.data.params
    assert not {k for k in theirs.data.tags if k.startswith("detection.")}


def test_a_resumed_run_logs_no_step_or_param_twice(store):
    with tracking.run("tracking-test", name="interrupted") as tr:
        tr.log_params({"lr": 0.01, "epochs": 3})
        for step in range(3):
            tr.log_metrics({"loss": 1.0 / (step + 1)}, step)
        run_id = tr.run_id
    with tracking.run("tracking-test", resume=run_id) as tr:
        tr.log_params({"lr": 0.01, "epochs": 3, "resumed": True})  # a changed value would be refused
        for step in range(5):
            tr.log_metrics({"loss": 9.0 if step < 3 else 1.0 / (step + 1)}, step)
    assert [s for s, _ in tracking.metric_history(run_id, "loss")] == [0, 1, 2, 3, 4]
    assert tracking.metric_history(run_id, "loss")[2] == (2, pytest.approx(1 / 3))
    assert tracking.get_run(run_id).data.params == {"lr": "0.01", "epochs": "3", "resumed": "True"}


def test_an_error_ends_the_run_failed_with_the_error(store):
    with pytest.raises(KeyError), tracking.run("tracking-test", name="doomed") as tr:
        raise KeyError("no such key")
    run = tracking.get_run(tr.run_id)
    assert run.info.status == "FAILED" and "KeyError" in run.data.tags["detection.error"]


def test_logging_a_split_with_cell_counts_prints_no_warning(store):
    """Issue 22: every training printed MLflow's "integer column(s)" hint three times, once per split."""
    import json
    import warnings

    table = pd.DataFrame({"name": ["Case_1-01", "Case_1-02"], "case": ["Case_1"] * 2, "cells": [12, 40]})
    with tracking.run("tracking-test", name="datasets") as tr, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.log_dataset(table, "/data", "abc123", "brecahad-train", "training")
    assert [str(w.message)[:60] for w in caught] == []
    schema = json.loads(tracking.get_run(tr.run_id).inputs.dataset_inputs[0].dataset.schema)
    assert {c["name"]: c["type"] for c in schema["mlflow_colspec"]}["cells"] == "long"  # counts stay integers


def test_a_server_that_stalls_on_a_search_is_named_not_a_traceback(monkeypatch):
    """Found under load: a server that answered /health but took over 5 s to answer a search made
    `train` end in a TimeoutError traceback. The stall here never ends, so no clock is raced."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                release.wait(30)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri, before = f"http://127.0.0.1:{server.server_address[1]}", mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(tracking.TrackingError, match="did not answer a search within 1 s"):
            tracking.check_reachable(timeout=1.0)
    finally:
        release.set()
        server.shutdown()
        mlflow.set_tracking_uri(before)
