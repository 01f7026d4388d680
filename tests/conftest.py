import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

# Under pytest-xdist (make test: two workers on two cores) each worker and the commands it starts
# compute on one thread: two workers of two threads each would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = SHARED / "brecahad-sample"
GROUND_TRUTH = SHARED / "brecahad-groundtruth"

SMOKE = str(ROOT / "experiments" / "smoke.yaml")
# Tiny training settings: a real smoke model, sized so one epoch takes seconds on 2 cores.
TINY = "data.patch_size=[256,340] model.min_size=256 model.max_size=340 data.val_patches=1 train.figure_every=1"


def need_shared(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the real BreCaHAD files live in ../shared/data next to the repo")
    return path


# Fixtures that train a model through the CLI or start a server: a test using one pays for it, and
# `make test-fast` leaves it out with the tests that start an interpreter.
SPAWNING_FIXTURES = {"trained", "trained_copy", "in_store", "versions", "server", "stack", "team"}
# Programs that are a fresh interpreter (the CLI, mlflow's servers, a shell running them).
INTERPRETERS = ("python", "mlflow", "bash", "sh")


def pytest_collection_modifyitems(items):
    for item in items:
        if SPAWNING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.subprocess)


def starts_interpreter(args) -> bool:
    argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
    program = Path(os.fsdecode(argv[0])).name if argv else ""
    return program.startswith(INTERPRETERS)


@pytest.fixture(autouse=True)
def _interpreters_are_marked(request, monkeypatch):
    """A test that starts a fresh Python (the CLI, a server, a worker) carries the `subprocess`
    marker, so `-m "not subprocess"` leaves out every test that pays for one."""
    if request.node.get_closest_marker("subprocess"):
        return
    start = subprocess.Popen.__init__

    def guarded(self, args, *rest, **options):
        if starts_interpreter(args):
            shown = " ".join(map(os.fsdecode, args if not isinstance(args, str) else [args]))[:80]
            pytest.fail(f"{request.node.nodeid} starts `{shown}`: mark it @pytest.mark.subprocess", pytrace=False)
        start(self, args, *rest, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Six synthetic images in three cases of two: enough for a case split."""
    from detection.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, images=6, seed=1, per_case=2)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        for p in dst.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        return dst

    return make


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A fresh sqlite MLflow store in a temp dir, as the working directory of the run."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    point_mlflow_at(f"sqlite:///{workdir / 'mlflow.db'}", monkeypatch)
    return workdir


def point_mlflow_at(uri: str, monkeypatch, env: dict | None = None) -> None:
    """This test's process and its children talk to `uri` and no earlier test's experiment or run.

    The fluent API keeps the experiment an earlier in-process `mlflow.set_experiment` chose (detection's
    own commands call it) in a module global, and a later `mlflow.start_run()` on a fresh store then asks
    for an experiment id that store never had."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for key, value in ({"MLFLOW_TRACKING_URI": uri} | (env or {})).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)


LAUNCH_VARS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def child_env(env: dict | None = None) -> dict:
    """The environment of a command a test starts: the venv first on PATH, and none of the run or
    experiment an earlier in-process `mlflow.set_experiment` exported (a child would look for that
    experiment in its own store: "No Experiment with id=2 exists"); `env` on top."""
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return inherited | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | (env or {})


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 600, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python -m detection ARGS` in `cwd`, with `env` on top of this process's environment; its
    exit code and what it printed. It runs in this process (cli.main, as the console script calls
    it): a fresh interpreter pays 7 s of imports (torch, mlflow) a call, most of a small command,
    and the suite makes a hundred. `fresh=True` starts one, for what only a process shows: its
    temp dir, its logging, a race or a kill. `timeout` bounds a fresh process only: an in-process
    command cannot be stopped from outside."""
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "detection", *args],
            cwd=cwd,
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    out, err = io.StringIO(), io.StringIO()
    with _as_a_command(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main(list(args))
    return subprocess.CompletedProcess(["python", "-m", "detection", *args], code, out.getvalue(), err.getvalue())


def _main(argv: list[str]) -> int:
    """cli.main as `python -m detection` ends: its return value, argparse's exit, or 1 and the
    traceback of a bug."""
    from detection import cli

    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception:
        traceback.print_exc()
        return 1


@contextlib.contextmanager
def _as_a_command(cwd: Path, env: dict | None):
    """This process as a fresh command would find it: the child's environment and working
    directory, no tracking URI or experiment chosen in-process, and everything put back after
    (the command's own environment changes too), with any run it left active ended as MLflow's
    exit handler ends it."""
    import tempfile

    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id)
    saved_tmp, wanted = tempfile.tempdir, child_env(env)
    os.environ.clear()
    os.environ.update(wanted)
    tracking_utils._tracking_uri = registry_utils._registry_uri = fluent._active_experiment_id = None
    tempfile.tempdir = None  # TMPDIR, as a new process reads it
    os.chdir(cwd)
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id = saved
        tempfile.tempdir = saved_tmp


def train_tiny(
    data_dir: Path,
    overrides: str = "train.epochs=1",
    *,
    cwd: Path,
    env: dict | None = None,
    extra: tuple[str, ...] = (),
    command: str = "train",
) -> subprocess.CompletedProcess:
    """`python -m detection train` (or `cv`) of the tiny smoke model: smoke.yaml, TINY and `overrides`."""
    return run_cli(*tiny_args(data_dir, overrides, command), *extra, cwd=cwd, env=env)


def tiny_args(data_dir: Path, overrides: str = "train.epochs=1", command: str = "train") -> list[str]:
    """The command line of a tiny smoke training, after `python -m detection`."""
    return [command, "--config", SMOKE, "--data-dir", str(data_dir), "-o", f"{TINY} {overrides}"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, synth_dir) -> dict:
    """One tiny smoke model trained on the synthetic data and registered in its own sqlite store."""
    workdir = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    result = train_tiny(synth_dir, cwd=workdir, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stderr[-3000:]
    version = _registry(uri).get_model_version_by_alias(TRAINED_NAME, "challenger").version
    return {
        "workdir": workdir,
        "uri": uri,
        "model": f"models:/{TRAINED_NAME}@challenger",
        "version": version,
        "stdout": result.stdout,
    }


TRAINED_NAME = "brecahad-faster-rcnn"


def _registry(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(autouse=True)
def _trained_challenger_put_back(request):
    """A worker's tests share one trained store, and a study or a training in it moves its
    `challenger` to the version it registers. After each test that used the store the alias is on
    the trained version again, so what a test loads as `@challenger` never depends on which tests
    its pytest-xdist worker ran before it."""
    trained = request.getfixturevalue("trained") if "trained" in request.fixturenames else None
    yield
    if trained is not None:
        _registry(trained["uri"]).set_registered_model_alias(TRAINED_NAME, "challenger", trained["version"])


@pytest.fixture
def trained_copy(trained, tmp_path, monkeypatch) -> str:
    """A copy of the trained model's store (its artifacts stay shared) that this test may promote
    or alias in, with this test's MLflow aimed at it; returns its URI."""
    store = tmp_path / "mlflow.db"
    shutil.copy(Path(trained["uri"].removeprefix("sqlite:///")), store)
    point_mlflow_at(f"sqlite:///{store}", monkeypatch)
    return f"sqlite:///{store}"


@pytest.fixture
def in_store(trained, monkeypatch):
    """Point this test's MLflow client at the trained model's store."""
    monkeypatch.chdir(trained["workdir"])
    point_mlflow_at(trained["uri"], monkeypatch)
    return trained


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], ready_url: str, cwd: Path, timeout: float = 240, stdout=subprocess.DEVNULL):
    """Start a real server in its own process group, wait until `ready_url` answers, and stop the
    whole group afterwards (mlflow's servers spawn workers of their own)."""
    import urllib.request

    env = dict(os.environ) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, f"{command[:3]} did not start"
                time.sleep(1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@contextlib.contextmanager
def tracking_server(folder: Path):
    """`mlflow server` on a free port of 127.0.0.1, its store and served artifacts in `folder`;
    yields its URI once /health answers."""
    from detection.stack import server_command

    port = free_port()
    command = server_command(port, f"sqlite:///{folder / 'server.db'}", str(folder / "served-artifacts"))
    with serving(command, f"http://127.0.0.1:{port}/health", folder, timeout=180) as server:
        server.uri = f"http://127.0.0.1:{port}"
        yield server


@contextlib.contextmanager
def model_server(model: str, cwd: Path, *options: str):
    """`python -m detection serve` (the version checked, then `mlflow models serve`) of a registry URI
    on a free port of 127.0.0.1, in the project's venv; yields its /invocations URL once /ping answers."""
    port = free_port()
    command = [sys.executable, "-m", "detection", "serve", "--model", model, "--host", "127.0.0.1"]
    with serving([*command, "--port", str(port), *options], f"http://127.0.0.1:{port}/ping", cwd):
        yield f"http://127.0.0.1:{port}/invocations"


def post_json(url: str, payload: dict) -> tuple[int, dict]:
    """POST a JSON body; the status and the decoded answer (an HTTP error status raises HTTPError)."""
    import json
    import urllib.request

    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, json.loads(response.read())


@pytest.fixture(scope="session")
def versions(trained):
    """One registered model with versions that differ only in what they keep:
    `all` keeps every box (high detection rate), `none` keeps nothing above 0.99, `tie` = `all`,
    `other_split` records a different test split."""
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from detection import tracking
    from detection.predict import log_detector

    os.environ["MLFLOW_TRACKING_URI"] = trained["uri"]
    mlflow.set_tracking_uri(trained["uri"])
    client = MlflowClient()
    source = client.get_model_version_by_alias("brecahad-faster-rcnn", "challenger")
    detector = mlflow.pyfunc.load_model(f"models:/brecahad-faster-rcnn/{source.version}").unwrap_python_model()
    split = mlflow.artifacts.load_dict(f"runs:/{source.run_id}/split.json")
    other = dict(split, test=split["val"], val=split["test"])
    name = "promo"
    made = {}
    for key, overrides, recorded in (
        ("none", ["model.box_score_thresh=0.99"], split),
        ("all", ["model.box_score_thresh=0.0", "model.box_detections_per_img=1000"], split),
        ("tie", ["model.box_score_thresh=0.0", "model.box_detections_per_img=1000"], split),
        ("other_split", ["model.box_score_thresh=0.0"], other),
    ):
        mlflow.set_experiment("promo-versions")
        with mlflow.start_run(run_name=key):
            mlflow.log_text(json.dumps(recorded), "split.json")
            uri = log_detector(detector.config.replace(*overrides), detector.model)
        made[key] = tracking.register(uri, name, "challenger", {"case": key})
    os.environ.pop("MLFLOW_TRACKING_URI")
    return {"name": name, **made}
