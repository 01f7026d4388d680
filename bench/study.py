"""What tracking costs a postprocess study: the same study with MLflow tracking on and off, on the
shared sample's validation cache, for 1,000 and 10,000 trials (issue 26).

    python bench/study.py [--trials 1000 10000] [--store /tmp/brecahad-study-bench] [--ui]

An untrained smoke model is registered in a sqlite store in --store with a split of the shared
sample, and its val and test images are inferred once (the cache every study replays). Then, per
trial count, two fresh studies on a journal file, alike but for tracking (same sampler, seed and
storage kind):

- off: the trials alone (Optuna's sampler and storage, the replay);
- on: the same plus what the project tracks: each trial's series on the parent run, written a batch
  at a time, and at the study's end the table of every trial, the figures and nested runs for the
  trials a user opens (chosen, top ten or Pareto front).

Tracking's share is the time spent in the series writer and the study's end over the tracked
study's wall time (tracking_share), and (on - off) / on (ab_share: two runs differ by ±10% here).
With --ui, `mlflow ui` serves the store and headless Chromium (Playwright) opens the experiment's
runs table: seconds until the largest study's parent row shows, in a fresh profile and on a
reload (medians of three, after one load that warms the server up). Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "brecahad-sample"
NAME = "bench-study"


def register(store: Path) -> str:
    """An untrained smoke model and a split of the shared sample, registered once in `store`."""
    import mlflow

    from detection import config as config_mod
    from detection import tracking
    from detection.predict import log_detector
    from detection.train import prepare

    found = tracking.alias_version(NAME, "challenger")
    if found:
        return found.pinned
    prep = prepare(config_mod.load(str(ROOT / "experiments" / "smoke.yaml")), SAMPLE)
    with mlflow.start_run(experiment_id=tracking.use_experiment("bench-study"), run_name="bench model"):
        mlflow.log_text(prep.split.to_json(), "split.json")
        uri = log_detector(prep.cfg, prep.model)
    return f"models:/{NAME}/{tracking.register(uri, NAME, 'challenger', {'bench': 'study'})}"


class TimedStepLog:
    """tracking.StepLog, with the seconds spent in it: tracking's share read inside the tracked run,
    free of the run-to-run noise (±10% here) that an A/B difference of two studies carries."""

    def __init__(self, run_id: str):
        from detection import tracking

        self.log, self.seconds = tracking.StepLog(run_id), 0.0

    def add(self, values: dict, step: int) -> None:
        start = time.perf_counter()
        self.log.add(values, step)
        self.seconds += time.perf_counter() - start

    def flush(self) -> None:
        start = time.perf_counter()
        self.log.flush()
        self.seconds += time.perf_counter() - start


def study(model: str, store: Path, trials: int, tracked: bool, sampler: str) -> dict:
    """One fresh study of `trials` trials; seconds for the trials, and for what the study's end tracks."""
    from detection import studies, tracking, tune

    name = f"{trials}-{'on' if tracked else 'off'}-{sampler}-{time.time_ns()}"
    req = tune.TuneRequest(model, SAMPLE, name, trials, storage=str(store / f"{name}.log"), seed=0, sampler=sampler)
    ref = tracking.resolve_model(model)
    detector = tracking.load_model(ref)
    s = tune.open_study(req, studies.open_storage(req.storage_url, None), ref, detector.config, detector.model)
    objective, _ = tune.PostprocessStudy.prepare(s)  # the caches: inferred once, by the first study
    s.log = TimedStepLog(s.parent) if tracked else None
    start = time.perf_counter()
    studies.run(s, objective, beat=False)
    loop = time.perf_counter() - start
    end = 0.0
    if tracked:
        start = time.perf_counter()
        chosen = tune.choose(s.study)
        with tracking.reopen(s.parent) as tr:
            tune.log_study(tr, s, chosen)
        end = time.perf_counter() - start
    else:
        tracking.client().set_terminated(s.parent, "FINISHED")
    series = s.log.seconds if tracked else 0.0
    return {"trials": trials, "loop_s": loop, "series_s": series, "end_s": end, "parent": s.parent}


def runs_table_seconds(store: Path, parent: str, tries: int = 3) -> dict:
    """Seconds until the experiment's runs table shows the study's parent run: in a fresh browser
    profile each time (nothing cached), and on a reload; medians of `tries` after one load that
    warms the server up (its first answers after a start take seconds more)."""
    sys.path.insert(0, str(ROOT / "docs"))
    import screenshots

    from detection import tracking

    run = tracking.get_run(parent)
    port = screenshots.free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    url = tracking.runs_url(base, run.info.experiment_id)

    def shown(page) -> None:
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=run.info.run_name, timeout=60_000)

    fresh, reload = [], []
    with screenshots.serving(command, f"{base}/health", store):
        for k in range(tries + 1):
            with screenshots.browser() as page:
                start = time.perf_counter()
                page.goto(url)
                shown(page)
                fresh.append(time.perf_counter() - start)
                start = time.perf_counter()
                page.reload()
                shown(page)
                reload.append(time.perf_counter() - start)
                if k == tries:
                    screenshots.close_assistant(page)
                    page.screenshot(path=str(store / "runs-table.png"))
    runs = len(tracking.client().search_runs([run.info.experiment_id], max_results=5000))
    return {
        "ui_fresh_profile_s": round(statistics.median(fresh[1:]), 2),
        "ui_reload_s": round(statistics.median(reload[1:]), 2),
        "ui_first_after_start_s": round(fresh[0], 2),
        "runs_in_experiment": runs,
        "run": run.info.run_name,
        "screenshot": str(store / "runs-table.png"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "brecahad-study-bench")
    p.add_argument("--sampler", default="auto", help="auto (tpe up to 1,000 trials, else qmc), tpe, qmc or random")
    p.add_argument("--ui", action="store_true", help="time the runs table in headless Chromium")
    args = p.parse_args()
    if not SAMPLE.is_dir():
        sys.exit(f"{SAMPLE} is absent: the bench reads the shared BreCaHAD sample")
    store = args.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.chdir(store)
    import mlflow
    import optuna

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model = register(store)
    study(model, store, 5, False, args.sampler)  # infers the val and test caches, outside the timings
    parent = None
    for n in args.trials:
        off = study(model, store, n, False, args.sampler)
        on = study(model, store, n, True, args.sampler)
        total_on, total_off = on["loop_s"] + on["end_s"], off["loop_s"]
        tracking_s = on["series_s"] + on["end_s"]
        print(
            json.dumps(
                {
                    "trials": n,
                    "sampler": args.sampler,
                    "off_s": round(total_off, 2),
                    "on_s": round(total_on, 2),
                    "on_series_s": round(on["series_s"], 2),
                    "on_study_end_s": round(on["end_s"], 2),
                    "tracking_share": round(tracking_s / total_on, 4),  # measured inside the tracked run
                    "ab_share": round((total_on - total_off) / total_on, 4),  # on against off: noisy
                    "trials_per_s_on": round(n / total_on, 1),
                }
            ),
            flush=True,
        )
        parent = on["parent"]
    if args.ui and parent:
        print(json.dumps(runs_table_seconds(store, parent)), flush=True)


if __name__ == "__main__":
    main()
