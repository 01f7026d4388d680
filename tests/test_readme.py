"""README.md's and the serving page's commands as printed (issue 22): what a new user types is what
is tested."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE, need_shared, serving

README = ROOT / "README.md"
SERVING = ROOT / "docs" / "serving.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def block_with(needle: str, page: Path = README) -> str:
    found = [b for b in bash_blocks(page.read_text()) if needle in b]
    assert len(found) == 1, f"{page.name} has {len(found)} bash blocks with {needle!r}"
    return found[0]


def test_every_mlflow_run_line_is_typed_bare():
    """Before: the validate, download, cv, second-look and compare lines had no `--env-manager local`
    and failed with "Could not find Conda executable", leaving a RUNNING run. Now `mlflow run . -e
    ENTRY` runs in the venv as typed (tests/test_mlflow_env.py runs it), so no line needs the flag."""
    files = [README, ROOT / "Makefile", *sorted((ROOT / "docs").glob("**/*.md"))]
    lines = 0
    for path in files:
        for line in path.read_text().splitlines():
            for name, rest in re.findall(r"mlflow run \. -e ([\w-]+)(.*)", line):
                assert "--env-manager" not in rest, f"{path.name}: `mlflow run . -e {name}{rest[:40]}`"
                lines += 1
    assert lines >= 10


@pytest.mark.slow  # a model server starts and runs a whole image
def test_the_readmes_serving_commands_work_as_printed(trained_copy, tmp_path):
    """Before: the README's `curl -d "$(base64 -w0 image.tif)"` failed with "Argument list too long"
    for every real 1360×1024 image."""
    from mlflow.tracking import MlflowClient

    image = need_shared(SAMPLE) / "images" / "Case_101-01.tif"  # a real 1360×1024 field
    work = tmp_path / "work"
    (work / "data" / "demo" / "images").mkdir(parents=True)
    shutil.copy(image, work / "image.tif")  # the serving page's own image
    shutil.copy(image, work / "data" / "demo" / "images" / "Case_1-01.tif")  # README's: a demo image's path
    (work / ".venv").symlink_to(Path(sys.prefix))  # the commands start in the clone
    client = MlflowClient(tracking_uri=trained_copy)
    champion = client.get_model_version_by_alias("brecahad-faster-rcnn", "challenger").version
    client.set_registered_model_alias("brecahad-faster-rcnn", "champion", champion)  # as promote would
    serve = block_with("source .venv/bin/activate\npython -m detection serve --model")
    assert serve == block_with("source .venv/bin/activate\npython -m detection serve --model", SERVING)
    assert "curl" not in serve  # the server holds its terminal; the request is sent from another
    requests = [block_with("--data-binary @-", page) for page in (README, SERVING)]
    with serving(["bash", "-c", serve], "http://127.0.0.1:5001/ping", work, timeout=300):
        for request in requests:
            (work / "detections.json").unlink(missing_ok=True)
            sent = subprocess.run(["bash", "-e", "-c", request], cwd=work, capture_output=True, text=True, timeout=300)
            assert sent.returncode == 0, sent.stderr
            rows = json.loads((work / "detections.json").read_text())["predictions"]
            assert isinstance(rows, list)  # an error would be {"error_code": ..., "message": ...}
            for r in rows:
                assert {"image", "x1", "y1", "x2", "y2", "score", "cx", "cy"} <= set(r)
                assert r["image"] == 0 and 0 <= r["cx"] <= 1360 and 0 <= r["cy"] <= 1024
