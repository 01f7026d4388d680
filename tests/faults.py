"""Kill a command at a chosen call: `python -m detection ...` runs in a child that wraps one function
(a module's or a class's attribute) so that the process dies, as a SIGKILL would leave it, right
before or after that function's n-th call. What the kill leaves behind is then what a test inspects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

KILLED = 137  # the exit status of a process killed by SIGKILL

_CHILD = textwrap.dedent(
    """
    import importlib, os, sys

    target, when, nth, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    module_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a class's attribute: module.Class.attr
        module_name, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), cls)
    original, calls = getattr(owner, attr), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if when == "before" and calls[0] == nth:
            os._exit({killed})
        result = original(*a, **k)
        if when == "after" and calls[0] == nth:
            os._exit({killed})
        return result

    setattr(owner, attr, wrapped)
    from detection.cli import main

    sys.exit(main(args))
    """
).replace("{killed}", str(KILLED))


def run_killed_at(
    target: str, args: list[str], cwd: Path, env: dict | None = None, when: str = "after", nth: int = 1
) -> subprocess.CompletedProcess:
    """`python -m detection ARGS`, killed right `when` ('before' or 'after') the `nth` call of
    `target` (e.g. 'detection.tracking.register', 'mlflow.tracking.MlflowClient.set_registered_model_alias')."""
    full_env = dict(os.environ) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"} | (env or {})
    return subprocess.run(
        [sys.executable, "-c", _CHILD, target, when, str(nth), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
