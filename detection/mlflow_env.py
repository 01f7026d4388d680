"""Let `mlflow run . -e train` run in the project's venv as typed.

MLflow 3 has no setting for a default `--env-manager`: a project with `conda_env` needs conda, and
one with `python_env` gets MLflow's virtualenv manager, which builds an environment under
MLFLOW_ENV_ROOT (`~/.mlflow/envs`) named for the contents of python_env.yaml, or reuses the one
already there and only sources its `bin/activate`. `make install` puts an activate script at that
name which activates the venv of the project being run (MLflow starts entry points in the
project's folder), so each clone runs its own `.venv`, and a folder without one fails in one line
that says what to do: MLflow marks that run FAILED, none is left RUNNING.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARK = "# brecahad-detection: the project's venv for `mlflow run`"

FIX = "run 'make install' in $PWD, or activate an environment with the project installed and pass --env-manager local"
ACTIVATE = f"""{MARK}
# Written by `python -m detection.mlflow_env` (make install). MLflow's virtualenv manager sources
# this for the project's python_env.yaml, in the folder of the project it runs.
if [ -f "$PWD/.venv/bin/activate" ]; then
  . "$PWD/.venv/bin/activate"
elif python -c "import detection, torch, mlflow" 2>/dev/null; then
  :  # the environment mlflow was started from has the project: run there, as --env-manager local does
else
  echo "mlflow run: $PWD has no .venv and this python lacks the project; {FIX}" >&2
  return 1 2>/dev/null || exit 1
fi
"""


def env_dir(project: Path) -> Path:
    """The folder MLflow's virtualenv manager looks in for this project's python_env.yaml.

    MLflow names it with private helpers; tests/test_mlflow_env.py runs a real `mlflow run`
    through it, so a change in that naming fails there rather than at a user's."""
    from mlflow.utils.environment import _PythonEnv
    from mlflow.utils.virtualenv import _get_mlflow_virtualenv_root, _get_virtualenv_name

    python_env = _PythonEnv.from_yaml(str(project / "python_env.yaml"))
    return Path(_get_mlflow_virtualenv_root()) / _get_virtualenv_name(python_env, project)


def install(project: Path) -> Path:
    """Write the activate script; an environment MLflow built itself at that name is kept."""
    folder = env_dir(project)
    activate = folder / "bin" / "activate"
    if activate.exists() and MARK not in activate.read_text(errors="replace"):
        raise FileExistsError(
            f"{folder} is an environment MLflow built for python_env.yaml; `mlflow run` uses it as it is. "
            "Remove it to run in the project's .venv instead"
        )
    activate.parent.mkdir(parents=True, exist_ok=True)
    activate.write_text(ACTIVATE)
    return folder


def main(argv: list[str] | None = None) -> int:
    project = Path(argv[0] if argv else ".").resolve()
    try:
        folder = install(project)
    except FileExistsError as e:
        print(f"note: {e}", file=sys.stderr)
        return 0
    except OSError as e:
        print(f"error: cannot write MLflow's environment for {project}: {e}", file=sys.stderr)
        return 1
    print(f"`mlflow run . -e ENTRY` runs in the project's .venv (MLflow's environment {folder})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
