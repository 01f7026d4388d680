"""Screenshots of the MLflow UI and optuna-dashboard from a real browser, for the docs (docs/training.md).

    python docs/screenshots.py [--store /tmp/brecahad-ui] [--out docs/figures/ui]

Builds a demo store in --store unless it holds one (synthetic images; two smoke trainings, an
evaluation, a tune study and a promotion, all through `python -m detection`), starts `mlflow ui` and
`optuna-dashboard` on 127.0.0.1, opens them in headless Chromium (Playwright driving Debian's
/usr/bin/chromium, or $BRECAHAD_CHROMIUM: a browser download is not possible everywhere) and saves:
runs.png (the runs table), compare.png (two training runs side by side), study.png (the trials a
user opens, chosen and top ten, on parallel coordinates), study-run.png (the study run's
trial/... series: every trial), study-table.png (its table of every trial, best first),
versions.png (the registered versions with their aliases), card.png (a version's model card and
source model) and dashboard.png (optuna-dashboard on the study). Needs `pip install -e
'.[docs]'` and Chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from detection.tracking import runs_url

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("BRECAHAD_CHROMIUM", "/usr/bin/chromium")
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TINY = (
    "data.patch_size=[256,340] model.min_size=256 model.max_size=340 data.val_patches=1 train.figure_every=1 "
    "train.epochs=1"
)
MODEL = "brecahad-faster-rcnn"
STUDY = "demo-thresholds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(store: Path, *args: str) -> str:
    env = dict(os.environ) | {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    out = subprocess.run([sys.executable, "-m", "detection", *args], cwd=store, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"python -m detection {args[0]} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def build_store(store: Path, trials: int = 40) -> None:
    """The demo's store: two trainings (one with stain jitter), an evaluation, a study, a promotion."""
    store.mkdir(parents=True, exist_ok=True)
    cli(store, "synth", "data", "--images", "8", "--per-case", "2", "--seed", "1")
    cli(store, "train", "--config", "experiments/smoke.yaml", "--data-dir", "data", "-o", TINY)
    cli(store, "train", "--config", "experiments/smoke-stain.yaml", "--data-dir", "data", "-o", TINY)
    cli(store, "evaluate", "--model", f"models:/{MODEL}/1", "--data-dir", "data")
    cli(
        store,
        "tune",
        "--model",
        f"models:/{MODEL}/1",
        "--data-dir",
        "data",
        "--study",
        STUDY,
        "--n-trials",
        str(trials),
        "--storage",
        str(store / "optuna-journal.log"),
    )
    cli(store, "promote", "--candidate", f"models:/{MODEL}@challenger", "--data-dir", "data")


@contextlib.contextmanager
def serving(command: list[str], ready: str, cwd: Path, timeout: float = 120):
    """A server in its own process group, stopped with its workers afterwards."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=dict(os.environ) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(ready, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not answer at {ready}") from None
                time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield b.new_page(viewport={"width": 1500, "height": 900})
        finally:
            b.close()


def close_assistant(page) -> None:
    """Close the MLflow Assistant panel a fresh profile opens beside every page (the browser then
    remembers it closed, as it does for a user who clicks its ×). The view is the URL's
    `workflowType`, never a click: these pictures show what the printed links open."""
    with contextlib.suppress(Exception):
        page.locator("[aria-label*='lose' i]").last.click(timeout=3000)


def shot(
    page,
    url: str,
    wait_for: str,
    path: Path | None,
    settle: float = 2.0,
    assistant: bool = False,
    charts: str | None = None,
) -> str:
    """Open `url`, wait until `wait_for` is on the page, save a screenshot; returns the page's text.
    With `assistant`, the Assistant panel stays as a fresh profile shows it; with `charts`, a run's
    metric charts are narrowed to those whose names hold it (the page's own search box)."""
    page.goto(url)
    page.reload()  # a single-page app keeps the previous page's state when only the #route changes
    page.wait_for_function("text => document.body.innerText.includes(text)", arg=wait_for, timeout=90_000)
    if not assistant:
        close_assistant(page)
    if charts:
        page.get_by_placeholder("Search metric charts").fill(charts)
    time.sleep(settle)  # charts draw after the text appears
    if path is not None:
        page.screenshot(path=str(path))
    return page.inner_text("body")


def ids(store: Path) -> dict:
    """The experiment, the two training runs and the study's trial runs, read from the store."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("brecahad")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    train = [r.info.run_id for r in runs if r.info.run_name.startswith("train ")][:2]
    trials = [r.info.run_id for r in runs if r.info.run_name.startswith("trial ")][:40]
    study = next(r.info.run_id for r in runs if r.info.run_name == f"tune {STUDY}")
    return {"experiment": exp.experiment_id, "train": train, "trials": trials, "study": study}


def take(store: Path, out: Path) -> dict[str, float]:
    """Every screenshot; returns seconds per picture."""
    out.mkdir(parents=True, exist_ok=True)
    found = ids(store)
    exp = found["experiment"]
    ui, dash = free_port(), free_port()
    seconds = {}
    mlflow_ui = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(ui),
    ]
    dashboard = [
        str(Path(sys.executable).parent / "optuna-dashboard"),
        str(store / "optuna-journal.log"),
        "--host",
        "127.0.0.1",
        "--port",
        str(dash),
    ]
    base = f"http://127.0.0.1:{ui}"
    with (
        serving(mlflow_ui, f"{base}/health", store),
        serving(dashboard, f"http://127.0.0.1:{dash}/", store),
        browser() as page,
    ):
        view = "workflowType=machine_learning"
        pages = [
            ("runs", runs_url(base, exp), "train smoke"),
            (
                "compare",
                f"{base}/#/compare-runs?runs={json.dumps(found['train'])}&experiments={json.dumps([exp])}&{view}",
                "Parameters",
            ),
            (
                "study",
                f"{base}/#/compare-runs?runs={json.dumps(found['trials'])}&experiments={json.dumps([exp])}&{view}",
                "pp.score_thresh",
            ),
            ("versions", f"{base}/#/models/{MODEL}?{view}", "champion"),
            ("card", f"{base}/#/models/{MODEL}/versions/1?{view}", "Intended use"),
            ("study-run", f"{base}/#/experiments/{exp}/runs/{found['study']}/model-metrics?{view}", "Model metrics"),
            (
                "study-table",
                f"{base}/#/experiments/{exp}/runs/{found['study']}/artifacts/study_trials.csv?{view}",
                "Previewing",
            ),
            ("dashboard", f"http://127.0.0.1:{dash}/dashboard/studies/0", STUDY),
        ]
        for name, url, wait_for in pages:
            start = time.monotonic()
            try:
                # A study's every trial: the parent run's trial/... series, step = trial number.
                shot(page, url, wait_for, out / f"{name}.png", charts="trial/" if name == "study-run" else None)
            except Exception as e:
                page.screenshot(path=str(out / f"{name}-failed.png"))
                raise RuntimeError(
                    f"{name}: {url} never showed {wait_for!r} ({type(e).__name__}); see {out / (name + '-failed.png')}"
                ) from None
            seconds[name] = round(time.monotonic() - start, 1)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=Path("/tmp/brecahad-ui"), help="demo store (built if empty)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "ui", help="where the PNGs go")
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"no Chromium at {CHROMIUM}: apt-get install -y chromium, or set BRECAHAD_CHROMIUM")
    start = time.monotonic()
    if not (args.store / "mlflow.db").exists():
        build_store(args.store.resolve())
    built = time.monotonic() - start
    seconds = take(args.store.resolve(), args.out)
    print(
        json.dumps(
            {
                "store_seconds": round(built, 1),
                "screenshots": seconds,
                "total_seconds": round(time.monotonic() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
