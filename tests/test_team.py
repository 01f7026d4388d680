"""The team stack, for real: PostgreSQL (a password on every connection, a role per service) and
`mlflow server` with logins and artifacts in the stack's folder, started by `python -m detection
stack` on 127.0.0.1; tune workers that start together and die; a restart that keeps everything;
and the S3 code path against moto. Marked slow; skipped where PostgreSQL or the team extra is missing."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMOKE, free_port, model_server, point_mlflow_at, post_json, run_cli, serving, tiny_args

pytestmark = pytest.mark.slow
for module in ("psycopg2", "boto3"):
    pytest.importorskip(module, reason="the team extra is not installed: pip install -e '.[team]'")
if not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
    pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)", allow_module_level=True)

from detection import stack as stack_mod  # noqa: E402

MODEL = "brecahad-faster-rcnn"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def stack():
    # Not pytest's tmp_path: its parents are closed to the postgres user that runs the server.
    folder = Path(tempfile.mkdtemp(prefix="brecahad-stack-"))
    folder.chmod(0o755)
    start = time.monotonic()
    up = stack_mod.up(folder)
    print(f"stack up in {time.monotonic() - start:.1f} s")
    try:
        yield up
    finally:
        assert set(stack_mod.down(folder)) == set(stack_mod.ORDER)
        assert not any(up.alive().values())
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def team(stack, tmp_path, monkeypatch):
    """This test's process and its children talk to the stack's server with the admin login."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    point_mlflow_at(stack.tracking_uri, monkeypatch, stack.client_env())
    return workdir


def _database(stack, name):
    """A fresh study database owned by the clients' role (`optuna`), and its URL."""
    conn = stack_mod._superuser(stack)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}" OWNER optuna')
    conn.close()
    return stack.database("optuna").rsplit("/", 1)[0] + f"/{name}"


FIRST_USE = """
import sys, time, optuna
from detection.studies import open_storage
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0, at - time.time()))  # both workers past their imports, then go together
storage = open_storage(url)
optuna.create_study(study_name="first-use", storage=storage, load_if_exists=True)
"""


def test_workers_starting_together_on_a_fresh_postgresql_database_all_succeed(stack):
    for attempt in range(4):  # the race is intermittent: it failed 2 of 3 tries before the lock
        url = _database(stack, f"race_{attempt}")
        at = time.time() + 8
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", FIRST_USE, url, str(at)],
                env=dict(os.environ) | {"PGPASSWORD": stack.secret("optuna")},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for w in workers:
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, f"attempt {attempt}: {err[-2000:]}"
        assert len(optuna.get_all_study_summaries(url.replace("optuna@", f"optuna:{stack.secret('optuna')}@"))) == 1


def _runs(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _artifact_files(stack):
    return [p for p in stack.artifacts.rglob("*") if p.is_file()]


def _tune_worker(workdir, synth_dir, storage, n_trials):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detection",
            "tune",
            "--model",
            f"models:/{MODEL}/1",
            "--data-dir",
            str(synth_dir),
            "--study",
            "team",
            "--n-trials",
            str(n_trials),
            "--storage",
            storage,
            "--heartbeat",
            "1",
        ],
        cwd=workdir,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_a_team_works_through_the_stack(stack, team, synth_dir, tmp_path):
    start = time.monotonic()
    password = os.environ["MLFLOW_TRACKING_PASSWORD"]
    client = MlflowClient()
    outputs = []

    def cli(*args):
        result = run_cli(*args, cwd=team, fresh=True)  # its output is checked for the password
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    cli(*tiny_args(synth_dir))
    cli("evaluate", "--model", f"models:/{MODEL}/1", "--data-dir", str(synth_dir))

    # Two tune workers start together on a fresh PostgreSQL study database; one dies mid-study.
    storage = _database(stack, "optuna_team")
    doomed, survivor = _tune_worker(team, synth_dir, storage, 10_000), _tune_worker(team, synth_dir, storage, 30)
    try:
        # Through the project's storage: a plain RDBStorage here would race the workers' table creation.
        from detection.studies import open_storage

        watch = open_storage(storage)
        deadline = time.monotonic() + 600
        while True:
            assert doomed.poll() is None and time.monotonic() < deadline, doomed.communicate()[1][-3000:]
            try:
                if len(optuna.load_study(study_name="team", storage=watch).trials) >= 5:
                    break
            except KeyError:
                pass
            time.sleep(0.5)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        out, err = survivor.communicate(timeout=900)
    finally:  # a failed test leaves no worker writing into the next one
        for worker in (doomed, survivor):
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    outputs.append(out + err)
    assert survivor.returncode == 0, err[-3000:]
    assert "registered version" in out
    study = optuna.load_study(study_name="team", storage=watch)
    assert not [
        t for t in study.trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    ]
    tuned = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(tuned.version) != "1" and study.user_attrs["mlflow_run_id"]

    cli("promote", "--candidate", f"models:/{MODEL}/{tuned.version}", "--data-dir", str(synth_dir))
    champion = client.get_model_version_by_alias(MODEL, "champion")

    # The champion served straight from the registry, through the server's login.
    with model_server(f"models:/{MODEL}@champion", team) as url:
        from detection.data import load_dataset
        from detection.predict import encode_png

        image = load_dataset(synth_dir)[0].read_image()
        status, body = post_json(
            url,
            {"dataframe_split": {"columns": ["image"], "data": [[encode_png(image)]]}},
        )
        assert status == 200 and "predictions" in body

    # Artifacts are in the stack's folder, through the server: none in the client's folder.
    files = _artifact_files(stack)
    run_id = client.get_model_version(MODEL, "1").run_id
    assert any(str(p).endswith(f"{run_id}/artifacts/checkpoints/latest.json") for p in files)
    assert any(p.name == "MLmodel" for p in files)
    assert not list(team.rglob("mlruns")) and not list(team.rglob("*.db"))
    # No run is left RUNNING; one champion.
    runs = _runs(client)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED", "FAILED"}, [
        (r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"
    ]
    champions = [
        (m.name, client.get_registered_model(m.name).aliases.get("champion")) for m in client.search_registered_models()
    ]
    assert [c for c in champions if c[1]] == [(MODEL, champion.version)]
    # The password is nowhere: not in params, tags, artifacts or anything printed.
    for r in runs:
        assert password not in repr(r.data.params) + repr(r.data.tags)
    for path in files:
        assert password.encode() not in path.read_bytes(), path
    assert not [o for o in outputs if password in o]
    print(f"team end-to-end: {time.monotonic() - start:.0f} s, {len(runs)} runs, {len(files)} artifact files")

    # Issue 21: `stack down` then `stack up` lost every artifact (moto kept them in memory).
    from detection import tracking

    stack_mod.down(stack.dir)
    restarted = time.monotonic()
    stack_mod.up(stack.dir)
    print(f"stack up again in {time.monotonic() - restarted:.1f} s")
    for version in client.search_model_versions(f"name='{MODEL}'"):
        assert tracking.load_model(tracking.resolve_model(f"models:/{MODEL}/{version.version}")).config


def test_team_misconfigurations_fail_before_any_work_with_the_cause(stack, team, synth_dir, monkeypatch):
    client = MlflowClient()
    before = len(_runs(client))

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    wrong = run_cli("train", "--config", SMOKE, "--data-dir", str(synth_dir), cwd=team, fresh=True)
    assert wrong.returncode == 2 and "refused the login (HTTP 401)" in wrong.stderr.strip().splitlines()[-1]
    assert "not-the-password" not in wrong.stderr + wrong.stdout
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.client_env()["MLFLOW_TRACKING_PASSWORD"])

    dead_db = f"postgresql+psycopg2://postgres:secret-pw@127.0.0.1:{free_port()}/optuna"
    unreachable = run_cli(
        "tune",
        "--model",
        f"models:/{MODEL}@challenger",
        "--data-dir",
        str(synth_dir),
        "--study",
        "never",
        "--storage",
        dead_db,
        cwd=team,
        fresh=True,  # all it prints, MLflow's and the driver's logging too, is checked for the password
    )
    last = unreachable.stderr.strip().splitlines()[-1]
    assert unreachable.returncode == 2 and "cannot be reached" in last and "Connection refused" in last
    assert "secret-pw" not in unreachable.stderr

    # A server whose S3 endpoint is wrong: found before any epoch, not after an epoch's work.
    port = free_port()
    command = stack_mod.server_command(port, stack.database("mlflow"), "s3://mlflow/artifacts", logins=True)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(stack.dir / "basic_auth.ini"))
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", stack.secret("flask"))
    monkeypatch.setenv("PGPASSWORD", stack.secret("mlflow"))  # the server's role, read by libpq
    for k, v in S3_KEYS.items():
        monkeypatch.setenv(k, v)
    with serving(command, f"http://127.0.0.1:{port}/health", team):
        bad_s3 = run_cli(
            "train",
            "--config",
            SMOKE,
            "--data-dir",
            str(synth_dir),
            cwd=team,
            env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
            fresh=True,
        )
    assert bad_s3.returncode == 2 and "cannot reach its artifact store" in bad_s3.stderr.strip().splitlines()[-1]
    assert len(_runs(client)) == before


def test_postgresql_asks_everyone_for_a_password_and_clients_get_no_superuser(stack):
    """Issue 21: `trust` let any local user (`nobody` too) in as the superuser, make a user an admin in
    mlflow_auth and run programs as postgres (COPY ... TO PROGRAM); clients were handed that superuser."""
    import psycopg2

    port = stack.ports["postgres"]
    as_nobody = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    for database in ("mlflow_auth", "postgres"):
        refused = subprocess.run(
            [*as_nobody, stack_mod._pg_binary("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
            + ["-d", database, "-w", "-c", "SELECT 1"],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"]},
        )
        assert refused.returncode != 0 and "password" in refused.stderr, refused.stderr
    client = stack.client_env()
    assert "postgres@" not in client["BRECAHAD_OPTUNA_STORAGE"]  # the study URL is the optuna role's
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="optuna", dbname="optuna", password=client["PGPASSWORD"])
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("COPY (SELECT 1) TO PROGRAM 'true'")
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        psycopg2.connect(
            host="127.0.0.1", port=port, user="optuna", dbname="mlflow_auth", password=client["PGPASSWORD"]
        )
    for secret in stack.dir.glob("*password*"):
        assert secret.stat().st_mode & 0o077 == 0, secret
    assert stack.artifacts.stat().st_mode & 0o077 == 0  # reached only through the server's logins
    if as_nobody:
        assert subprocess.run([*as_nobody, "ls", str(stack.artifacts)], capture_output=True).returncode != 0


@pytest.mark.subprocess
def test_the_s3_artifact_path_against_moto(tmp_path, synth_dir):
    """A server whose artifacts go to S3 (a lab's deployment): moto stands in for S3 here only."""
    pytest.importorskip("moto", reason="moto is in the test extra: pip install -e '.[test]'")
    import boto3

    from detection import tracking

    s3_port, port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = dict(os.environ) | S3_KEYS | {"MLFLOW_S3_ENDPOINT_URL": endpoint}
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)]
    server = stack_mod.server_command(port, f"sqlite:///{tmp_path / 'server.db'}", "s3://lab/artifacts")
    old = dict(os.environ)
    os.environ.update(S3_KEYS | {"MLFLOW_S3_ENDPOINT_URL": endpoint})
    try:
        with serving(moto, endpoint, tmp_path):
            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket="lab")
            with serving(server, f"http://127.0.0.1:{port}/health", tmp_path, timeout=180):
                uri = f"http://127.0.0.1:{port}"
                env |= {"MLFLOW_TRACKING_URI": uri}
                trained = run_cli(*tiny_args(synth_dir), cwd=tmp_path, env=env, fresh=True)
                assert trained.returncode == 0, trained.stderr[-3000:]
                keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lab").get("Contents", [])]
                assert any(k.endswith("checkpoints/latest.json") for k in keys) and any("MLmodel" in k for k in keys)
                os.environ["MLFLOW_TRACKING_URI"] = uri
                mlflow.set_tracking_uri(uri)
                assert tracking.load_model(tracking.resolve_model(f"models:/{MODEL}@challenger")).config
    finally:
        os.environ.clear()
        os.environ.update(old)
