"""Evaluation of a real (tiny) registered model on real stores; marked slow."""

import json
import shutil
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
from detection.postprocess import PostProcess, apply, raw_outputs, replay_tile
from detection.sampling import validation_patches
from tests.conftest import ROOT, child_env, run_cli, train_tiny

pytestmark = pytest.mark.slow
MODEL = "brecahad-faster-rcnn"


def _detector():
    return mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger").unwrap_python_model()


def test_replay_equals_running_the_model(in_store, synth_dir):
    detector = _detector()
    model, cfg = detector.model, detector.config
    patches = validation_patches(load_dataset(synth_dir)[:2], cfg.data, seed=5, per_image=2)
    settings = [
        PostProcess(0.05, 0.8, 200),
        PostProcess(0.0, 0.5, 100),
        PostProcess(0.3, 0.3, 20),
        PostProcess(0.01, 0.95, 1000),
    ]
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
                kept = replay_tile(raw["boxes"], raw["scores"], raw["labels"], pp)
                assert np.array_equal(raw["boxes"][kept], own["boxes"].numpy())
                assert np.array_equal(raw["scores"][kept], own["scores"].numpy())
                assert np.array_equal(raw["labels"][kept], own["labels"].numpy())
                compared += len(kept)
    assert compared > 100


def test_training_validation_under_bf16_equals_an_evaluation_of_the_same_checkpoint(in_store, synth_dir):
    """val/ metrics come from the model's own post-processing under autocast; an evaluation replays
    its raw outputs. On the same patches, in bf16, they must count the same."""
    from detection.engine import validate
    from detection.inference import Item, Runtime, raw_inference
    from detection.matching import Counts
    from detection.metrics import score

    detector = _detector()
    model, cfg = detector.model, detector.config
    patches = validation_patches(load_dataset(synth_dir)[:3], cfg.data, seed=5, per_image=2)
    rt = Runtime(torch.device("cpu"), torch.bfloat16)
    items = [Item(p.name, p.origin, p.image, p.points, p.labels, (1024, 1360)) for p in patches]
    cache = raw_inference(model, items, cfg, rt)  # places the model as evaluation does
    cache.meta = {"box_size": cfg.data.box_size, "border_band": 0.0, "classes": list(cfg.data.classes)}
    radius = cfg.match_radius_px
    replayed = sum(score(cache, PostProcess.of_config(cfg.model), "greedy", radius).counts(), Counts(0, 0, 0))
    val = validate(model, patches, rt.device, rt.dtype, radius, cfg.model.num_classes)
    assert val.counts == replayed and replayed.tp + replayed.fp > 0


def _mlflow(*args, cwd, uri):
    env = child_env({"MLFLOW_TRACKING_URI": uri})
    return subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mlflow_run_evaluate_logs_everything_and_recomputes(in_store, synth_dir):
    from detection.provenance import code_digest

    result = _mlflow(
        "run",
        str(ROOT),
        "-e",
        "evaluate",
        "--env-manager",
        "local",
        "-P",
        f"data_dir={synth_dir}",
        "-P",
        "protocol=whole",
        cwd=in_store["workdir"],
        uri=in_store["uri"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`detection.evaluation` = 'true' and tags.`detection.protocol` = 'whole'",
    )[0]
    assert run.info.status == "FINISHED"
    version = client.get_model_version_by_alias(MODEL, "challenger")
    tags = run.data.tags
    assert tags["detection.model_name"] == MODEL and tags["detection.model_version"] == str(version.version)
    assert tags["detection.training_run_id"] == version.run_id and tags["detection.split"] == "test"
    m = run.data.metrics
    for k in (
        "detection_rate",
        "fdr",
        "precision",
        "f1",
        "tp",
        "fp",
        "fn",
        "ap",
        "box_ap50",
        "box_ap",
        "cells",
        "cells_uncovered",
        "items",
        "n_cases",
        "n_images",
        "area_mm2",
        "fp_per_mm2",
        "froc",
        "froc_dr_at_10",
        "froc_dr_at_300",
    ):
        assert f"test/{k}" in m, k
    assert m["test/tp"] + m["test/fn"] > 50  # the two held-out synthetic images' tumour cells
    # Two images of one case: no "95%" interval, and the run says why (issue 20).
    assert not any(k.endswith(("_ci_low", "_ci_high")) for k in m)
    assert "fewer than 5: no 95% interval" in tags["detection.ci_note"] and tags["detection.ci_unit"] == "image"
    # The radius in micrometres and pixels, at the images' resolution (data.mpp: BreCaHAD's).
    assert tags["detection.match_radius_um"] == "7.5" and tags["detection.mpp"] == "0.514"
    assert float(run.data.params["eval.match_radius_px"]) == pytest.approx(7.5 / 0.514)
    assert m["test/area_mm2"] == pytest.approx(2 * 1024 * 1360 * 0.514**2 * 1e-6)
    assert m["test/fp_per_mm2"] == pytest.approx(m["test/fp"] / m["test/area_mm2"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"predictions.npz", "test_per_image.json", "test_threshold_curve.csv", "test_froc_curve.csv"}
    assert expected | {"figures", "overlays"} <= files
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/fig4_tpr_fdr.png", "figures/precision_recall.png", "figures/froc.png"}

    cache = load_cache(run.info.run_id)
    assert len(cache) == 2 and cache.meta["protocol"] == "whole" and len(cache.det_scores) > len(cache.gt_points)
    pp = PostProcess(**cache.meta["postprocess"])
    again = judge(cache, pp, "greedy", cache.meta["match_radius"]).metrics
    for k in ("detection_rate", "fdr", "ap", "box_ap50", "fp_per_mm2", "froc"):
        assert again[k] == pytest.approx(m[f"test/{k}"], abs=1e-9)
    assert m["test/tp"] + m["test/fn"] == m["test/cells"] and m["test/cells_uncovered"] == 0
    assert tags["detection.count_unit"] == "cells" and tags["detection.code_digest"] == code_digest()

    # Named for what it is, in an experiment the UI opens on its runs table, with its images as input.
    assert run.info.run_name == f"evaluate v{version.version} test whole"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.tags[0].value == "testing" and dataset.dataset.name == "brecahad-test"
    # What the version reports on each image, as GeoJSON for QuPath.
    import geojson

    shapes = [
        geojson.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{a.path}"))
        for a in client.list_artifacts(run.info.run_id, "detections")
    ]
    assert len(shapes) == 2 and all(s.is_valid for s in shapes)
    assert sum(len(s["features"]) for s in shapes) == m["test/tp"] + m["test/fp"]


def test_paper_protocol_draws_ten_patches_per_image(in_store, synth_dir):
    result = run_cli(
        "evaluate",
        "--data-dir",
        str(synth_dir),
        "--matching",
        "hungarian",
        "--protocol",
        "paper",
        "--device",
        "cpu",
        cwd=in_store["workdir"],
        env={"BRECAHAD_PRECISION": "bf16"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split()[1].rstrip(":")
    cache = load_cache(run_id)
    assert len(cache) == 20 and cache.items_size.tolist() == [[256, 340]] * 20  # the tiny config's patch
    run = MlflowClient().get_run(run_id)
    # Where inference ran is recorded: the option and the environment were honoured.
    assert run.data.tags["detection.inference.device"] == "cpu" and cache.meta["precision"] == "bf16"
    assert run.data.tags["detection.inference.precision"] == "bf16"
    assert (
        run.data.tags["detection.matching"] == "hungarian"
        and run.data.tags["detection.count_unit"] == "cell-patch pairs"
    )
    m = run.data.metrics
    # Cell-patch pairs: a cell in two patches counts twice, a cell in none not at all.
    assert m["test/items"] == 20 and m["test/cells"] >= m["test/cells_uncovered"] > 0
    assert run.data.params["eval.border_band"] == "16.0"


def test_an_absent_device_is_refused_before_any_run(in_store, synth_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    client = MlflowClient()
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    result = run_cli("evaluate", "--data-dir", str(synth_dir), "--device", "cuda", cwd=in_store["workdir"])
    assert result.returncode == 2 and "needs CUDA, which is not available" in result.stderr
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


@pytest.mark.parametrize(
    "model, words",
    [
        ("models:/no-such-model@challenger", "no registered model named 'no-such-model'"),
        (f"models:/{MODEL}/99", "does not exist"),
        (f"models:/{MODEL}@champion", "does not exist"),
        ("runs:/abc/model", "not a registry URI"),
    ],
)
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
    assert leak.returncode == 2 and "are training images" in leak.stderr
    for name in split["train"]:
        assert name in leak.stderr
    # A training image beside a held-out one is enough to evaluate with the overlap allowed.
    mixed = _only(synth_dir, [split["train"][0], split["test"][0]], partial.parent / "mixed")
    allowed = run_cli(
        "evaluate", "--data-dir", str(mixed), "--split", "all", "--allow-overlap", "true", cwd=in_store["workdir"]
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    run = client.get_run(allowed.stdout.split()[1].rstrip(":"))
    assert run.data.tags["detection.allow_overlap"] == "true" and "all/detection_rate" in run.data.metrics
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1  # evaluation never touches the registry


def _only(data: Path, names: list[str], dst: Path) -> Path:
    """A dataset folder holding `names` of `data` alone."""
    for sub, ext in (("images", ".tif"), ("groundTruth", ".json")):
        (dst / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(data / sub / f"{name}{ext}", dst / sub / f"{name}{ext}")
    return dst


def test_model_without_a_recorded_split(in_store, synth_dir, tmp_path):
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
    new_cohort = _only(synth_dir, ["Case_1-01"], tmp_path / "cohort")
    cohort = run_cli(
        "evaluate", "--model", uri, "--data-dir", str(new_cohort), "--split", "all", cwd=in_store["workdir"]
    )
    assert cohort.returncode == 0, cohort.stderr[-2000:]  # a new cohort needs no recorded split
    client.delete_registered_model("orphan-model")


@pytest.mark.subprocess
def test_mlflow_run_evaluate_on_the_real_sample(tmp_path):
    from tests.conftest import SAMPLE, need_shared

    sample = need_shared(SAMPLE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained = train_tiny(sample, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = _mlflow(
        "run", str(ROOT), "-e", "evaluate", "--env-manager", "local", "-P", f"data_dir={sample}", cwd=tmp_path, uri=uri
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`detection.evaluation` = 'true'"
    )
    assert run.info.status == "FINISHED" and run.data.tags["detection.protocol"] == "whole"
    # Every tumour point of the held-out images' JSON counted exactly once.
    from detection.data import read_points

    version = client.get_model_version("brecahad-faster-rcnn", run.data.tags["detection.model_version"])
    recorded = json.loads(Path(client.download_artifacts(version.run_id, "split.json", str(tmp_path))).read_text())
    annotated = sum(len(read_points(sample / "groundTruth" / f"{n}.json")["tumor"]) for n in recorded["test"])
    test_names = run.data.params["eval.images"]
    m = run.data.metrics
    assert int(test_names) == len(recorded["test"]) and annotated > 100
    assert m["test/tp"] + m["test/fn"] == annotated == m["test/cells"]
    assert 0 <= m["test/detection_rate"] <= 1 and "test/ap" in m and "test/box_ap50" in m


def test_leakage_guard_sees_pixels_not_file_bytes(in_store, synth_dir, tmp_path):
    import shutil

    import tifffile

    client = MlflowClient()
    version = client.get_model_version_by_alias(MODEL, "challenger")
    split = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/split.json")
    assert split["hash_kind"] == "pixels" and set(split["thumbnails"]) == set(split["train"])
    train, test, val = split["train"][0], split["test"][0], split["val"][0]

    def folder_with(name, pixels):
        data = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(synth_dir, data)
        tifffile.imwrite(data / "images" / f"{name}.tif", pixels, compression="zlib")
        return data

    pixels = tifffile.imread(synth_dir / "images" / f"{train}.tif")
    # The same pixels re-saved with compression, and a flipped copy, each under a new name: split=all.
    for name, copy in (("Case_900-01", pixels), ("Case_901-01", pixels[:, ::-1]), ("Case_902-01", pixels[::-1])):
        data = folder_with(name, np.ascontiguousarray(copy))
        (data / "groundTruth" / f"{name}.json").write_text((synth_dir / "groundTruth" / f"{train}.json").read_text())
        for other in (n for n in split["train"]):
            (data / "images" / f"{other}.tif").unlink()
            (data / "groundTruth" / f"{other}.json").unlink()
        result = run_cli("evaluate", "--data-dir", str(data), "--split", "all", cwd=in_store["workdir"])
        assert result.returncode == 2 and "are training images" in result.stderr and name in result.stderr, name
    # A validation image placed under a test image's name.
    data = folder_with(test, tifffile.imread(synth_dir / "images" / f"{val}.tif"))
    result = run_cli("evaluate", "--data-dir", str(data), cwd=in_store["workdir"])
    assert result.returncode == 2 and "pixels differ" in result.stderr and test in result.stderr
    # Re-saving a test image with compression changes its bytes, not its pixels: accepted.
    data = folder_with(test, tifffile.imread(synth_dir / "images" / f"{test}.tif"))
    ok = run_cli("evaluate", "--data-dir", str(data), "--protocol", "paper", cwd=in_store["workdir"])
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_evaluations_are_reused_only_by_the_same_code(in_store, synth_dir):
    from detection.evaluate import Request, earlier_evaluation, evaluate
    from detection.provenance import code_digest

    version = MlflowClient().get_model_version_by_alias(MODEL, "challenger").version
    req = Request(f"models:/{MODEL}/{version}", synth_dir, "val", "whole")
    run_id = earlier_evaluation(req, same_matching=True)[0]
    run_id = run_id.info.run_id if run_id else evaluate(req)[0]
    assert earlier_evaluation(req, same_matching=True)[0].info.run_id == run_id
    MlflowClient().set_tag(run_id, "detection.code_digest", "0123456789abcdef")  # made by other code
    assert earlier_evaluation(req, same_matching=True)[0] is None
    MlflowClient().set_tag(run_id, "detection.code_digest", code_digest())
    assert earlier_evaluation(req, same_matching=True)[0].info.run_id == run_id
