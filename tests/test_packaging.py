import dataclasses
import re
import subprocess

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
    assert (ROOT / spec["python_env"]).is_file()
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, entry in spec["entry_points"].items():
        assert entry["command"].startswith(f"python -m detection {name}")
        assert name in commands
        for param in entry["parameters"]:
            assert "{" + param + "}" in entry["command"]


def test_every_command_explains_itself():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        if sub.prog.split()[-1] != name:
            continue  # an alias (check is validate)
        assert len(sub.description or "") > 40, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help"
        assert sub.format_help().startswith("usage: python -m detection " + name)


def _same(declared, default) -> bool:
    """An MLproject default (a string) and an argparse default are the same value."""
    declared, default = str(declared), "" if default is None else str(default)
    try:
        return float(declared) == float(default)
    except ValueError:
        return declared == default


def test_mlproject_parameters_have_the_cli_defaults_and_choices():
    from detection import choices

    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    commands = build_parser()._subparsers._group_actions[0].choices
    checked = 0
    for name, entry in spec["entry_points"].items():
        options = {a.dest: a for a in commands[name]._actions}
        for param, declared in entry["parameters"].items():
            action = options[param]  # every parameter is an option of the command
            if "default" in declared and not action.required and action.default not in ([], None, ""):
                assert _same(declared["default"], action.default), (name, param, declared, action.default)
                checked += 1
            if action.choices and "default" in declared:  # a required choice (import's format) has none
                assert str(declared["default"]) in action.choices, (name, param)
    assert checked >= 30
    # The choices each command offers are choices.py's, not copies.
    assert commands["evaluate"]._option_string_actions["--split"].choices is choices.SPLITS
    assert commands["tune"]._option_string_actions["--objective"].choices is choices.OBJECTIVES


def test_mlproject_offers_what_the_commands_offer_and_requires_nothing_it_defaults():
    """Issue 22: `tune --study` was required on the CLI and defaulted in MLproject, and evaluate and
    predict took `--device` only outside `mlflow run`."""
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    commands = build_parser()._subparsers._group_actions[0].choices
    # The CLI asks which images; `mlflow run` defaults to the demo data `make demo` writes.
    asked = {"data_dir", "out_dir"}
    for name, entry in spec.items():
        options = {a.dest: a for a in commands[name]._actions}
        if "device" in options:
            assert "device" in entry["parameters"], f"MLproject {name} lacks device"
        for param, declared in entry["parameters"].items():
            if "default" in declared and param not in asked:
                assert not options[param].required, f"{name} --{param} is required on the CLI, defaulted in MLproject"


def test_mlproject_comments_list_the_choices_of_choices_py():
    from detection import choices

    listed = {"protocol": choices.PROTOCOLS, "matching": choices.MATCHERS, "split": choices.SPLITS}
    listed |= {"kind": choices.TUNE_KINDS, "objective": choices.OBJECTIVES, "sampler": choices.TUNE_SAMPLERS}
    found = 0
    for line in (ROOT / "MLproject").read_text().splitlines():
        param, _, comment = line.strip().partition(":")
        if param in listed and "#" in line and "|" in line.split("#", 1)[1]:
            named = [w.split()[0] for w in line.split("#", 1)[1].split("|")]
            assert tuple(named) == listed[param], line
            found += 1
    assert found >= 8


def test_request_defaults_are_the_cli_defaults():
    from detection.compare import CompareRequest
    from detection.evaluate import Request
    from detection.promote import PromoteRequest
    from detection.tune import TuneRequest

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, request in (("evaluate", Request), ("tune", TuneRequest), ("promote", PromoteRequest)):
        options = {a.dest: a for a in commands[name]._actions}
        for f in dataclasses.fields(request):
            if f.name in options and f.default is not dataclasses.MISSING:
                default = options[f.name].default
                cli_value = default == "true" if default in ("true", "false") else default
                unset = (None, "", ())  # the CLI's '' is a request's None or (): not given
                same = f.default == cli_value or (f.default in unset and cli_value in unset)
                assert same, (name, f.name, f.default, default)
    compare = {a.dest: a for a in commands["compare"]._actions}
    assert CompareRequest.__dataclass_fields__["protocol"].default == compare["protocol"].default


def test_the_locks_commands_leave_beside_their_stores_are_ignored():
    """Issue 22: mlflow.db.lock, promotion and journal locks showed up in `git status` of the clone."""
    left = ["mlflow.db.lock", "mlflow.db.leases/0123456789abcdef.lock", "mlflow.db.leases/0123456789abcdef.owner"]
    left += ["optuna-journal.log.brecahad.lock", "optuna.db.brecahad.lock"]
    shown = subprocess.run(["git", "check-ignore", "--no-index", "-v", *left], cwd=ROOT, capture_output=True, text=True)
    assert sorted(line.split("\t")[-1] for line in shown.stdout.splitlines()) == sorted(left), shown.stdout
