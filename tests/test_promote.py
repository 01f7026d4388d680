"""Promotion with a metric gate, rollback, and serving, on a real sqlite registry; marked slow."""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from detection import tracking
from detection.data import load_dataset
from detection.predict import encode_png
from tests.conftest import model_server, post_json, run_cli

pytestmark = pytest.mark.slow
SOURCE = "models:/brecahad-faster-rcnn@challenger"


def _aliases(name):
    model = MlflowClient().get_registered_model(name)
    return {a: int(v) for a, v in model.aliases.items() if a in ("champion", "previous")}


def _promote(in_store, synth_dir, name, version, *extra):
    return run_cli(
        "promote",
        "--candidate",
        f"models:/{name}/{version}",
        "--data-dir",
        str(synth_dir),
        *extra,
        cwd=in_store["workdir"],
    )


def test_promotion_gate_and_rollback(in_store, synth_dir, versions):
    name, metric = versions["name"], ["--metric", "test/detection_rate"]
    first = _promote(in_store, synth_dir, name, versions["none"], *metric)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "first champion" in first.stdout and _aliases(name) == {"champion": versions["none"]}

    better = _promote(in_store, synth_dir, name, versions["all"], *metric)
    assert better.returncode == 0, better.stderr[-3000:]
    assert better.stdout.startswith("promoted")
    assert _aliases(name) == {"champion": versions["all"], "previous": versions["none"]}

    worse = _promote(in_store, synth_dir, name, versions["none"], *metric)
    assert worse.returncode == 0 and worse.stdout.startswith("kept champion")
    tie = _promote(in_store, synth_dir, name, versions["tie"], *metric)
    assert tie.returncode == 0 and tie.stdout.startswith("kept champion")
    assert _aliases(name) == {"champion": versions["all"], "previous": versions["none"]}

    client = MlflowClient()
    tags = client.get_model_version(name, str(versions["tie"])).tags
    # Issue 26: a version keeps the promotion tags a user filters on; the decision's run keeps the rest.
    kept = {"promotion.decision", "promotion.run", "promotion.test_decisions"}  # decided on test here
    assert {k for k in tags if k.startswith("promotion.")} == kept
    assert tags["promotion.decision"] == "kept champion"
    champion = client.get_model_version(name, str(versions["all"])).tags
    assert champion["promotion.decision"] == "promoted"  # how it became champion, and its last challenge
    assert champion["promotion.last_challenge"] == f"v{versions['tie']} kept champion ({tags['promotion.run']})"
    run = client.get_run(tags["promotion.run"])
    assert run.data.tags["detection.decision"] == "kept champion"
    assert run.data.tags["detection.metric"] == "test/detection_rate"
    detail = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/decision.json")
    assert detail["candidate_value"] == detail["champion_value"] and detail["metric"] == "test/detection_rate"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"side_by_side.json", "side_by_side.png", "decision.json"} <= files
    for key in ("candidate_eval_run", "champion_eval_run"):
        evaluated = client.get_run(detail[key])
        assert evaluated.data.tags["detection.evaluation"] == "true"
    # The card of each version says where it stands.
    card = client.get_model_version(name, str(versions["tie"])).description
    assert "## Lineage" in card and f"promotion: kept champion (decision run `{run.info.run_id}`)" in card

    back = _promote(in_store, synth_dir, name, versions["all"], "--rollback", "true")
    assert back.returncode == 0 and back.stdout.startswith("rolled back")
    assert _aliases(name) == {"champion": versions["none"], "previous": versions["all"]}


def test_promotion_decides_on_val_reports_test_and_counts_the_decisions_made_on_test(in_store, synth_dir, versions):
    """Issue 20: deciding promotion after promotion on the test split made it a selection set."""
    client = MlflowClient()
    name = "val-first"
    client.create_registered_model(name)
    made = {}
    for key in ("none", "all"):
        source = client.get_model_version(versions["name"], str(versions[key]))
        made[key] = int(client.create_model_version(name, source.source, source.run_id).version)
    first = _promote(in_store, synth_dir, name, made["none"])  # the default metric: val/f1
    assert first.returncode == 0 and "first champion" in first.stdout, first.stderr[-3000:]
    tags = client.get_model_version(name, str(made["none"])).tags
    run = client.get_run(tags["promotion.run"])
    assert run.data.tags["detection.metric"] == "val/f1" and run.data.tags["detection.decided_on_test"] == "false"
    assert run.data.tags["detection.candidate_test_decisions"] == "0" and "promotion.test_decisions" not in tags
    table = pd.DataFrame(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/side_by_side.json")["data"], columns=None)
    decides = {row[0].split("/")[0]: row[1] for row in table.itertuples(index=False)}
    assert decides == {"val": True, "test": False}  # test is reported beside the decision, not decided on
    test_eval = run.data.tags["detection.candidate_test_eval_run"]
    assert client.get_run(test_eval).data.tags["detection.split"] == "test"

    second = _promote(in_store, synth_dir, name, made["all"], "--metric", "test/f1")
    assert second.returncode == 0, second.stderr[-3000:]
    for v in made.values():  # both versions' test images decided this one
        version = client.get_model_version(name, str(v))
        assert version.tags["promotion.test_decisions"] == "1"
        assert "Promotion decisions made on its test images: 1." in version.description
    run = client.get_run(client.get_model_version(name, str(made["all"])).tags["promotion.run"])
    assert run.data.tags["detection.candidate_test_decisions"] == "1"
    assert run.data.tags["detection.champion_test_decisions"] == "1"


def test_refusals_leave_the_aliases_alone(in_store, synth_dir, versions, tmp_path):
    name = versions["name"]
    if not _aliases(name):
        assert _promote(in_store, synth_dir, name, versions["none"]).returncode == 0
    before = _aliases(name)
    mismatch = _promote(in_store, synth_dir, name, versions["other_split"])
    assert mismatch.returncode == 2 and "used different images" in mismatch.stderr
    missing = _promote(in_store, synth_dir, name, 99)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    client = MlflowClient()
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    (broken_dir / "MLmodel").write_text("not: [a model")
    broken = client.create_model_version(name, str(broken_dir))
    refused = _promote(in_store, synth_dir, name, broken.version)
    assert refused.returncode == 2 and "does not load" in refused.stderr
    assert _aliases(name) == before


def test_mlflow_models_serve_answers_good_and_malformed_requests(in_store, synth_dir, tmp_path):
    with model_server(SOURCE, in_store["workdir"]) as url:
        image = load_dataset(synth_dir)[0].read_image()
        status, body = post_json(
            url,
            {"dataframe_split": {"columns": ["image"], "data": [[encode_png(image)]]}},
        )
        served = pd.DataFrame(body["predictions"])
        local = mlflow.pyfunc.load_model(SOURCE).predict(pd.DataFrame({"image": [image]}))
        assert status == 200 and len(served) == len(local)
        assert served[["x1", "y1", "x2", "y2", "score"]].to_numpy() == pytest.approx(
            local[["x1", "y1", "x2", "y2", "score"]].to_numpy(), abs=1e-4
        )
        with pytest.raises(urllib.error.HTTPError) as bad:
            post_json(
                url,
                {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"not an image").decode()]]}},
            )
        assert bad.value.code == 400 and "neither PNG nor a readable TIFF" in bad.value.read().decode()
        with pytest.raises(urllib.error.HTTPError) as empty:
            post_json(url, {"dataframe_split": {"columns": ["image"], "data": []}})
        assert empty.value.code == 400


def test_predict_writes_geojson_that_qupath_and_the_geojson_package_read(in_store, synth_dir, tmp_path):
    import geojson

    path = synth_dir / "images" / "Case_1-01.tif"
    result = run_cli(
        "predict", str(path), "--model", SOURCE, "--out", str(tmp_path), "--format", "geojson", cwd=in_store["workdir"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "Case_1-01.json").exists()
    doc = geojson.loads((tmp_path / "Case_1-01.geojson").read_text())
    assert doc.is_valid and doc["type"] == "FeatureCollection"
    local = mlflow.pyfunc.load_model(SOURCE).predict(pd.DataFrame({"image": [load_dataset(synth_dir)[0].read_image()]}))
    assert len(doc["features"]) == len(local) > 0
    points = np.array([f["geometry"]["coordinates"] for f in doc["features"]])
    assert all(f["geometry"]["type"] == "Point" for f in doc["features"])
    assert points == pytest.approx(local[["cx", "cy"]].to_numpy(), abs=1e-3)  # image pixels, x right, y down
    props = doc["features"][0]["properties"]
    assert props["objectType"] == "detection" and props["classification"]["name"] == "tumor"
    assert [f["properties"]["measurements"]["score"] for f in doc["features"]] == pytest.approx(local.score.tolist())


def test_predict_command_writes_json_and_overlay(in_store, synth_dir, tmp_path):
    path = synth_dir / "images" / "Case_1-01.tif"
    result = run_cli("predict", str(path), "--model", SOURCE, "--out", str(tmp_path), cwd=in_store["workdir"])
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "Case_1-01.json").read_text())
    assert doc["image"] == str(path) and doc["model"].startswith("models:/brecahad-faster-rcnn/")
    local = mlflow.pyfunc.load_model(SOURCE).predict(pd.DataFrame({"image": [load_dataset(synth_dir)[0].read_image()]}))
    assert len(doc["detections"]) == len(local)
    assert (tmp_path / "Case_1-01.png").stat().st_size > 10_000
    bad = run_cli(
        "predict",
        str(synth_dir / "groundTruth" / "Case_1-01.json"),
        "--model",
        SOURCE,
        "--out",
        str(tmp_path),
        cwd=in_store["workdir"],
    )
    assert bad.returncode == 2 and "Case_1-01.json" in bad.stderr


def test_predict_under_mlflow_run_names_its_run_and_keeps_what_it_wrote(in_store, synth_dir, tmp_path):
    """Issue 22: under `mlflow run` predict's run kept MLflow's random name (`bald-whale-695`) and
    nothing of what it wrote; so did every launch that failed."""
    from mlflow.tracking import MlflowClient

    api = MlflowClient()

    def launched() -> str:  # what `mlflow run . -e predict` makes before it starts the command
        tags = {"mlflow.runName": "bald-whale-695", "mlflow.project.entryPoint": "predict"}
        return api.create_run("0", tags=tags).info.run_id

    path = synth_dir / "images" / "Case_1-01.tif"
    run_id = launched()
    args = ("predict", str(path), "--model", SOURCE, "--out", str(tmp_path / "out"))
    result = run_cli(*args, cwd=in_store["workdir"], env={"MLFLOW_RUN_ID": run_id})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Downloading artifacts" not in result.stderr  # MLflow's tqdm bars amid the project's lines
    run = api.get_run(run_id)
    version = MlflowClient().get_model_version_by_alias("brecahad-faster-rcnn", "challenger").version
    assert run.info.run_name == f"predict v{version}"
    assert run.data.tags["detection.model"] == f"models:/brecahad-faster-rcnn/{version}"
    kept = {f.path for f in api.list_artifacts(run_id, "predictions")}
    assert kept == {"predictions/Case_1-01.json", "predictions/Case_1-01.png"}
    failed = launched()
    missing = run_cli("predict", str(tmp_path / "nope.tif"), cwd=in_store["workdir"], env={"MLFLOW_RUN_ID": failed})
    assert missing.returncode != 0 and "nope.tif" in missing.stderr
    run = api.get_run(failed)
    assert (run.info.status, run.info.run_name) == ("FAILED", "predict failed")


def test_a_promotion_under_mlflow_run_is_one_run_named_for_it_with_its_evaluations_nested(
    trained_copy, synth_dir, tmp_path
):
    """Issue 22: under `mlflow run` a promotion that first needed an evaluation became the run
    `evaluate v2 test whole` and sent its decision to brecahad-promotions; its last line named the
    promotion's run as the champion's; it evaluated again what tune had just evaluated."""
    api = MlflowClient()  # in a copy: the session's trained store keeps no champion
    experiment = api.get_experiment_by_name("brecahad").experiment_id
    launched = api.create_run(experiment, tags={"mlflow.runName": "bald-whale-695"}).info.run_id  # as mlflow run
    version = api.get_model_version_by_alias("brecahad-faster-rcnn", "challenger")
    pinned = f"models:/brecahad-faster-rcnn/{version.version}"
    tuned = run_cli("evaluate", "--model", pinned, "--data-dir", str(synth_dir), "--split", "test", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr[-3000:]  # as tune evaluates the version it registers
    # An earlier test may have evaluated the version on val in the shared store this copy came from
    # (under pytest-xdist, another order of tests): this copy forgets it, so promote must make one.
    everywhere = [e.experiment_id for e in api.search_experiments()]
    val_runs = (
        "tags.`detection.evaluation` = 'true' and tags.`detection.split` = 'val' and "
        f"tags.`detection.model_version` = '{version.version}'"
    )
    for earlier in api.search_runs(everywhere, val_runs):
        api.delete_run(earlier.info.run_id)
    before = {r.info.run_id for r in api.search_runs([experiment])}
    result = run_cli(
        "promote", "--candidate", SOURCE, "--data-dir", str(synth_dir), cwd=tmp_path, env={"MLFLOW_RUN_ID": launched}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = api.get_run(launched)
    assert run.info.run_name == f"promote v{version.version}" and run.data.tags["detection.decision"] == "promoted"
    made = [r for r in api.search_runs([experiment]) if r.info.run_id not in before]
    assert made and all(r.data.tags.get("mlflow.parentRunId") == launched for r in made)  # nested
    # Before, promote ran the version's test images again right after tune had; now only val is new.
    assert [r.info.run_name for r in made] == [f"evaluate v{version.version} val whole"]
    assert api.get_experiment_by_name("brecahad-promotions") is None  # one place
    assert result.stdout.strip().endswith(
        f"champion is version {version.version} (trained in run {version.run_id}); the decision is run {launched}"
    )


def _race(in_store, synth_dir, name, candidates):
    """Start one promotion per candidate at the same moment; (version, stdout) of each."""
    import subprocess

    env = dict(os.environ) | {"MLFLOW_TRACKING_URI": in_store["uri"]}
    procs = [
        (
            v,
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "detection",
                    "promote",
                    "--candidate",
                    f"models:/{name}/{v}",
                    "--data-dir",
                    str(synth_dir),
                    "--metric",
                    "test/detection_rate",
                ],
                cwd=in_store["workdir"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for v in candidates
    ]
    out = []
    for v, p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
        out.append((v, stdout))
    return out


def test_promotions_started_together_crown_the_better_version(in_store, synth_dir, versions):
    client = MlflowClient()
    name = "race"
    client.create_registered_model(name)
    made = {}
    for key in ("none", "all", "tie", "none"):
        source = client.get_model_version(versions["name"], str(versions[key]))
        made.setdefault(key, []).append(int(client.create_model_version(name, source.source, source.run_id).version))
    worst, best, tie, worst2 = made["none"][0], made["all"][0], made["tie"][0], made["none"][1]
    for v in (worst, best, tie, worst2):  # evaluations first, so the race is over the aliases alone
        assert (
            run_cli(
                "evaluate", "--model", f"models:/{name}/{v}", "--data-dir", str(synth_dir), cwd=in_store["workdir"]
            ).returncode
            == 0
        )

    # No champion yet: the worse and the better start together.
    outcome = dict(_race(in_store, synth_dir, name, [worst, best]))
    assert _aliases(name)["champion"] == best and f"champion is version {best}" in outcome[best]
    if outcome[worst].startswith("promoted"):  # the worse one went first and was champion for a moment
        assert "first champion" in outcome[worst] and outcome[best].startswith("promoted")
        assert _aliases(name)["previous"] == worst
    else:
        assert outcome[worst].startswith("kept champion") and "previous" not in _aliases(name)
        assert "first champion" in outcome[best]

    # With a champion: three at once, two of them as good as each other.
    client.set_registered_model_alias(name, "champion", str(worst))
    if "previous" in _aliases(name):
        client.delete_registered_model_alias(name, "previous")
    outcome = _race(in_store, synth_dir, name, [best, tie, worst2])
    aliases = _aliases(name)
    assert aliases["champion"] in (best, tie) and aliases["previous"] == worst
    decisions = {v: out.split(":")[0] for v, out in outcome}
    assert sorted(decisions.values()) == ["kept champion", "kept champion", "promoted"]
    assert decisions[aliases["champion"]] == "promoted"
    assert client.get_model_version(name, str(aliases["champion"])).tags["promotion.decision"] == "promoted"


def test_the_registry_lock_lets_one_holder_in_at_a_time(in_store):
    """Beside a sqlite store the promotion lock is a file lock (tests/test_leases.py: a server's)."""
    import threading

    client = MlflowClient()
    client.create_registered_model("leased")
    inside, overlaps, entered = [], [], []

    def hold():
        with tracking.registry_lock("leased", timeout=120):
            inside.append(1)
            entered.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.3)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entered) == 3 and overlaps == []


def test_the_server_answers_concurrent_requests_without_a_5xx(in_store, synth_dir, monkeypatch):
    """At the documented setting (2 workers, a 600 s request timeout), 4 concurrent whole images all
    get answers; a too-small image and a 16-bit one get 400."""
    import concurrent.futures

    import numpy as np

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "600")
    image = load_dataset(synth_dir)[0].read_image()
    payload = {"dataframe_split": {"columns": ["image"], "data": [[encode_png(image)]]}}
    with model_server(SOURCE, in_store["workdir"], "--workers", "2") as url:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = [f.result()[0] for f in [pool.submit(post_json, url, payload) for _ in range(4)]]
        assert statuses == [200] * 4
        for bad, words in (
            (np.zeros((16, 16, 3), np.uint8), "smaller than one anchor"),
            (np.full((64, 64, 3), 1000, np.uint16).tolist(), "expected RGB uint8"),
        ):
            data = encode_png(bad) if isinstance(bad, np.ndarray) else bad
            with pytest.raises(urllib.error.HTTPError) as refused:
                post_json(url, {"dataframe_split": {"columns": ["image"], "data": [[data]]}})
            assert refused.value.code == 400 and words in refused.value.read().decode()
