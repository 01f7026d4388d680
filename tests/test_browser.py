"""The MLflow UI in a real browser (headless Chromium through Playwright): what a user sees first."""

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, free_port, serving, train_tiny

sys.path.insert(0, str(ROOT / "docs"))
import screenshots  # noqa: E402  (docs/screenshots.py: the README's pictures are made the same way)

pytestmark = pytest.mark.slow


def test_the_runs_table_lists_named_runs_and_the_model_page_shows_the_champion(store, synth_dir):
    if not Path(screenshots.CHROMIUM).exists():
        pytest.skip(f"no Chromium at {screenshots.CHROMIUM}: apt-get install -y chromium (.ci/run installs it)")
    pytest.importorskip("playwright", reason="pip install -e '.[docs]' brings Playwright")
    result = train_tiny(synth_dir, cwd=store)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    client.set_registered_model_alias("brecahad-faster-rcnn", "champion", "1")
    experiment = client.get_experiment_by_name("brecahad").experiment_id
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    with serving(command, f"{base}/health", store), screenshots.browser() as page:
        runs = screenshots.shot(page, f"{base}/#/experiments/{experiment}/runs", "train smoke", store / "runs.png")
        assert "train smoke" in runs and "Runs" in runs
        versions = screenshots.shot(page, f"{base}/#/models/brecahad-faster-rcnn", "champion", None)
        assert "Version 1" in versions and "champion" in versions
    assert (store / "runs.png").stat().st_size > 10_000
