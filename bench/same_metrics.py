"""A refactor's proof of no change: every figure the CLI logs, from a clone of the code, as one JSON.

    python bench/same_metrics.py --data-dir ../shared/data/brecahad-sample --store /tmp/brecahad-fp \
        --versions 2,5 --out /tmp/before.json
    (change the code)
    python bench/same_metrics.py ... --out /tmp/after.json --against /tmp/before.json

For each --versions V it evaluates models:/brecahad-faster-rcnn/V on the test split (whole and
paper protocols), runs a seeded 20-trial postprocess study on the first version, and trains
smoke.yaml for one seeded epoch on the data; it keeps every metric those runs logged, except wall
times. --against prints each figure that differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "brecahad-faster-rcnn"
TIMINGS = ("system/", "seconds", "per_s", "_time", "throughput")  # machine load and wall clock


def cli(store: Path, *args: str) -> None:
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "detection", *args],
        cwd=store,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    print(f"{' '.join(args[:1])} {' '.join(args[1:3])}: {time.monotonic() - start:.1f} s", file=sys.stderr)


def last_run_metrics(client, run_name_prefix: str) -> dict[str, float]:
    """The newest finished run whose name starts with the prefix: its metrics, or every step of a training's."""
    ids = [e.experiment_id for e in client.search_experiments()]
    run = client.search_runs(
        ids,
        f"attributes.run_name LIKE '{run_name_prefix}%' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    figures = {}
    for key in run.data.metrics:
        if any(t in key for t in TIMINGS):
            continue
        for m in client.get_metric_history(run.info.run_id, key):
            figures[f"{key}@{m.step}"] = m.value
    return figures


def measure(data: Path, store: Path, versions: list[str]) -> dict[str, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out = {}
    for v in versions:
        for protocol in ("whole", "paper"):
            cli(store, "evaluate", "--model", f"models:/{NAME}/{v}", "--data-dir", str(data), "--protocol", protocol)
            out[f"evaluate v{v} {protocol}"] = last_run_metrics(client, f"evaluate v{v} test {protocol}")
    study = f"same-metrics-{time.time_ns()}"
    cli(
        store,
        "tune",
        "--model",
        f"models:/{NAME}/{versions[0]}",
        "--data-dir",
        str(data),
        "--study",
        study,
        "--n-trials",
        "20",
        "--seed",
        "0",
        "--storage",
        str(store / "same-metrics-journal.log"),
    )
    out[f"tune v{versions[0]}"] = last_run_metrics(client, f"tune {study}")
    cli(
        store,
        "train",
        "--config",
        str(ROOT / "experiments" / "smoke.yaml"),
        "--data-dir",
        str(data),
        "-o",
        "train.epochs=1 train.seed=0",
    )
    out["train smoke 1 epoch"] = last_run_metrics(client, "train smoke")
    return out


def differences(before: dict, after: dict) -> list[str]:
    lines = []
    for run in sorted(set(before) | set(after)):
        b, a = before.get(run, {}), after.get(run, {})
        for key in sorted(set(b) | set(a)):
            x, y = b.get(key, math.nan), a.get(key, math.nan)
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                lines.append(f"{run}: {key}: {x} -> {y}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument(
        "--store",
        type=Path,
        default=Path("/tmp/brecahad-fp"),
        help="a sqlite store holding the versions (bench/false_positives.py makes one)",
    )
    p.add_argument("--versions", default="2,5", help="comma-separated versions to evaluate (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--against", type=Path, help="an earlier --out: print what differs, exit 1 if anything does")
    args = p.parse_args()
    store = args.store.resolve()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    figures = measure(args.data_dir.resolve(), store, args.versions.split(","))
    args.out.write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(f"{sum(map(len, figures.values()))} figures from {len(figures)} runs in {args.out}")
    if args.against:
        diff = differences(json.loads(args.against.read_text()), figures)
        print("\n".join(diff) or "every figure is the same")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
