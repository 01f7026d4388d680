"""The learned second look: crops, fusion, and one registered pyfunc that runs both networks."""

import urllib.error

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from detection import config, tracking
from detection.classifier import crops, fused_score
from detection.data import load_dataset
from detection.evaluate import Request, evaluate, load_pipeline_cache
from detection.predict import encode_png
from detection.sampling import chw
from detection.second_look_train import auc
from tests.conftest import ROOT, model_server, need_shared, post_json, run_cli

SAMPLE = ROOT.parent / "shared" / "data" / "brecahad-sample"
ALIAS = "second-look"  # not the challenger the other tests use


def test_a_crop_holds_the_pixels_around_the_detection_centre():
    image = load_dataset(need_shared(SAMPLE))[0].read_image()
    boxes = np.array([[84, 64, 116, 96], [0, 0, 20, 10]], np.float32)  # centres (100, 80) and (10, 5)
    out = crops(image, boxes, 64)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 64, 64)
    assert torch.equal(out[0], chw(image[48:112, 68:132]))
    # Beyond the image edge the crop is black (roi_align repeats the edge pixel for its last half
    # pixel); inside it is the image.
    assert (out[1][:, :26, :] == 0).all() and (out[1][:, :, :21] == 0).all()
    assert torch.equal(out[1][:, 27:, 22:], chw(image[:37, :42]))


def test_fusion_weight_zero_is_the_detector_and_one_the_classifier():
    scores, probs = np.array([0.9, 0.2, 0.05], np.float32), np.array([0.1, 0.8, 0.5], np.float32)
    assert np.array_equal(fused_score(scores, probs, 0.0), scores)
    assert np.array_equal(fused_score(scores, probs, 1.0), probs)
    assert fused_score(scores, probs, 0.25) == pytest.approx(0.75 * scores + 0.25 * probs)


def test_auc_is_the_chance_a_true_positive_outscores_a_false_one():
    labels = np.array([1, 1, 0, 0, 0], float)
    assert auc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), labels) == 1.0
    assert auc(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), labels) == 0.0
    assert auc(np.array([0.9, 0.1, 0.5, 0.5, 0.5]), labels) == pytest.approx(0.5)


@pytest.mark.subprocess
def test_a_training_config_cannot_switch_the_second_look_on(store, synth_dir):
    result = run_cli("train", "--data-dir", str(synth_dir), "-o", "second_look.weight=0.5", cwd=store)
    assert result.returncode == 2 and "second-look" in result.stderr
    assert not any(MlflowClient().search_registered_models())


@pytest.mark.subprocess
def test_second_look_overrides_are_only_second_look_keys(store, synth_dir):
    # Checked before the model is even looked up: this store has none.
    result = run_cli(
        "second-look",
        "--model",
        "models:/brecahad-faster-rcnn/1",
        "--data-dir",
        str(synth_dir),
        "-o",
        "train.epochs=3",
        cwd=store,
    )
    assert result.returncode == 2 and "only second_look.* keys" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_the_second_look_is_a_nested_run_and_one_pyfunc_that_serves(in_store, synth_dir):
    # Version 1, the trained one: aliases move as other tests promote and tune in this store.
    first = MlflowClient().search_model_versions("name='brecahad-faster-rcnn'", order_by=["version_number ASC"])[0]
    source = tracking.resolve_model(f"models:/brecahad-faster-rcnn/{first.version}")
    result = run_cli(
        "second-look",
        "--model",
        source.pinned,
        "--data-dir",
        str(synth_dir),
        "--alias",
        ALIAS,
        "-o",
        "second_look.epochs=1 second_look.max_examples=200 second_look.weight=0.5",
        cwd=in_store["workdir"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ref = tracking.resolve_model(f"models:/{source.name}@{ALIAS}")
    run = MlflowClient().get_run(ref.run_id)
    # Nested under the run of the version it serves, and its config carries the chosen fusion.
    assert run.data.tags["mlflow.parentRunId"] == source.run_id
    assert run.data.tags[tracking.TAG + "second_look_of"] == str(source.version)
    assert run.data.metrics["second_look/train_examples"] <= 200
    detector = tracking.load_model(ref)
    cfg = detector.config
    # A weight given is kept; only the threshold is chosen on val.
    assert cfg.second_look.weight == 0.5 == run.data.metrics["second_look/weight"]
    assert detector.second_look is not None and cfg.second_look.thresh == run.data.metrics["second_look/thresh"]
    assert f"registered version {ref.version}" in result.stdout
    artifacts = {a.path for a in MlflowClient().list_artifacts(ref.run_id)}
    assert {"figures", "second_look_weights.json", "split.json"} <= artifacts

    # The evaluation judges what the pyfunc returns: the rescored detections, above the threshold.
    run_id, _ = evaluate(Request(ref.pinned, synth_dir, "test"))
    reported = load_pipeline_cache(run_id)
    tags = MlflowClient().get_run(run_id).data.tags
    assert float(tags[tracking.TAG + "second_look_weight"]) == cfg.second_look.weight
    name = str(reported.items_name[0])
    image = next(s for s in load_dataset(synth_dir) if s.name == name).read_image()
    local = mlflow.pyfunc.load_model(ref.pinned).predict(pd.DataFrame({"image": [image]}))
    lo, hi = reported.det_range(0)
    above = reported.det_scores[lo:hi] > np.float32(cfg.second_look.thresh)
    assert len(local) == above.sum()
    assert local["score"].to_numpy() == pytest.approx(reported.det_scores[lo:hi][above], abs=1e-5)

    with model_server(ref.pinned, in_store["workdir"]) as url:
        status, body = post_json(
            url,
            {"dataframe_split": {"columns": ["image"], "data": [[encode_png(image)]]}},
        )
        assert status == 200 and len(body["predictions"]) == len(local)
        with pytest.raises(urllib.error.HTTPError) as bad:
            post_json(url, {"dataframe_split": {"columns": ["image"], "data": [[7]]}})
        assert bad.value.code == 400


def test_a_version_asking_for_a_second_look_without_its_weights_does_not_load(tmp_path):
    from detection.predict import load_second_look

    cfg = config.load(ROOT / "experiments" / "smoke.yaml", ["second_look.weight=0.5"])
    with pytest.raises(ValueError, match="holds no second_look weights"):
        load_second_look(cfg, None)
    assert load_second_look(config.load(ROOT / "experiments" / "smoke.yaml"), None) is None
