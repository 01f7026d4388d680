"""The team stack on one machine, to try the team setup and to test against it.

  python -m detection stack up      PostgreSQL and `mlflow server` with logins, artifacts in the folder
  python -m detection stack status  what runs, and the environment a client needs
  python -m detection stack down    stop every process, each by its process group

Everything binds to 127.0.0.1 on free ports and keeps its data in one folder (default `.stack`),
so a `down` then an `up` finds every run, version and artifact again. PostgreSQL checks a password
on every connection (scram-sha-256), local ones too, and holds three databases, each owned by a
role that is no superuser: `mlflow` (runs and registry) and `mlflow_auth` (logins) by `mlflow`,
`optuna` (studies) by `optuna`; clients get the `optuna` role alone. Artifacts live in
`<folder>/artifacts` (mode 0700), reachable only through the server, which checks every login.
Every password is random, in a file of the folder (mode 0600), and is never printed, logged or
passed on a command line. A real deployment uses the lab's PostgreSQL and an S3 store: see the
docs/team.md.
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
SUPERUSER = "postgres"
OWNERS = {"mlflow": "mlflow", "mlflow_auth": "mlflow", "optuna": "optuna"}  # database -> its role
ORDER = ("postgres", "mlflow")  # started in this order, stopped in reverse
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
        """The database's URL for its owning role, without a password (libpq reads PGPASSWORD)."""
        return f"postgresql+psycopg2://{OWNERS[name]}@127.0.0.1:{self.ports['postgres']}/{name}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    @property
    def password_file(self) -> Path:
        return self.dir / "admin-password"

    def secret(self, name: str) -> str:
        """A secret of the stack (the `admin` login, the server's `flask` key, a PostgreSQL role's
        password), made on first use, mode 0600."""
        path = {ADMIN: self.password_file, "flask": self.dir / "flask-secret"}.get(
            name, self.dir / f"{name}-db-password"
        )
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(18))
        return path.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """What a client process needs: the server, its login and the study database (as `optuna`)."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": self.secret(ADMIN),
            "BRECAHAD_OPTUNA_STORAGE": self.database("optuna"),
            "PGPASSWORD": self.secret("optuna"),
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
        _initdb(stack, data)
    port = stack.ports.setdefault("postgres", free_port())
    proc = _spawn(
        stack,
        "postgres",
        _as_postgres([_pg_binary("postgres"), "-D", str(data), "-k", str(data), "-h", "127.0.0.1", "-p", str(port)]),
    )
    _wait(stack, "postgres", proc, lambda: bool(_superuser(stack).close() or True), 60)
    _provision(stack, data)


def _initdb(stack: Stack, data: Path) -> None:
    """A cluster that asks every connection, local ones too, for a password (scram-sha-256)."""
    # Beside the data folder, which initdb wants empty; readable by the postgres user alone, removed at once.
    pwfile = data.parent / ".initdb-password"
    pwfile.write_text(stack.secret(SUPERUSER))
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    try:
        out = subprocess.run(
            _as_postgres(
                [_pg_binary("initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "scram-sha-256", f"--pwfile={pwfile}"]
            ),
            capture_output=True,
            text=True,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if out.returncode:
        raise StackError(f"initdb {data} failed: {out.stderr.strip()[-1000:]}")


def _superuser(stack: Stack):
    import psycopg2

    return psycopg2.connect(
        host="127.0.0.1",
        port=stack.ports["postgres"],
        user=SUPERUSER,
        dbname="postgres",
        password=stack.secret(SUPERUSER),
    )


def _provision(stack: Stack, data: Path) -> None:
    """Every role, database, owner and grant the stack needs, made idempotently: a role per service
    that is no superuser, its databases closed to everyone else. A cluster an earlier release made
    with `trust` gets its passwords and scram-sha-256 here, then reloads."""
    from psycopg2 import sql

    conn = _superuser(stack)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(SUPERUSER)), [stack.secret(SUPERUSER)])
        cur.execute("SELECT rolname FROM pg_roles")
        roles = {row[0] for row in cur.fetchall()}
        for role in sorted(set(OWNERS.values())):
            verb = "ALTER" if role in roles else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %s").format(
                    sql.Identifier(role)
                ),
                [stack.secret(role)],
            )
        cur.execute("SELECT datname FROM pg_database")
        have = {row[0] for row in cur.fetchall()}
        for name, owner in OWNERS.items():
            ident = {"db": sql.Identifier(name), "role": sql.Identifier(owner)}
            if name not in have:
                cur.execute(sql.SQL("CREATE DATABASE {db} OWNER {role}").format(**ident))
            cur.execute(sql.SQL("ALTER DATABASE {db} OWNER TO {role}").format(**ident))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {db} FROM PUBLIC").format(**ident))
            cur.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role}").format(**ident))
        hba = data / "pg_hba.conf"
        if os.access(hba, os.R_OK) and " trust" in hba.read_text():  # made by an earlier release
            hba.write_text(hba.read_text().replace(" trust", " scram-sha-256"))
            cur.execute("SELECT pg_reload_conf()")
    conn.close()
    for name in OWNERS:  # tables an earlier release made as the superuser now belong to the service
        _own_tables(stack, name)


def _own_tables(stack: Stack, name: str) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(
        host="127.0.0.1", port=stack.ports["postgres"], user=SUPERUSER, dbname=name, password=stack.secret(SUPERUSER)
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner <> %s", [OWNERS[name]])
        for (table,) in cur.fetchall():
            cur.execute(
                sql.SQL("ALTER TABLE public.{} OWNER TO {}").format(sql.Identifier(table), sql.Identifier(OWNERS[name]))
            )
        cur.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")
        for (seq,) in cur.fetchall():
            cur.execute(
                sql.SQL("ALTER SEQUENCE public.{} OWNER TO {}").format(
                    sql.Identifier(seq), sql.Identifier(OWNERS[name])
                )
            )
    conn.close()


def server_command(port: int, store: str, artifacts: str, workers: int = 1, logins: bool = False) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`, serving its artifacts (clients upload through it);
    with `logins`, behind MLflow's basic-auth app."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", store, "--artifacts-destination", artifacts, "--workers", str(workers)]
    return command + (["--app-name", "basic-auth"] if logins else [])


def _start_mlflow(stack: Stack) -> None:
    port = stack.ports.setdefault("mlflow", free_port())
    stack.secret(ADMIN)
    stack.artifacts.mkdir(mode=0o700, exist_ok=True)
    stack.artifacts.chmod(0o700)  # no local user but this one reaches them except through the server
    ini = stack.dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {stack.database('mlflow_auth')}\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    command = server_command(port, stack.database("mlflow"), str(stack.artifacts), workers=2, logins=True)
    # Secrets in the environment, never in argv: libpq reads PGPASSWORD, MLflow creates the admin
    # from MLFLOW_AUTH_ADMIN_PASSWORD on its first start.
    env = {
        "PGPASSWORD": stack.secret("mlflow"),
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": stack.secret(ADMIN),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.secret("flask"),
    }
    proc = _spawn(stack, "mlflow", command, env)
    _wait(
        stack,
        "mlflow",
        proc,
        lambda: urllib.request.urlopen(stack.tracking_uri + "/health", timeout=2).status == 200,
        240,
    )


STARTERS = {"postgres": _start_postgres, "mlflow": _start_mlflow}


def up(folder: Path = DEFAULT_DIR) -> Stack:
    """Start what is not running yet; on any failure, stop what this call started."""
    try:
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
        f'export PGPASSWORD="$(cat {stack.dir / "optuna-db-password"})"',
    ]
