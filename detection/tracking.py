"""The project's tracking: what MLflow does not do by itself, so the stages stay pure.

It keeps the run lifecycle (attach, create, resume without logging a step twice, end with the
right status), model resolution, check-then-register, and the store's first-use lock. Anything
else the stages need from MLflow they ask of `client()`, the one client of the store, always
naming the run by its id: a call never lands in whichever run happens to be active.

Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is attached to; run directly, a run
is created in `tracking.experiment`. A run ends FINISHED only after every metric and artifact is
written; any error ends it FAILED with the error logged, Ctrl-C ends it KILLED. Runs are opened
with `mlflow.start_run`, which system metrics and `log_model` need; nothing is logged through it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import random
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from filelock import FileLock
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .choices import promoted_alias_problem
from .errors import DetectionError

TAG = "detection."


@functools.cache
def _client_for(tracking_uri: str, registry_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri, registry_uri)


def client() -> MlflowClient:
    """The store's one client; a new one only when the tracking URI changes (tests point at many)."""
    return _client_for(mlflow.get_tracking_uri(), mlflow.get_registry_uri())


class TrackingError(DetectionError, RuntimeError):
    """A store, server, run or model version that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, resolved from `models:/name@alias` or `models:/name/version`."""

    uri: str
    name: str
    version: int
    run_id: str | None  # the training run

    @property
    def pinned(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_model(uri: str) -> ModelRef:
    """The registry entry behind a model URI, or an error naming what is missing and what exists."""
    if not uri.startswith("models:/"):
        raise TrackingError(f"model {uri!r} is not a registry URI; use models:/NAME@ALIAS or models:/NAME/VERSION")
    body = uri[len("models:/") :]
    name, sep, alias = body.partition("@")
    api = client()
    try:
        api.get_registered_model(name if sep else body.rsplit("/", 1)[0])
    except MlflowException:
        known = ", ".join(m.name for m in api.search_registered_models()) or "none"
        raise TrackingError(
            f"no registered model named {(name if sep else body.rsplit('/', 1)[0])!r} in "
            f"{mlflow.get_tracking_uri()} (registered: {known})"
        ) from None
    try:
        if sep:
            mv = api.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.rpartition("/")
            if not version.isdigit():
                raise TrackingError(
                    f"model {uri!r}: {version!r} is not a version number; use models:/{name}/N or @ALIAS"
                )
            mv = api.get_model_version(name, version)
    except MlflowException as e:
        raise TrackingError(f"model {uri!r} does not exist: {e.message}") from None
    return ModelRef(uri, mv.name, int(mv.version), mv.run_id)


def alias_version(name: str, alias: str) -> ModelRef | None:
    """The version an alias points at, or None when the alias is not set."""
    try:
        mv = client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return ModelRef(f"models:/{name}@{alias}", mv.name, int(mv.version), mv.run_id)


def tag_version(name: str, version: int, prefix: str, tags: dict[str, Any]) -> None:
    """Tags under one prefix on a model version (promotion.*, tune.study.*)."""
    for k, v in tags.items():
        client().set_model_version_tag(name, str(version), prefix + k, str(v))


MODEL_CODE = Path(__file__).with_name("registered_model.py")  # what every version runs when loaded
MODEL_ARTIFACTS = {"config", "weights", "second_look"}  # YAML and state_dicts: data, never code


def model_form_problem(path: Path) -> str | None:
    """Why a downloaded model is not a version of this project (so loading it could run code that
    came with it), or None: a pyfunc logged from MODEL_CODE, byte for byte, whose artifacts are a
    config and state_dicts."""
    try:
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "it has no readable MLmodel with a python_function flavor"
    if (path / "python_model.pkl").exists() or flavor.get("loader_module") != "mlflow.pyfunc.loaders.code_model":
        return (
            "it is a pickled Python object (python_model.pkl), which runs whatever it holds when loaded; "
            "an earlier release registered it so: re-register its weights with `python -m detection "
            "reregister MODEL_URI`"
        )
    code = path / Path(str(flavor.get("model_code_path", ""))).name
    if code.name != MODEL_CODE.name or not code.is_file() or code.read_bytes() != MODEL_CODE.read_bytes():
        return f"its code ({code.name}) is not this release's {MODEL_CODE.name}; loading it would run that code"
    extra = sorted(set(flavor.get("artifacts") or {}) - MODEL_ARTIFACTS)
    if extra or flavor.get("code"):
        return f"it carries {', '.join(extra) or 'code paths'} beside its config and weights"
    return None


@contextlib.contextmanager
def verified_copy(uri: str) -> Iterator[Path]:
    """A local copy of a logged or registered version, checked to be in the project's form
    (model_form_problem) and removed afterwards: MLflow downloads a model from a tracking server into
    a fresh temp dir and leaves it there, a full copy of the weights per evaluation, tune worker,
    promotion, training run and server."""
    with tempfile.TemporaryDirectory(prefix="brecahad-model-") as tmp:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        problem = model_form_problem(path)
        if problem:
            raise TrackingError(f"model {uri} is refused: {problem}")
        yield path


def load_pyfunc(uri: str):
    """A logged or registered version, loaded from a verified copy (which is then removed)."""
    with verified_copy(uri) as path:
        return mlflow.pyfunc.load_model(str(path))  # load_context reads every file it needs


def load_model(ref: ModelRef):
    """The registered pyfunc and its wrapped Detector (config and torch model)."""
    try:
        pyfunc = load_pyfunc(ref.pinned)
    except TrackingError as e:
        raise TrackingError(f"model {ref.uri} (version {ref.version}) {str(e).split(' is refused: ', 1)[-1]}") from None
    except Exception as e:
        raise TrackingError(f"model {ref.uri} (version {ref.version}) does not load: {type(e).__name__}: {e}") from e
    return pyfunc.unwrap_python_model()


def check_reachable(timeout: float = 5.0) -> None:
    """Fail fast, instead of MLflow's minutes of retries, when a tracking server does not answer,
    refuses the login, or cannot reach its artifact store: before any epoch or trial."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        _get(uri, "/health", timeout)
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"tracking server {uri} is unreachable ({e}); start it (mlflow server --host 127.0.0.1) "
            f"or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from None
    try:
        _get(uri, "/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            given = os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")
            raise TrackingError(
                f"tracking server {uri} refused the login (HTTP {e.code}): "
                + (
                    "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                    if given
                    else "it needs one; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                )
            ) from None
        raise TrackingError(f"tracking server {uri} answered HTTP {e.code} to a search: {_reason(e)}") from None
    _check_artifact_store(uri)


def _check_artifact_store(uri: str, timeout: float = 60.0) -> None:
    """A server that proxies artifacts (mlflow server --artifacts-destination) lists its store's root."""
    try:
        _get(uri, "/api/2.0/mlflow-artifacts/artifacts", timeout)
    except urllib.error.HTTPError as e:
        if e.code in (404, 503):  # the server does not proxy artifacts; clients write to the store directly
            return
        raise TrackingError(
            f"tracking server {uri} cannot reach its artifact store (HTTP {e.code}: {_reason(e)}); "
            f"check the server's --artifacts-destination, MLFLOW_S3_ENDPOINT_URL and S3 "
            f"credentials"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"tracking server {uri} did not list its artifact store within {timeout:.0f} s ({e}); "
            f"check the server's --artifacts-destination and MLFLOW_S3_ENDPOINT_URL"
        ) from None


def _get(uri: str, path: str, timeout: float) -> bytes:
    """GET with the login MLflow's client would send (MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    request = urllib.request.Request(uri.rstrip("/") + path)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.read()


def _reason(error: urllib.error.HTTPError) -> str:
    """The server's own message, on one line."""
    try:
        body = json.loads(error.read() or b"{}")
    except ValueError:
        return error.reason
    return " ".join(str(body.get("message") or body.get("error_code") or error.reason).split())[:300]


def launched_run_id() -> str | None:
    """The run `mlflow run` made for this process, if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def get_run(run_id: str):
    try:
        return client().get_run(run_id)
    except MlflowException as e:
        raise TrackingError(
            f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}: {e.message}"
        ) from None


def fail_launched_run(error: BaseException, problems: list[str] | None = None) -> None:
    """Record why a run launched by `mlflow run` failed before its work began, and mark it FAILED.
    A run that already ended (the `run` context ends its own on errors) is left as it is."""
    run_id = launched_run_id()
    if not run_id:
        return
    api = client()
    if api.get_run(run_id).info.status != "RUNNING":
        return
    api.set_tag(run_id, TAG + "error", str(error)[:5000])
    api.log_text(run_id, "\n".join(problems) if problems else str(error), "problems.txt")
    api.set_terminated(run_id, status="FAILED")


def read_artifact_text(run_id: str, path: str) -> str:
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError) as e:
        raise TrackingError(f"run {run_id} has no artifact {path!r} ({e})") from None


def download_if_present(run_id: str, path: str, dst: Path) -> Path | None:
    parent = str(Path(path).parent)
    listed = {a.path for a in client().list_artifacts(run_id, None if parent == "." else parent)}
    if path not in listed:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def last_steps(run_id: str) -> dict[str, int]:
    """The highest step already logged for each metric, so a resumed run logs none twice."""
    api = client()
    return {k: max(m.step for m in api.get_metric_history(run_id, k)) for k in api.get_run(run_id).data.metrics}


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    mlflow.flush_async_logging()
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


class Tracker:
    """One run's logging, by its id: `client` and `run_id` for plain artifacts
    (`tr.client.log_figure(tr.run_id, fig, "figures/x.png")`), and the calls below, which add
    something. Steps at or below `skip` (per metric) were logged before a resume."""

    def __init__(self, run_id: str, skip: dict[str, int] | None = None):
        self.run_id = run_id
        self.client = client()
        self.skip = skip or {}
        self._params: set[str] | None = None  # the run's logged params, read once

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        fresh = [Metric(k, float(v), now, step) for k, v in values.items() if step > self.skip.get(k, -1)]
        if fresh:  # queued: a per-step round trip to a remote server would stall training
            self.client.log_batch(self.run_id, metrics=fresh, synchronous=False)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params not logged yet: a resumed run already holds its config, and MLflow refuses a change."""
        if self._params is None:
            self._params = set(get_run(self.run_id).data.params)
        new = {k: v for k, v in params.items() if k not in self._params}
        if new:
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in new.items()])
            self._params |= new.keys()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(TAG + k, str(v)) for k, v in tags.items()])

    def log_image(self, figure, key: str, step: int) -> None:
        """A figure as an image with a step: the UI's image slider walks it across epochs."""
        figure.canvas.draw()
        image = np.asarray(figure.canvas.buffer_rgba())[..., :3]
        self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_dataset(self, table: pd.DataFrame, source: str, digest: str, name: str, context: str) -> None:
        """The images a run used, as an MLflow dataset input with its context (training, testing...)."""
        with warnings.catch_warnings():  # a local folder resolves to two equivalent source types
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=source, name=name, digest=digest)
        context_tag = InputTag(key="mlflow.data.context", value=context)  # what mlflow.log_input sets
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), [context_tag])])


@contextlib.contextmanager
def _detached_from_launched_run():
    """Hide `mlflow run`'s MLFLOW_RUN_ID so a new run can start beside (or under) the launched one."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def ensure_store() -> None:
    """Create a fresh sqlite store's tables under a file lock: workers that start together would
    otherwise race to create them and corrupt the database."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        with FileLock(str(path) + ".lock", timeout=300):
            client().search_experiments(max_results=1)


@contextlib.contextmanager
def _ending(active) -> Iterator[Tracker]:
    """End the active run FINISHED, or FAILED (KILLED on Ctrl-C) with the error logged."""
    run_id = active.info.run_id
    try:
        yield Tracker(run_id, {})
        mlflow.flush_async_logging()  # a run is FINISHED only with every queued metric written
    except KeyboardInterrupt:
        client().set_tag(run_id, TAG + "error", "interrupted; resume with -P resume=" + run_id)
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as e:
        # An exception may name the status it means (a pruned trial is KILLED, not FAILED).
        client().set_tag(run_id, TAG + "error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run(status=getattr(e, "run_status", "FAILED"))
        raise
    mlflow.end_run(status="FINISHED")


# What the MLflow UI (3.x) needs to open an experiment on its runs table instead of the GenAI view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tag_experiment(experiment_id: str) -> None:
    key, value = EXPERIMENT_KIND
    if client().get_experiment(experiment_id).tags.get(key) != value:
        client().set_experiment_tag(experiment_id, key, value)


def use_experiment(name: str) -> str:
    """The id of the experiment called `name`, created if missing (another process may create it at
    the same moment), tagged as model development."""
    api = client()
    found = api.get_experiment_by_name(name)
    if found is None:
        try:
            experiment_id = api.create_experiment(name)
        except MlflowException:  # created meanwhile by another worker
            experiment_id = api.get_experiment_by_name(name).experiment_id
    else:
        experiment_id = found.experiment_id
    tag_experiment(experiment_id)
    return experiment_id


@contextlib.contextmanager
def run(
    experiment: str,
    resume: str | None = None,
    system_metrics: bool = False,
    parent: str | None = None,
    name: str | None = None,
) -> Iterator[Tracker]:
    """Attach to (or create, or reopen for resuming) the run and end it with the right status.
    With `parent`, a new nested run is made under that run, whatever `mlflow run` launched."""
    launched = launched_run_id()
    skip: dict[str, int] = {}
    if parent:
        with _detached_from_launched_run():
            active = mlflow.start_run(
                experiment_id=get_run(parent).info.experiment_id,
                parent_run_id=parent,
                nested=mlflow.active_run() is not None,
                run_name=name,
                log_system_metrics=system_metrics,
            )
    elif resume:
        get_run(resume)
        if launched and launched != resume:
            client().set_tag(launched, TAG + "resumed_run", resume)
        active = mlflow.start_run(run_id=resume, log_system_metrics=system_metrics)
        skip = last_steps(resume)
    else:
        if not launched:
            mlflow.set_experiment(experiment_id=use_experiment(experiment))
        active = mlflow.start_run(log_system_metrics=system_metrics, run_name=name)
        if launched:  # `mlflow run` made the run, with a random name, in the experiment it was given
            tag_experiment(active.info.experiment_id)
            if name:
                client().set_tag(active.info.run_id, "mlflow.runName", name)
    with _ending(active) as tr:
        tr.skip = skip
        yield tr


@contextlib.contextmanager
def reopen(run_id: str) -> Iterator[Tracker]:
    """Log more into an existing run (a study's parent), ending it like `run` does."""
    with _ending(mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)) as tr:
        yield tr


def create_run(experiment: str, name: str, tags: dict[str, Any]) -> str:
    """A run left RUNNING for several processes to nest their runs under (a study's parent):
    the run `mlflow run` launched, else a new one in `experiment`."""
    api = client()
    run_id = launched_run_id()
    if run_id is None:
        run_id = api.create_run(use_experiment(experiment), run_name=name).info.run_id
    else:
        tag_experiment(get_run(run_id).info.experiment_id)
        api.set_tag(run_id, "mlflow.runName", name)
    api.log_batch(run_id, tags=[RunTag(TAG + k, str(v)) for k, v in tags.items()])
    return run_id


def tag_launched_run(key: str, value: str) -> None:
    launched = launched_run_id()
    if launched:
        client().set_tag(launched, TAG + key, value)


def package_version() -> str:
    """This package's installed version: evaluations are reused only when it matches."""
    try:
        return metadata.version("brecahad-detection")
    except metadata.PackageNotFoundError:
        return "unknown"


def requirements() -> list[str]:
    """Pinned requirements of the logged model; listing them skips MLflow's slow inference."""
    names = ["torch", "torchvision", "mlflow", "numpy", "pandas", "scipy", "tifffile", "pyyaml", "cloudpickle"]
    return [f"{n}=={metadata.version(n)}" for n in names]


def find_runs(filter_string: str) -> list:
    """Finished runs in any experiment matching an MLflow filter, newest first."""
    api = client()
    ids = [e.experiment_id for e in api.search_experiments()]
    return api.search_runs(
        ids, f"{filter_string} and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"]
    )


def create_child_run(
    parent: str, name: str, params: dict[str, Any], metrics: dict[str, float], tags: dict[str, str]
) -> str:
    """A finished nested run under `parent`, written in one batch (the tune study's trials)."""
    api = client()
    child = api.create_run(
        get_run(parent).info.experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent} | {TAG + k: str(v) for k, v in tags.items()},
    )
    now = int(1000 * time.time())
    api.log_batch(
        child.info.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    api.set_terminated(child.info.run_id, "FINISHED")
    return child.info.run_id


def log_model(artifacts: dict[str, str], input_example, signature, name: str = "model"):
    """Log a version from MODEL_CODE with its config and weights, then load it back (through the
    same check as every load) and predict once: a model that fails here is never registered."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        pip_requirements=requirements(),
        signature=signature,
        input_example=input_example,
    )
    load_pyfunc(info.model_uri).predict(input_example)
    return info


def versions_of_run(name: str | None, run_id: str) -> list[tuple[str, int]]:
    """(model, version) registered from `run_id`, of `name` or of any registered model, oldest first."""
    query = f"run_id='{run_id}'" + (f" and name='{name}'" if name else "")
    return sorted((v.name, int(v.version)) for v in client().search_model_versions(query))


def end_child_runs(parent: str, name: str, status: str) -> list[str]:
    """End the RUNNING nested runs called `name` under `parent` (a dead worker's trial) with `status`."""
    api = client()
    runs = api.search_runs(
        [get_run(parent).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}' and attributes.run_name = '{name}' and attributes.status = 'RUNNING'",
    )
    for r in runs:
        api.set_tag(r.info.run_id, TAG + "error", "its worker died (no heartbeat); the trial was run again")
        api.set_terminated(r.info.run_id, status)
    return [r.info.run_id for r in runs]


LEASE_TAG = "promotion.lease"


@contextlib.contextmanager
def registry_lock(name: str, timeout: float = 1800, lease: float = 900) -> Iterator[None]:
    """Hold `name`'s promotion lock across processes while the champion is re-read and the aliases move.

    Beside a local sqlite store: a file lock. Against a tracking server, whose processes may sit on
    several machines: a lease, the registered-model tag `promotion.lease` holding an owner and an
    expiry, written when free or expired and re-read after writing, so that of two writers only the
    one whose tag stayed goes on.
    """
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        with FileLock(uri[len("sqlite:///") :] + f".{name}.promotion.lock", timeout=timeout):
            yield
        return
    with lease_lock(name, timeout, lease):
        yield


@contextlib.contextmanager
def lease_lock(name: str, timeout: float = 1800, lease: float = 900) -> Iterator[None]:
    api = client()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout

    def holder() -> dict | None:
        text = api.get_registered_model(name).tags.get(LEASE_TAG)
        return json.loads(text) if text else None

    while True:
        current = holder()
        if current is None or current["expires"] < time.time():
            # A concurrent writer's tag may land first; the re-read below decides.
            with contextlib.suppress(MlflowException):
                api.set_registered_model_tag(
                    name, LEASE_TAG, json.dumps({"owner": owner, "expires": time.time() + lease})
                )
            time.sleep(0.5)  # let a concurrent writer land, then see whose tag stayed
            if (holder() or {}).get("owner") == owner:
                break
        if time.monotonic() > deadline:
            raise TrackingError(
                f"the promotion lease on {name!r} is held by {current and current['owner']}; "
                f"waited {timeout:.0f} s. If that process died, the lease expires by itself"
            )
        time.sleep(0.5 + random.random())
    try:
        yield
    finally:
        if (holder() or {}).get("owner") == owner:
            api.delete_registered_model_tag(name, LEASE_TAG)


def register(model_uri: str, name: str, alias: str, tags: dict[str, Any], description: str = "") -> int:
    """Register a logged model as a new version of `name` with its tags and a description the
    registry page shows (what the version is), then point `alias` at it (never champion or
    previous: those only `promote` moves)."""
    reserved = promoted_alias_problem(alias)
    if reserved:
        raise TrackingError(reserved)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if description:
        client().update_model_version(name, version.version, description=description)
    client().set_registered_model_alias(name, alias, version.version)
    return int(version.version)
