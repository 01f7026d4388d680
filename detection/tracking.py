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
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
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
from filelock import FileLock, Timeout
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


class TrackingLost(TrackingError):
    """The tracking server stopped answering during a run: nothing more is sent to it (the run stays
    RUNNING there until it is resumed), and the message says how to resume."""

    exit_code = 1
    offline = True  # nothing may try the server again on the way out


def bound_requests(timeout: int = 30, retries: int = 3, backoff: int = 1) -> None:
    """Unless the user set them: a request to a server that hangs fails after `timeout` s and
    `retries` tries, not MLflow's 120 s and 7 tries (14 minutes for one call); retries wait 0, 2, 4 s
    instead of 0, 4, 8 s, so a request under way when the server goes gives up ~6 s sooner."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(backoff))


def stop_trying_the_server() -> None:
    """Every later MLflow request fails at once instead of retrying for minutes: MLflow's own exit
    handler ends the active run through the server, and would hang on one that is gone."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"
    # The queue of metrics not yet sent is flushed at exit and fails; what it would print ("Failed
    # to log run data", after the line that says how to resume) is what that line already says.
    logging.getLogger("mlflow").setLevel(logging.CRITICAL)


class ServerWatch:
    """Asks the tracking server's /health every `every` s in a thread; `down` is set once it has not
    answered for `grace` s. A local store is never down. Use as a context manager."""

    def __init__(self, every: float = 2.0, grace: float = 10.0, clock=time.monotonic, probe=None):
        uri = mlflow.get_tracking_uri()
        self.uri, self.every, self.grace, self.clock = uri, every, grace, clock
        self.probe = probe or (lambda: _get(uri, "/health", min(every, 5.0)))
        self.remote = uri.startswith(("http://", "https://"))
        self.down = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tracking-server watch", daemon=True)

    def _watch(self) -> None:
        answered = self.clock()
        while not self._stop.wait(self.every):
            try:
                self.probe()
                answered = self.clock()
            except Exception:
                if self.clock() - answered >= self.grace:
                    self.down.set()
                    return

    def __enter__(self) -> ServerWatch:
        if self.remote:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


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
        problem = str(e).split(" is refused: ", 1)[-1]
        raise TrackingError(f"model {ref.uri} (version {ref.version}) does not load: {problem}") from None
    except Exception as e:
        raise TrackingError(f"model {ref.uri} (version {ref.version}) does not load: {type(e).__name__}: {e}") from e
    return pyfunc.unwrap_python_model()


def check_reachable(timeout: float = 30.0) -> None:
    """Fail fast, instead of MLflow's minutes of retries, when a tracking server does not answer,
    refuses the login, or cannot reach its artifact store: before any epoch or trial. A refused
    connection fails at once; `timeout` is for a server that accepts and then stalls (a busy
    server on a loaded machine took over 5 s to answer a search)."""
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
    except (urllib.error.URLError, OSError) as e:  # a stalled answer (TimeoutError), a dropped connection
        raise TrackingError(
            f"tracking server {uri} did not answer a search within {timeout:.0f} s ({e}); check that it is not "
            f"overloaded and that its backend store (--backend-store-uri) answers"
        ) from None
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


def name_launched_run(name: str, tags: dict[str, str] | None = None) -> str | None:
    """Under `mlflow run`, give the run MLflow made (named at random, like `bald-whale-695`) the
    project's name for what it does, and `tags`; its id, or None outside `mlflow run`."""
    run_id = launched_run_id()
    if run_id:
        named = {"mlflow.runName": name} | (tags or {})
        client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in named.items()])
    return run_id


RANDOM_NAME = re.compile(r"[a-z]+-[a-z]+-\d+")  # MLflow's own names for runs: bald-whale-695


def name_unnamed_launched_run(name: str) -> None:
    """A command that logs nothing of its own (validate, download) still leaves the run `mlflow run`
    made under the project's name for it, not MLflow's random one; a name the command gave stays."""
    run_id = launched_run_id()
    if run_id and RANDOM_NAME.fullmatch(get_run(run_id).data.tags.get("mlflow.runName", "")):
        client().set_tag(run_id, "mlflow.runName", name)


def fail_launched_run(error: BaseException, problems: list[str] | None = None) -> None:
    """Record why a run launched by `mlflow run` failed before its work began, and mark it FAILED,
    named for its entry point (`train failed`) rather than MLflow's random name. A run that already
    ended (the `run` context ends its own on errors) is left as it is."""
    run_id = launched_run_id()
    if not run_id:
        return
    api = client()
    run = api.get_run(run_id)
    if run.info.status != "RUNNING":
        return
    entry = run.data.tags.get("mlflow.project.entryPoint")
    if entry and not run.data.tags.get("mlflow.runName", "").startswith(entry):
        api.set_tag(run_id, "mlflow.runName", f"{entry} failed")
    api.set_tag(run_id, TAG + "error", str(error)[:5000])
    api.log_text(run_id, "\n".join(problems) if problems else str(error), "problems.txt")
    api.set_terminated(run_id, status="FAILED")


def read_artifact_text(run_id: str, path: str) -> str:
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError) as e:
        raise TrackingError(f"run {run_id} has no artifact {path!r} ({e})") from None


def delete_artifacts(run_id: str, paths: list[str]) -> None:
    """Remove some of a run's artifacts (a checkpoint slot, a half-written upload), locally or on the
    server; one already gone is no error."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(get_run(run_id).info.artifact_uri)
    for path in paths:
        with contextlib.suppress(MlflowException, OSError):
            repo.delete_artifacts(path)


UPLOADING = ".artifact.uploading."  # MLflow's hidden name for a file it is still writing


def remove_partial_uploads(run_id: str, folder: str) -> list[str]:
    """Delete what a process killed while writing into a run's local artifacts leaves: MLflow's
    hidden `.artifact.uploading.*` files, which no listing shows (hundreds of MB for a checkpoint).
    Through a server the server writes, and removes its own on a broken upload."""
    parsed = urllib.parse.urlparse(get_run(run_id).info.artifact_uri)
    if parsed.scheme not in ("", "file"):
        return []
    stale = sorted((Path(urllib.parse.unquote(parsed.path)) / folder).glob(UPLOADING + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


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

    def log_metrics(
        self, values: dict[str, float], step: int, model_id: str | None = None, dataset: tuple[str, str] | None = None
    ) -> None:
        """Metrics at `step`; with `model_id`, linked to that LoggedModel (and to the dataset
        (name, digest) they were measured on), so `mlflow.search_logged_models` ranks by them."""
        now = int(1000 * time.time())
        name, digest = dataset or (None, None)
        fresh = [
            Metric(k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for k, v in values.items()
            if step > self.skip.get(k, -1)
        ]
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
        # A local folder resolves to two equivalent source types, and the schema (inferred when the
        # entity is made) hints that integer columns cannot hold missing values: cell counts never miss.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=source, name=name, digest=digest)
            entity = dataset._to_mlflow_entity()
        context_tag = InputTag(key="mlflow.data.context", value=context)  # what mlflow.log_input sets
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [context_tag])])


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
    except TrackingLost:
        stop_trying_the_server()  # the run stays RUNNING on the server until it is resumed
        raise
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


def runs_url(base: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment, in its model-training view. MLflow 3.17's UI
    takes the view from the URL's `workflowType`, else from the browser's local storage
    (`mlflow.workflowType`, GenAI in a fresh profile), not from the experiment's tags: without the
    parameter a fresh browser opens the experiment on its GenAI overview, and its sidebar lacks Models."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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
                name_launched_run(name)
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
        name_launched_run(name)
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


class StepLog:
    """Metrics of many steps of one run (a study's trials, step = trial number) written a batch at
    a time: one store write per MAX metrics or per `every` seconds by `clock`, and on `flush`.
    A write per step cost a 10,000-trial study more than its trials; MLflow's own asynchronous
    queue still writes each call's batch on its own (51 s for 10,000 calls against 3 s batched)."""

    MAX = 1000  # metrics per log_batch, MLflow's limit

    def __init__(self, run_id: str, every: float = 10.0, clock=time.monotonic):
        self.run_id, self.every, self.clock = run_id, every, clock
        self._queued: list[Metric] = []
        self._last = clock()

    def add(self, values: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        self._queued += [Metric(k, float(v), now, step) for k, v in values.items()]
        if self.clock() - self._last >= self.every:
            self.flush()
        elif len(self._queued) >= self.MAX:
            batch, self._queued = self._queued[: self.MAX], self._queued[self.MAX :]
            client().log_batch(self.run_id, metrics=batch)

    def flush(self) -> None:
        queued, self._queued, self._last = self._queued, [], self.clock()
        for start in range(0, len(queued), self.MAX):
            client().log_batch(self.run_id, metrics=queued[start : start + self.MAX])


def log_model(
    artifacts: dict[str, str],
    input_example,
    signature,
    name: str = "model",
    step: int = 0,
    params: dict[str, Any] | None = None,
):
    """Log a version from MODEL_CODE with its config and weights as an MLflow LoggedModel (`name`,
    at `step`, with `params`), then load it back (through the same check as every load) and
    predict once: a model that fails here is marked FAILED and never registered."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        pip_requirements=requirements(),
        signature=signature,
        input_example=input_example,
        step=step,
        params={k: str(v) for k, v in (params or {}).items()},
        model_type="detector",
    )
    try:
        load_pyfunc(info.model_uri).predict(input_example)
    except BaseException:
        client().finalize_logged_model(info.model_id, "FAILED")
        raise
    return info


def _run_models(run_id: str, where: str) -> list:
    """The LoggedModels `run_id` logged that match `where` (a search_logged_models filter)."""
    return mlflow.search_logged_models(
        experiment_ids=[get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND {where}",
        output_format="list",
    )


def delete_logged_models(run_id: str, names: list[str]) -> list[str]:
    """Delete the LoggedModels called one of `names` that `run_id` logged; their ids."""
    if not names:
        return []
    found = _run_models(run_id, "name IN ({})".format(", ".join(f"'{n}'" for n in names)))
    for m in found:
        client().delete_logged_model(m.model_id)
    return [m.model_id for m in found]


def logged_model(run_id: str, name: str) -> str | None:
    """The URI of the READY LoggedModel `name` that `run_id` logged (models:/m-...), or None."""
    found = _run_models(run_id, f"name = '{name}' AND status = 'READY'")
    return f"models:/{found[0].model_id}" if found else None


def version_with_tags(name: str, tags: dict[str, Any]) -> int | None:
    """The oldest version of `name` carrying every tag of `tags`, or None: what makes a registration
    that may be re-run (after a kill) register once."""
    wanted = {k: str(v) for k, v in tags.items()}
    found = [
        int(v.version)
        for v in client().search_model_versions(f"name='{name}'")
        if all(v.tags.get(k) == w for k, w in wanted.items())
    ]
    return min(found) if found else None


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


class LeaseHeld(TrackingError):
    """Another process holds the lease; the message names it and when the lease would lapse."""


LEASES = "brecahad-leases"  # the registered model whose versions are the leases (none is a model), and
# the experiment of the one run they point into: a server accepts a version only with a run's source


class Lease:
    """An exclusive claim on `key` across processes: a run being trained, a model being promoted.

    Beside a local sqlite store, a file lock (freed by the OS when its holder dies). Through a
    tracking server, whose clients may sit on several machines, the one compare-and-set MLflow's
    store guarantees: version numbers of a registered model are assigned in order, once. Each
    claimant adds a version of LEASES tagged with the key; the lowest live one holds the lease, so
    no write latency can let two in (ZooKeeper's lock recipe). A heartbeat thread renews the claim's
    expiry every `ttl / 4` s; a claim not renewed for `ttl` s belongs to a dead process and is
    skipped, as is at once one whose process on this machine is gone. `lost` is set when the claim
    vanishes or the server stops answering for `ttl` s.
    """

    def __init__(self, key: str, ttl: float = 60.0, clock=time.time, poll: float = 1.0):
        self.key, self.ttl, self.clock, self.poll = key, ttl, clock, poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._file: FileLock | None = None
        self._version: str | None = None
        self._beat: threading.Thread | None = None

    def acquire(self, wait: float = 0.0) -> Lease:
        uri = mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///"):
            return self._acquire_file(Path(uri[len("sqlite:///") :]), wait)
        return self._acquire_version(wait)

    def release(self) -> None:
        self._stop.set()
        if self._beat:
            self._beat.join()
        if self._file is not None:
            self._file.release()
        if self._version is not None:
            with contextlib.suppress(MlflowException):
                client().delete_model_version(LEASES, self._version)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- beside a sqlite store ---------------------------------------------------------------

    def _acquire_file(self, db: Path, wait: float) -> Lease:
        path = Path(f"{db}.leases") / (hashlib.sha256(self.key.encode()).hexdigest()[:16] + ".lock")
        path.parent.mkdir(exist_ok=True)
        owner = path.with_suffix(".owner")
        self._file = FileLock(str(path), timeout=wait)
        try:
            self._file.acquire()
        except Timeout:
            held = owner.read_text() if owner.exists() else "another process"
            raise LeaseHeld(f"{self.key} is held by {held} on this machine") from None
        owner.write_text(f"{self.owner} since {time.strftime('%H:%M:%S')}")
        return self

    # --- through a tracking server ----------------------------------------------------------

    def _acquire_version(self, wait: float) -> Lease:
        api = client()
        run_id = _lease_run()
        mine = api.create_model_version(
            LEASES, f"runs:/{run_id}/lease", run_id=run_id, tags=self._tags(), description=self.key
        )
        self._version = str(mine.version)
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.key}", daemon=True)
        self._beat.start()
        deadline = self.clock() + wait
        while True:
            holder = self._holder()
            if holder is None or str(holder.version) == self._version:
                return self
            if self.clock() >= deadline:
                self.release()
                expires = float(holder.tags["lease.expires"]) - self.clock()
                raise LeaseHeld(
                    f"{self.key} is held by {holder.tags['lease.owner']}; if that process died, its lease "
                    f"lapses within {max(expires, 0):.0f} s"
                )
            time.sleep(self.poll)

    def _tags(self) -> dict[str, str]:
        return {"lease.key": self.key, "lease.owner": self.owner, "lease.expires": f"{self.clock() + self.ttl:.3f}"}

    def _holder(self):
        """The lowest live claim on the key; claims that lapsed are removed on the way."""
        api = client()
        claims = [v for v in api.search_model_versions(f"name='{LEASES}'") if v.tags.get("lease.key") == self.key]
        live = []
        for v in sorted(claims, key=lambda v: int(v.version)):
            mine = str(v.version) == self._version
            if mine or (float(v.tags.get("lease.expires", 0)) > self.clock() and _owner_may_live(v.tags)):
                live.append(v)
            else:
                with contextlib.suppress(MlflowException):
                    api.delete_model_version(LEASES, str(v.version))
        return live[0] if live else None

    def _heartbeat(self) -> None:
        last_ok = self.clock()
        while not self._stop.wait(self.ttl / 4):
            try:
                client().set_model_version_tag(LEASES, self._version, "lease.expires", self._tags()["lease.expires"])
                last_ok = self.clock()
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # removed as lapsed: another may hold it now
                    self.lost.set()
                    return
            except Exception:  # the server does not answer
                pass
            if self.clock() - last_ok > self.ttl:
                self.lost.set()
                return


def _owner_may_live(tags: dict[str, str]) -> bool:
    """False only for a claim made on this machine by a process that is gone: a training that lost
    its server exits without reaching it to withdraw its claim, and its own resume must not wait a
    `ttl` for it. Another machine's claim, or a live (or reused) pid, waits for its expiry."""
    host, _, pid = tags.get("lease.owner", "").partition(":")
    pid = pid.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        pass
    return True


def _lease_run() -> str:
    """The run lease versions point into, made with the LEASES model on first use (two processes may
    each make one; either serves)."""
    api = client()
    with contextlib.suppress(MlflowException):
        api.create_registered_model(
            LEASES, description="Leases of brecahad-detection: the lowest live version of a key holds it. No model."
        )
    run_id = api.get_registered_model(LEASES).tags.get("lease_run")
    if run_id is None:
        run_id = api.create_run(use_experiment(LEASES), run_name="leases").info.run_id
        api.set_terminated(run_id, "FINISHED")
        # Two processes on first use may each set it at once; one store write then fails on the
        # tag's key (sqlite's UNIQUE constraint), and whichever tag landed serves both.
        with contextlib.suppress(MlflowException):
            api.set_registered_model_tag(LEASES, "lease_run", run_id)
        run_id = api.get_registered_model(LEASES).tags.get("lease_run", run_id)
    return run_id


@contextlib.contextmanager
def registry_lock(name: str, timeout: float = 1800, ttl: float = 60.0) -> Iterator[Lease]:
    """Hold `name`'s promotion lease while the champion is re-read, compared and the aliases move."""
    with Lease(f"promotion:{name}", ttl=ttl).acquire(wait=timeout) as lease:
        yield lease


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
