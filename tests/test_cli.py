"""The CLI's one error path: every error a user should see is a DetectionError, printed on one line
with its class's exit code, and a run `mlflow run` launched is marked FAILED in one place."""

import contextlib
import importlib
import inspect
import pkgutil

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import detection
from detection import cli
from detection.config import ConfigError
from detection.engine import NonFiniteLoss
from detection.errors import DetectionError


def _error_classes():
    for info in pkgutil.iter_modules(detection.__path__):
        if info.name == "__main__":  # importing it runs the CLI
            continue
        module = importlib.import_module(f"detection.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == module.__name__:
                yield cls


def test_every_error_class_of_the_package_is_a_detection_error():
    classes = set(_error_classes())
    assert len(classes) >= 12, classes  # one per stage, found by walking the package
    # tune.Pruned is Optuna's signal to prune a trial, never shown to a user.
    assert {c.__name__ for c in classes if not issubclass(c, DetectionError)} == {"Pruned"}


def _raising(monkeypatch, error: BaseException) -> None:
    def command(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "validate", command)


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (ConfigError("train.lr=-1 must be > 0"), 2, "error: train.lr=-1 must be > 0\n"),
        (NonFiniteLoss(3, {"loss": float("nan")}), 1, "; the run is FAILED and keeps its last good checkpoint"),
    ],
)
def test_a_detection_error_is_one_line_with_its_class_exit_code(monkeypatch, capsys, tmp_path, error, code, words):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _raising(monkeypatch, error)
    assert cli.main(["validate", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_any_other_error_keeps_its_traceback(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _raising(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["validate", str(tmp_path)])


@pytest.mark.parametrize("error", [ConfigError("data.box_size=0 must be > 0 pixels"), KeyError("a bug")])
def test_the_launched_run_is_failed_with_the_error_once(store, monkeypatch, tmp_path, error):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("launched")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # what `mlflow run` hands the command
    _raising(monkeypatch, error)
    with pytest.raises(KeyError) if isinstance(error, KeyError) else contextlib.nullcontext():
        cli.main(["validate", str(tmp_path)])
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert str(error) in run.data.tags["detection.error"]
    assert str(error) in mlflow.artifacts.load_text(f"runs:/{run_id}/problems.txt")


def test_an_unreachable_store_does_not_hide_the_first_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'mlflow.db'}")
    mlflow.set_tracking_uri(None)  # from the environment, as a fresh process would
    _raising(monkeypatch, ConfigError("model.weights=x.pt: no such file"))
    assert cli.main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not mark the launched run FAILED" in err and "error: model.weights=x.pt: no such file" in err


def test_check_is_the_dataset_check_under_both_names(synth_dir, capsys):
    # "validate" stays the MLproject entry point; "check" is the same command, named for what it does.
    assert cli.main(["check", str(synth_dir)]) == cli.main(["validate", str(synth_dir)]) == 0
    assert capsys.readouterr().out.count(f"{synth_dir}: valid") == 2


def test_each_option_a_user_gives_reaches_the_command_s_request(monkeypatch, tmp_path):
    """The request is built from the options of its fields' names: none is dropped or shifted."""
    from detection import evaluate as evaluate_mod
    from detection import tune as tune_mod

    seen = []
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda req: seen.append(req) or ("r", dict.fromkeys(KEYS, 0.0)))
    monkeypatch.setattr(tune_mod, "tune", lambda req: seen.append(req) or ("p", {}, []))
    monkeypatch.delenv("BRECAHAD_OPTUNA_STORAGE", raising=False)
    common = ["--model", "models:/m/3", "--data-dir", str(tmp_path), "--protocol", "paper", "--seed", "7"]
    cli.main(["evaluate", *common, "--split", "val", "--matching", "hungarian", "--allow-overlap", "true",
              "--match-radius-um", "4.5", "--device", "cpu"])  # fmt: skip
    with contextlib.suppress(Exception):  # printing the study's result needs a real one
        cli.main(["tune", *common, "--study", "s", "--n-trials", "9", "--kind", "training", "--objective", "pareto",
                  "--max-fdr", "0.3", "--range", "score_thresh=0.1:0.5", "--train-overrides", "train.epochs=2 a=b",
                  "--heartbeat", "12"])  # fmt: skip
    ev, tu = seen
    assert (ev.model, ev.split, ev.protocol, ev.matching, ev.seed) == ("models:/m/3", "val", "paper", "hungarian", 7)
    assert (ev.allow_overlap, ev.match_radius_um, ev.device, ev.data_dir) == (True, 4.5, "cpu", tmp_path)
    assert (tu.study, tu.n_trials, tu.kind, tu.objective, tu.max_fdr, tu.seed) == ("s", 9, "training", "pareto", 0.3, 7)
    assert (tu.ranges, tu.train_overrides, tu.heartbeat) == (
        {"score_thresh": (0.1, 0.5)},
        ("train.epochs=2", "a=b"),
        12,
    )
    assert tu.storage is None and tu.protocol == "paper"


KEYS = ("detection_rate", "fdr", "precision", "f1", "fp_per_mm2", "froc", "ap", "box_ap50")
