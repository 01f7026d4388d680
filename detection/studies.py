"""What every Optuna study of the project shares, whatever its kind: the storage (a journal file
beside mlflow.db, or a database many workers share), the locks that let one worker at a time set
a study up, and what keeps a study going when a worker dies: heartbeats (Optuna's on RDB storages,
ours where Optuna's misses a trial), failing and retrying a dead worker's trial, and running a
worker's trials until none is left that it could take. tune.py holds the two kinds of study."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy
from filelock import FileLock
from optuna.trial import TrialState

from . import tracking
from .choices import TUNE_HEARTBEAT, TUNE_STORAGE
from .config import Config
from .errors import DetectionError
from .progress import Bar

HEARTBEAT_ATTR = "heartbeat"
MAX_RETRIES = 2  # a trial whose worker died is run again at most this often


class TuneError(DetectionError, ValueError):
    """A study that cannot start; raised before any trial runs."""


@dataclass
class Study:
    req: Any  # tune.TuneRequest: the study's request
    study: optuna.Study
    parent: str
    ref: tracking.ModelRef
    config: Config
    model: object  # the source version's torch model
    log: tracking.StepLog | None = None  # the trials' series on the parent run; None: not tracked


# --- storage ----------------------------------------------------------------------------------


def _lock_path(storage: str) -> str | None:
    """Our own lock beside a local storage (not Optuna's `<journal>.lock`, which it takes itself)."""
    if storage.startswith("sqlite:///"):
        return storage[len("sqlite:///") :] + ".brecahad.lock"
    if "://" not in storage:
        return storage + ".brecahad.lock"
    return None


def redact(url: str) -> str:
    """A storage URL fit for tags and messages: any password in it is masked."""
    if "://" not in url:
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("://", 1)[0] + "://***"


@contextlib.contextmanager
def storage_lock(url: str, key: str, timeout: float = 600) -> Iterator[None]:
    """One worker at a time on a storage shared by many. Beside a local storage, a file lock; on
    PostgreSQL, an advisory lock in the database itself, because workers on several machines share
    no file system. Other databases get a lock on this machine only (schema creation is retried)."""
    path = _lock_path(url)
    if path is None and url.startswith("postgresql"):
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sqlalchemy.text(f"SET lock_timeout = '{int(timeout)}s'"))
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
        finally:
            engine.dispose()
    else:
        with FileLock(path or lock_file(url, key), timeout=timeout):
            yield


def lock_file(url: str, key: str) -> str:
    """Where workers on this machine lock a storage that is no local file (MySQL and the like): a
    stable digest of the URL and key, since Python salts str hashes per process (hash() gave each
    worker a file of its own, so the lock held no one back)."""
    digest = hashlib.sha256(f"{url}\n{key}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"brecahad-{digest}.lock")


def study_lock(req) -> contextlib.AbstractContextManager:
    """One worker at a time on this study (`req`: a tune.TuneRequest)."""
    return storage_lock(req.storage_url, f"brecahad-study:{req.study}")


DRIVERS = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL"}
SCHEMA_ATTEMPTS = 3  # workers creating a fresh database's tables together may collide


def default_storage() -> str:
    """A journal file beside the local tracking store (mlflow.db), wherever the command runs: under
    `mlflow run` from a git URL the working directory is a temporary checkout, and a journal there
    would be lost with it. A tracking server has no folder of ours beside it: give a storage."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).resolve().parent / TUNE_STORAGE)
    raise TuneError(
        f"the tracking store is {uri}, not a local file, so there is no folder to keep the study's journal "
        f"beside it: give every worker one Optuna storage with --storage (or BRECAHAD_OPTUNA_STORAGE), "
        f"e.g. postgresql://optuna@db/optuna"
    )


def open_storage(url: str, heartbeat: float | None = TUNE_HEARTBEAT):
    """An Optuna storage: a journal file path (the default, beside mlflow.db) or any RDB URL.
    RDB storages record Optuna's own trial heartbeats (unless `heartbeat` is None) and retry a trial
    whose worker died. Fails before any trial when the storage cannot be reached."""
    try:
        if "://" not in url:
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        return _rdb_storage(url, heartbeat)
    except ImportError as e:  # Optuna wraps the driver's ModuleNotFoundError
        module = e.name or getattr(e.__cause__, "name", None) or url.split(":", 1)[0]
        raise TuneError(
            f"Optuna storage {redact(url)!r} needs the database driver {module!r}, which is not "
            f"installed: pip install {DRIVERS.get(module, module)}"
        ) from None
    except sqlalchemy.exc.OperationalError as e:
        cause = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise TuneError(
            f"Optuna storage {redact(url)!r} cannot be reached: {cause}. Check the host, port, "
            f"database and credentials (PGPASSWORD), or use a journal file path"
        ) from None
    except Exception as e:
        raise TuneError(f"Optuna storage {redact(url)!r} cannot be opened: {type(e).__name__}: {e}") from None


def _rdb_storage(url: str, heartbeat: float | None):
    # Workers opening a fresh database together race to create its tables: one at a time, and
    # on a database without a shared lock, a lost race is retried (the tables exist by then).
    beats = (
        {
            "heartbeat_interval": max(1, round(heartbeat)),
            "grace_period": max(2, round(3 * heartbeat)),
            "heartbeat_stale_trial_callback": retry,
        }
        if heartbeat
        else {}
    )
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            with storage_lock(url, "brecahad-optuna-schema"):
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **beats)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt + 1 == SCHEMA_ATTEMPTS:
                raise
            time.sleep(1 + attempt)


# --- workers that die -------------------------------------------------------------------------


# Queue a dead worker's trial to run again with the same parameters, at most MAX_RETRIES times
# (Optuna's own callback: the retry's system_attrs name the trial it retries).
with warnings.catch_warnings():  # "experimental" since Optuna 2.8, on every import
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def retried_trial(trial: optuna.trial.FrozenTrial) -> int | None:
    """The first trial of the retries this one belongs to, or None."""
    return trial.system_attrs.get("failed_trial")


def _last_beat(trial: optuna.trial.FrozenTrial) -> float:
    # A retry inherits its dead trial's user attributes, its last beat among them: its own start counts.
    return max(trial.user_attrs.get(HEARTBEAT_ATTR, 0.0), trial.datetime_start.timestamp())


def _beating(objective, seconds: float):
    """The objective, with the trial's heartbeat recorded every `seconds` while it runs. Optuna
    beats on RDB storages only; this one serves the journal file and tells any storage's trial ages."""

    def run(trial: optuna.Trial):
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
                stop.wait(seconds)

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            return objective(trial)
        finally:
            stop.set()
            thread.join()

    return run


def fail_stale(s: Study, now: Callable[[], float] = time.time) -> list[str]:
    """Fail the running trials whose worker died (no heartbeat for `stale_after` by the clock `now`),
    queue each again, and end its nested MLflow run KILLED. Returns one line per failed trial."""
    study = s.study
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # Optuna's heartbeat, on RDB storages; it calls `retry`
    # Optuna's RDB heartbeat skips a trial that has no heartbeat row yet: a worker killed between
    # creating its trial and its first beat would leave it RUNNING for ever. Our own beat (or the
    # trial's start) covers that window and the journal file, which has no Optuna heartbeat.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now() - _last_beat(t) > s.req.stale_after:
            # Another worker may fail (or finish) it first: Optuna refuses to tell a finished trial.
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, ValueError):
                retry(study, study.tell(t.number, state=TrialState.FAIL))
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running]
    lines = []
    for t in dead:
        tracking.end_child_runs(s.parent, f"trial {t.number}", "KILLED")
        lines.append(
            f"failed trial {t.number}: no heartbeat for more than {s.req.stale_after:g} s, so its worker "
            f"died; it is queued to run again"
        )
    return lines


def settle(s: Study) -> list[str]:
    """Before deciding whether the study is done: wait while another worker's running trial has
    missed a heartbeat, until it beats again (that worker lives) or goes stale (it died)."""
    lines: list[str] = []
    deadline = time.monotonic() + s.req.stale_after + s.req.heartbeat
    while True:
        lines += fail_stale(s)
        running = s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        alive = all(time.time() - _last_beat(t) < 1.5 * s.req.heartbeat for t in running)
        if not running or alive or time.monotonic() > deadline:
            return lines
        time.sleep(min(s.req.heartbeat, 2.0))


def _optimize(s: Study, objective, n_trials: int) -> None:
    with Bar(n_trials, f"study {s.req.study}", every=max(1, n_trials // 10)) as bar:
        s.study.optimize(
            objective,
            n_trials=n_trials,
            catch=(),
            callbacks=[lambda study, trial: bar.advance(trial=trial.number)],
        )
    if s.log is not None:
        s.log.flush()


def run(s: Study, objective, beat: bool = True) -> list[str]:
    """This worker's trials, then the retries of trials whose worker died, until none is left
    that this worker could take; returns what it found of dead workers. With `beat`, each trial
    records a heartbeat while it runs; trials that last milliseconds need none (a trial still
    running long after its start belongs to a dead worker) and would pay a thread and a storage
    write each."""
    objective = _beating(objective, s.req.heartbeat) if beat else objective
    lines = fail_stale(s)
    _optimize(s, objective, s.req.n_trials)
    lines += settle(s)
    while queued := len(s.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
        _optimize(s, objective, queued)
        lines += settle(s)
    return lines
