"""Issue 21's fast findings: what must be refused, or must not collide, before anything is written."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import ROOT


def test_promote_refuses_a_min_delta_no_candidate_could_beat():
    from detection.promote import PromoteRequest, PromotionError

    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(PromotionError, match="must be a finite number >= 0"):
            PromoteRequest("models:/x/1", Path("."), min_delta=bad).check()


def _lock_file_in_a_new_process(seed: str) -> str:
    code = "from detection.studies import lock_file; print(lock_file('mysql://db.lab/optuna', 'brecahad-study:s'))"
    env = dict(os.environ) | {"PYTHONHASHSEED": seed}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow  # two fresh interpreters that import the package and torch
@pytest.mark.subprocess
def test_workers_of_a_mysql_study_lock_the_same_file(tmp_path):
    """Issue 21: the lock's path came from hash(), which Python salts per process."""
    # Two workers with different hash salts: the holder (salt 1) writes the path it locked, and keeps
    # another out until it lets go.
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, time\n"
            "from detection.studies import lock_file, storage_lock\n"
            "where = ('mysql://db.lab/optuna', 'brecahad-study:s')\n"
            "with storage_lock(*where):\n"
            f"    pathlib.Path({str(ready)!r}).write_text(lock_file(*where) + '\\n')\n"
            f"    while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)\n",
        ],
        cwd=ROOT,
        env=dict(os.environ) | {"PYTHONHASHSEED": "1"},
    )
    try:
        while not (ready.exists() and ready.read_text().endswith("\n")):
            assert holder.poll() is None, "the holder died"
            time.sleep(0.05)
        assert ready.read_text() == _lock_file_in_a_new_process("2")
        from filelock import Timeout

        from detection.studies import storage_lock

        with pytest.raises(Timeout), storage_lock("mysql://db.lab/optuna", "brecahad-study:s", timeout=0.2):
            pass
    finally:
        release.touch()
        holder.wait(timeout=60)
    with storage_lock("mysql://db.lab/optuna", "brecahad-study:s", timeout=30):
        pass


class _Planted:
    """What a hostile checkpoint holds: unpickling it would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_checkpoint_is_refused_without_running_its_code(tmp_path):
    """Issue 21: resume loaded checkpoints with weights_only=False, so a planted one ran code."""
    import torch

    from detection.train import CheckpointError, load_checkpoint

    marker = tmp_path / "ran"
    torch.save({"epoch": 0, "step": 1, "model": {}, "payload": _Planted(marker)}, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match="holds objects other than tensors and numbers"):
        load_checkpoint(tmp_path / "latest.pt", torch.device("cpu"))
    assert not marker.exists()
    # What training writes still loads.
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    torch.save(
        {"epoch": 0, "step": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ok.pt"
    )
    assert load_checkpoint(tmp_path / "ok.pt", torch.device("cpu"))["step"] == 1


@pytest.mark.subprocess
def test_predict_refuses_two_images_that_would_write_the_same_files(tmp_path):
    """Issue 21: `predict a/x.tif b/x.tif` wrote both to out/x.json; the first image's were lost."""
    from tests.conftest import run_cli

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "X.tif").write_bytes(b"not read: refused before")
    out = tmp_path / "out"
    result = run_cli(
        "predict", str(tmp_path / "a" / "X.tif"), str(tmp_path / "b" / "X.tif"), "--out", str(out), cwd=tmp_path
    )
    assert result.returncode == 2 and "would both be written to" in result.stderr and "distinct names" in result.stderr
    assert not out.exists()


def _bomb_tiff(side: int) -> bytes:
    """A small file that declares side x side RGB pixels: zlib-compressed zeros."""
    import io

    import numpy as np
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        tif.write(np.zeros((side, side, 3), np.uint8), compression="zlib", tile=(1024, 1024))
    return buf.getvalue()


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(monkeypatch):
    """Issue 21: a 1.34 MB TIFF declaring 20000 x 20000 got its 400 only after the worker grew by 1.3 GB."""
    import tifffile

    from detection.predict import InputError, declared_size, decode_image

    bomb = _bomb_tiff(9000)  # 81 megapixels of zeros in a few hundred kB
    assert len(bomb) < 2_000_000 and declared_size(bomb) == (9000, 9000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before its size was checked")

    monkeypatch.setattr(tifffile, "imread", no_decoding)
    with pytest.raises(InputError, match="declares 9000x9000 px, more than 64 megapixels"):
        decode_image(bomb)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    with pytest.raises(InputError, match="declares 30000x30000 px"):
        decode_image(png + b"\x08\x02\x00\x00\x00")


def test_the_dataset_check_reads_a_bombs_header_not_its_pixels(tmp_path, monkeypatch):
    import json

    import tifffile

    from detection.config import BRECAHAD_CLASSES
    from detection.data import check_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "groundTruth").mkdir()
    (tmp_path / "images" / "Case_1-01.tif").write_bytes(_bomb_tiff(9000))
    (tmp_path / "groundTruth" / "Case_1-01.json").write_text(json.dumps({k: [] for k in BRECAHAD_CLASSES}))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before its shape was checked")

    monkeypatch.setattr(tifffile, "imread", no_decoding)
    (problem,) = check_dataset(tmp_path)
    assert "shape (9000, 9000, 3), expected (1024, 1360, 3)" in problem


@pytest.mark.parametrize("alias", ["champion", "previous"])
def test_only_promote_moves_champion_and_previous(alias, store):
    """Issue 21: `train -o tracking.alias=champion` and `second-look --alias champion` crowned a
    version with no evaluation, lock or promotion run."""
    from detection import config, tracking
    from detection.config import ConfigError
    from detection.second_look import SecondLookError
    from detection.second_look_train import SecondLookRequest

    with pytest.raises(ConfigError, match=f"alias '{alias}' is moved only by `promote`"):
        config.load(ROOT / "experiments" / "smoke.yaml", [f"tracking.alias={alias}"])
    with pytest.raises(SecondLookError, match="moved only by `promote`"):
        SecondLookRequest("models:/x/1", Path("."), alias=alias).check()
    with pytest.raises(tracking.TrackingError, match="moved only by `promote`"):
        tracking.register("runs:/0/model", "brecahad-faster-rcnn", alias, {})
    assert tracking.client().search_registered_models() == []  # refused before anything was written


def test_the_default_journal_sits_beside_the_tracking_store(tmp_path, monkeypatch):
    """Issue 21: the journal was relative to the working directory, a temporary checkout under
    `mlflow run` from a git URL, where the study was lost."""
    import mlflow

    from detection.studies import TuneError, default_storage

    store = tmp_path / "store"
    store.mkdir()
    elsewhere = tmp_path / "checkout"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: f"sqlite:///{store / 'mlflow.db'}")
    assert default_storage() == str(store.resolve() / "optuna-journal.log")
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:5000")
    with pytest.raises(TuneError, match="give every worker one Optuna storage with --storage"):
        default_storage()


@pytest.mark.slow  # runs the tune command in a fresh interpreter
@pytest.mark.subprocess
def test_a_refused_study_creates_no_journal_and_no_lock(store, tmp_path):
    """Issue 21: `tune --model models:/nope/1` still created optuna-journal.log and mlflow.db.lock."""
    from detection import tracking
    from tests.conftest import run_cli

    tracking.client().search_experiments()  # the store exists, as it does after any training
    before = set(store.iterdir())
    result = run_cli("tune", "--model", "models:/nope/1", "--data-dir", str(tmp_path), "--study", "s", cwd=store)
    assert result.returncode == 2 and "no registered model named 'nope'" in result.stderr
    assert set(store.iterdir()) == before


class _PickledPayload:
    """What a crafted pickled version holds: unpickling it runs code (here, it touches a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class _Crafted(mlflow.pyfunc.PythonModel):
    """A pyfunc that carries the payload in its pickle."""

    def __init__(self, marker: str):
        self.payload = _PickledPayload(marker)

    def predict(self, context, model_input, params=None):
        return model_input


def _smoke_detector():
    import torch

    from detection import config
    from detection.model import build_model

    cfg = config.load(ROOT / "experiments" / "smoke.yaml")
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


@pytest.mark.slow  # logs and registers four versions of a model
@pytest.mark.subprocess  # MLflow infers a pickled model's requirements in a fresh interpreter
def test_a_version_that_could_run_its_own_code_is_refused_before_it_loads(store, tmp_path):
    """Issue 21: a registered model was a cloudpickled object: a crafted python_model.pkl ran its code
    on whoever evaluated, predicted or served it, before any check."""
    import torch

    from detection import config as config_mod
    from detection import tracking
    from detection.predict import Detector, input_example, log_detector, signature
    from detection.train import reregister

    cfg, model = _smoke_detector()
    marker = tmp_path / "ran"
    with mlflow.start_run():
        ours = tracking.register(log_detector(cfg, model), "m", "challenger", {})
        pickled = mlflow.pyfunc.log_model(name="pickled", python_model=_Crafted(str(marker)))
        bad_code = tmp_path / "registered_model.py"
        bad_code.write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
        other_code = mlflow.pyfunc.log_model(name="code", python_model=str(bad_code))
    marker.unlink(missing_ok=True)  # logging may have loaded them; loading must not
    for uri, why in (
        (tracking.register(pickled.model_uri, "m", "challenger", {}), "pickled Python object"),
        (tracking.register(other_code.model_uri, "m", "challenger", {}), "is not this release's registered_model.py"),
    ):
        with pytest.raises(tracking.TrackingError, match=why):
            tracking.load_model(tracking.resolve_model(f"models:/m/{uri}"))
        assert not marker.exists()
    assert tracking.load_model(tracking.resolve_model(f"models:/m/{ours}")).config == cfg

    # A version an earlier release pickled, with its config and weights beside the pickle: reregister
    # reads those alone, and the new version loads.
    with mlflow.start_run():
        torch_path = tmp_path / "weights.pt"
        torch.save(model.state_dict(), torch_path)
        (tmp_path / "config.yaml").write_text(config_mod.dump(cfg))
        old = mlflow.pyfunc.log_model(
            name="old",
            python_model=Detector(),
            artifacts={"weights": str(torch_path), "config": str(tmp_path / "config.yaml")},
            signature=signature(),
        )
    old_version = tracking.register(old.model_uri, "m", "challenger", {"case": "old"})
    with pytest.raises(tracking.TrackingError, match="reregister"):
        tracking.load_model(tracking.resolve_model(f"models:/m/{old_version}"))
    _, new = reregister(f"models:/m/{old_version}")
    version = tracking.client().get_model_version("m", str(new))
    assert version.tags["reregistered_from"] == str(old_version) and version.tags["case"] == "old"
    loaded = tracking.load_model(tracking.resolve_model(f"models:/m/{new}"))
    assert loaded.config == cfg and len(loaded.predict(None, input_example())) >= 0
