import re

import yaml

from detection.cli import build_parser
from tests.conftest import ROOT


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_conda_env_and_pyproject_list_the_same_packages():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip = next(d["pip"] for d in conda if isinstance(d, dict))
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(project)
    assert _names(project) >= {"torch", "torchvision", "mlflow", "optuna", "tifffile", "numpy", "matplotlib", "rich"}


def test_mlproject_entry_points_match_the_cli():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert (ROOT / spec["conda_env"]).is_file()
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, entry in spec["entry_points"].items():
        assert entry["command"].startswith(f"python -m detection {name}")
        assert name in commands
        for param in entry["parameters"]:
            assert "{" + param + "}" in entry["command"]


def test_every_command_explains_itself():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        assert len(sub.description or "") > 40, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help"
        assert sub.format_help().startswith("usage: python -m detection " + name)
