"""The MLflow UI in a real browser (headless Chromium through Playwright, a fresh profile each
time): what a user sees first when opening the link the project prints."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, free_port, serving

sys.path.insert(0, str(ROOT / "docs"))
import screenshots  # noqa: E402  (docs/screenshots.py: the docs' pictures are made the same way)

pytestmark = pytest.mark.slow

GENAI = ("Overview", "Usage", "Detect Issues", "Training runs")  # what MLflow 3.17 opens for a fresh profile


@pytest.mark.subprocess
def test_the_printed_link_opens_the_runs_table_and_the_model_page_shows_the_champion(trained, trained_copy, tmp_path):
    """Issue 22: clicking the experiment in a fresh profile opened MLflow's GenAI overview, whose
    sidebar has no Models link; screenshots.py clicked the "Model training" toggle itself."""
    if not Path(screenshots.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {screenshots.CHROMIUM}: apt-get install -y chromium (.ci/run installs it)")
    pytest.importorskip("playwright", reason="pip install -e '.[docs]' brings Playwright")
    # The session's tiny training, what it printed, and a copy of its store to set a champion in.
    printed_link = "Start the UI with `python -m detection ui` and open http://127.0.0.1:5000/#/experiments/"
    assert printed_link in trained["stdout"]
    store = tmp_path  # `python -m detection ui` serves the mlflow.db of its working directory: the copy
    client = MlflowClient()
    client.set_registered_model_alias("brecahad-faster-rcnn", "champion", "1")
    experiment = client.get_experiment_by_name("brecahad").experiment_id
    # What a user sees after one training: the copy forgets the runs other tests added to the session's store.
    training = client.get_model_version("brecahad-faster-rcnn", "1").run_id
    for run in client.search_runs([experiment], max_results=5000):
        if run.info.run_id != training:
            client.delete_run(run.info.run_id)
    port = free_port()
    command = [sys.executable, "-m", "detection", "ui", "--port", str(port)]  # what `make ui` runs
    base = f"http://127.0.0.1:{port}"
    printed = store / "ui.out"
    with printed.open("w") as out, serving(command, f"{base}/health", store, stdout=out):
        url = re.search(r"open (\S+)", printed.read_text()).group(1)
        assert url == f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        with screenshots.browser() as page:  # a fresh profile: nothing chosen, nothing remembered
            first = screenshots.shot(page, url, "train smoke", store / "first-look.png", assistant=True)
            sidebar = page.get_by_role("link", name="Models", exact=True)
            assert sidebar.count() >= 1 and "Runs" in first and "train smoke" in first
            assert not [w for w in GENAI if w in first], first[:600]
        with screenshots.browser() as page:  # the bare experiment URL: why the parameter is printed
            plain = screenshots.shot(page, f"{base}/#/experiments/{experiment}", "Overview", None, assistant=True)
            assert "Overview" in plain and page.get_by_role("link", name="Models", exact=True).count() == 0
        with screenshots.browser() as page:
            versions = screenshots.shot(page, f"{base}/#/models/brecahad-faster-rcnn", "champion", None)
            assert "Version 1" in versions and "champion" in versions
        with screenshots.browser() as page:  # issue 26: the version's page shows its card and its logged model
            url = f"{base}/#/models/brecahad-faster-rcnn/versions/1?workflowType=machine_learning"
            card = screenshots.shot(page, url, "Intended use", store / "card.png")
            for heading in ("Data and split", "Metrics", "Operating point", "Known limits", "Lineage"):
                assert heading in card
            source = page.get_by_role("link", name="epoch-1", exact=True)  # "Source Model: epoch-1"
            assert source.count() == 1 and "Source Model" in card
    assert (store / "first-look.png").stat().st_size > 10_000


@pytest.mark.subprocess
def test_the_ui_command_names_a_missing_experiment_and_leaves_tracking_servers_alone(store):
    missing = subprocess.run(
        [sys.executable, "-m", "detection", "ui", "--experiment", "nope"], cwd=store, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "no experiment 'nope'" in missing.stderr
    remote = subprocess.run(
        [sys.executable, "-m", "detection", "ui", "--store", "http://127.0.0.1:1"], capture_output=True, text=True
    )
    assert remote.returncode == 0 and "serves its own UI" in remote.stderr
