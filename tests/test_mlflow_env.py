"""`mlflow run . -e ENTRY` as typed, in the project's venv (issue 22, finding 3): a real `mlflow run`
with nothing of the venv on PATH, through the activate script `make install` writes."""

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from detection import mlflow_env
from tests.conftest import ROOT, SAMPLE, need_shared

pytestmark = pytest.mark.slow  # two real `mlflow run`s, a few seconds each


def bare_mlflow_run(project: Path, tmp_path: Path, *params: str) -> subprocess.CompletedProcess:
    """What a user types, from a shell where neither the venv nor conda is active."""
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    args = [str(mlflow_bin), "run", ".", "-e", "validate", *params]
    return subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=300)


def launched_runs(tmp_path: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.fixture
def env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENV_ROOT", str(tmp_path / "envs"))
    return tmp_path / "envs"


@pytest.mark.subprocess
def test_a_bare_mlflow_run_runs_in_the_projects_venv(tmp_path, env_root):
    """Before: "Could not find Conda executable", and the run MLflow made stayed RUNNING."""
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip(f"{ROOT}/.venv is made by `make install`; these tests ran from another environment")
    sample = need_shared(SAMPLE)
    folder = mlflow_env.install(ROOT)
    assert folder.parent == env_root
    done = bare_mlflow_run(ROOT, tmp_path, "-P", f"data_dir={sample}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{sample}: valid" in done.stdout  # the system python has no torch: the venv ran it
    (run,) = launched_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.runName"] == "validate"  # not MLflow's random name
    assert run.data.tags["mlflow.project.env"] == "virtualenv"


@pytest.mark.subprocess
def test_a_folder_without_a_venv_fails_in_one_line_and_leaves_no_running_run(tmp_path, env_root):
    project = tmp_path / "clone"
    project.mkdir()
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(ROOT / name, project / name)
    mlflow_env.install(project)
    done = bare_mlflow_run(project, tmp_path)
    assert done.returncode != 0
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("mlflow run:")]
    assert f"{project} has no .venv" in line and "make install" in line
    (run,) = launched_runs(tmp_path)
    assert run.info.status == "FAILED"


def test_an_environment_mlflow_built_itself_is_kept(env_root):
    folder = mlflow_env.env_dir(ROOT)
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "activate").write_text("# made by virtualenv\n")
    with pytest.raises(FileExistsError, match="Remove it"):
        mlflow_env.install(ROOT)
    assert (folder / "bin" / "activate").read_text() == "# made by virtualenv\n"
