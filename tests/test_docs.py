"""The docs as a user meets them (issue 22): README.md a landing page, a site that builds with
`mkdocs build --strict`, a parameters page generated from its sources, and every command in a
bash block of README.md, CONTRIBUTING.md and docs/ one the project accepts as printed."""

import re
import shlex
import subprocess
import sys

import pytest
import yaml

from detection.cli import build_parser
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, list[str]]]:
    """(file, words) of every command line in a bash block: continuations joined, comments and
    the `[optional]` groups of a usage line dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if line.lstrip().startswith("{") or "$(" in line:
                    continue  # a pipeline of shell builtins (tested by test_readme), or a substitution
                words = shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)
                if words:
                    found.append((page.name, words))
    return found


def test_the_readme_is_a_landing_page_that_links_every_docs_page():
    """Before: 867 lines, every topic in one file."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    for entry in nav:
        (page,) = entry.values()
        assert (ROOT / "docs" / page).is_file(), page
        assert page == "index.md" or f"(docs/{page})" in text, f"README.md does not link docs/{page}"


def test_every_documented_command_is_one_the_project_accepts():
    parser = build_parser()
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    checked = 0
    for page, words in commands():
        if words[:3] in (["python", "-m", "detection"], [".venv/bin/python", "-m", "detection"]):
            try:
                parser.parse_args(words[3:])
            except SystemExit:
                pytest.fail(f"{page}: `{shlex.join(words)}` is refused by python -m detection")
            checked += 1
        elif words[:3] == ["mlflow", "run", "."]:
            entry = words[words.index("-e") + 1]
            assert entry in spec, f"{page}: no entry point {entry}"
            given = [words[i + 1].split("=", 1)[0] for i, w in enumerate(words) if w == "-P"]
            unknown = set(given) - set(spec[entry]["parameters"])
            assert not unknown, f"{page}: `mlflow run . -e {entry}` has no parameter {sorted(unknown)}"
            checked += 1
    assert checked >= 20


@pytest.mark.subprocess
def test_the_parameters_page_is_generated_from_mlproject_and_the_config():
    """Before: a hand-written table in README.md, a fourth copy of the defaults."""
    done = subprocess.run(
        [sys.executable, "docs/gen_parameters.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    page = (ROOT / "docs" / "parameters.md").read_text()
    assert "| `heartbeat` | `30` |" in page and "| `model.box_score_thresh` | `0.05` |" in page


@pytest.mark.subprocess
def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="pip install -e '.[docs]' brings mkdocs-material")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (site / "parameters" / "index.html").is_file() and (site / "index.html").is_file()
