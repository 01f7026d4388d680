"""The team stack on one machine, to try the team setup and to test against it.

  python -m detection stack up      PostgreSQL, an S3 object store (moto) and `mlflow server` with logins
  python -m detection stack status  what runs, and the environment a client needs
  python -m detection stack down    stop every process, each by its process group

Everything binds to 127.0.0.1 on free ports and keeps its data in one folder (default `.stack`).
PostgreSQL holds three databases: `mlflow` (runs and registry), `mlflow_auth` (logins) and
`optuna` (studies). The admin password is random, in `<folder>/admin-password` (mode 0600); it is
never printed, logged or passed on a command line. A real deployment replaces moto with any S3
endpoint and this folder's PostgreSQL with the lab's: see the README's "Team setup".
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .tracking import TrackingError

DEFAULT_DIR = Path(".stack")
ADMIN = "admin"
BUCKET = "mlflow"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
ORDER = ("postgres", "s3", "mlflow")  # started in this order, stopped in reverse
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TEAM_EXTRA = "pip install -e '.[team]'"


class StackError(TrackingError):
    """The stack cannot start or stop; the message names the service and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)  # each the leader of its own process group

    # --- what clients use -----------------------------------------------------------------------
    def database(self, name: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.ports['postgres']}/{name}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def password_file(self) -> Path:
        return self.dir / "admin-password"

    def client_env(self) -> dict[str, str]:
        """What a client process needs: the server, its login and the study database."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.password_file.read_text().strip(),
            "BRECAHAD_OPTUNA_STORAGE": self.database("optuna"),
        }

    # --- state ------------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"ports": self.ports, "pids": self.pids}
        (self.dir / "stack.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, folder: Path) -> Stack | None:
        path = Path(folder) / "stack.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return cls(Path(folder).resolve(), state["ports"], state["pids"])

    def alive(self) -> dict[str, bool]:
        return {name: _group_alive(pid) for name, pid in self.pids.items()}

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # a leader this process started: reap it once it exits
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _spawn(stack: Stack, service: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a service in its own session, so that `down` stops it and every child by one signal."""
    with open(stack.log(service), "ab") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=os.environ | (env or {}),
            start_new_session=True,
            cwd=stack.dir,
        )
    stack.pids[service] = proc.pid
    stack.save()
    return proc


def _wait(stack: Stack, service: str, proc: subprocess.Popen, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if ready():
                return
        except Exception:  # not answering yet
            pass
        time.sleep(0.3)
    tail = stack.log(service).read_text(errors="replace")[-1500:] if stack.log(service).exists() else ""
    raise StackError(f"{service} did not come up within {timeout:.0f} s; its log {stack.log(service)} ends:\n{tail}")


# --- the services ----------------------------------------------------------------------------------


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None
    )
    if not found:
        raise StackError(f"PostgreSQL's {name} is not installed: apt-get install -y postgresql")
    return found


def _start_postgres(stack: Stack) -> None:
    data = stack.dir / "postgres"
    if os.geteuid() == 0:
        data.mkdir(exist_ok=True)
        shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        if subprocess.run(_as_postgres(["test", "-w", str(data)])).returncode:
            raise StackError(
                f"the postgres user cannot reach {data}; choose a stack folder whose parents it may "
                f"enter (e.g. under /tmp or the repository), with --dir"
            )
    if not (data / "PG_VERSION").exists():
        out = subprocess.run(
            _as_postgres([_pg_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise StackError(f"initdb {data} failed: {out.stderr.strip()[-1000:]}")
    port = stack.ports.setdefault("postgres", free_port())
    proc = _spawn(
        stack,
        "postgres",
        _as_postgres([_pg_binary("postgres"), "-D", str(data), "-k", str(data), "-h", "127.0.0.1", "-p", str(port)]),
    )
    import psycopg2

    def ready() -> bool:
        psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
        return True

    _wait(stack, "postgres", proc, ready, 60)
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        have = {row[0] for row in cur.fetchall()}
        for name in DATABASES:
            if name not in have:
                cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def _start_s3(stack: Stack) -> None:
    port = stack.ports.setdefault("s3", free_port())
    proc = _spawn(stack, "s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], S3_KEYS)
    _wait(stack, "s3", proc, lambda: urllib.request.urlopen(stack.s3_endpoint, timeout=2).status == 200, 60)
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_KEYS["AWS_DEFAULT_REGION"],
    )
    if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=BUCKET)


def _start_mlflow(stack: Stack) -> None:
    port = stack.ports.setdefault("mlflow", free_port())
    for secret in (stack.password_file, stack.dir / "flask-secret"):
        if not secret.exists():
            secret.touch(mode=0o600)
            secret.write_text(secrets.token_urlsafe(18))
    ini = stack.dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {stack.database('mlflow_auth')}\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        stack.database("mlflow"),
        "--artifacts-destination",
        f"s3://{BUCKET}/artifacts",
        "--app-name",
        "basic-auth",
        "--workers",
        "2",
    ]
    # The first start creates the admin from MLFLOW_AUTH_ADMIN_PASSWORD: in the environment, not argv.
    env = S3_KEYS | {
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack.password_file.read_text().strip(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": (stack.dir / "flask-secret").read_text().strip(),
    }
    proc = _spawn(stack, "mlflow", command, env)
    _wait(
        stack,
        "mlflow",
        proc,
        lambda: urllib.request.urlopen(stack.tracking_uri + "/health", timeout=2).status == 200,
        240,
    )


STARTERS = {"postgres": _start_postgres, "s3": _start_s3, "mlflow": _start_mlflow}


def up(folder: Path = DEFAULT_DIR) -> Stack:
    """Start what is not running yet; on any failure, stop what this call started."""
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as e:
        raise StackError(f"the team stack needs {e.name}, which is not installed: {TEAM_EXTRA}") from None
    folder = Path(folder).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack.load(folder) or Stack(folder)
    alive = stack.alive()
    for service in ORDER:
        if alive.get(service):
            continue
        try:
            STARTERS[service](stack)
        except BaseException:
            down(folder)
            raise
    stack.save()
    return stack


def down(folder: Path = DEFAULT_DIR, timeout: float = 30) -> list[str]:
    """Stop every service by its process group (PostgreSQL with SIGINT: a fast, clean shutdown)."""
    stack = Stack.load(folder)
    if stack is None:
        return []
    stopped = []
    for service in reversed(ORDER):
        pgid = stack.pids.get(service)
        if pgid is None or not _group_alive(pgid):
            continue
        os.killpg(pgid, signal.SIGINT if service == "postgres" else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        stopped.append(service)
    stack.pids = {}
    stack.save()
    return stopped


def status(folder: Path = DEFAULT_DIR) -> list[str]:
    stack = Stack.load(folder)
    if stack is None:
        return [f"no stack in {Path(folder).resolve()}: python -m detection stack up --dir {folder}"]
    alive = stack.alive()
    lines = [f"{s:8} {'up' if alive.get(s) else 'down':5} port {stack.ports.get(s, '-')}" for s in ORDER]
    if all(alive.get(s) for s in ORDER):
        lines += ["", "clients use (the password is read from the file, never printed):", *exports(stack)]
    return lines


def exports(stack: Stack) -> list[str]:
    return [
        f"export MLFLOW_TRACKING_URI={stack.tracking_uri}",
        f"export MLFLOW_TRACKING_USERNAME={ADMIN}",
        f'export MLFLOW_TRACKING_PASSWORD="$(cat {stack.password_file})"',
        f"export BRECAHAD_OPTUNA_STORAGE={stack.database('optuna')}",
    ]
