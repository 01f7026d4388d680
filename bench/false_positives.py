"""Issue 12's measurement: FDR at equal detection rate for thresholds alone, + test-time flips,
+ a second look, + both, and stain-augmented training, on the shared sample's held-out case, in one
`compare` run.

    python bench/false_positives.py --data-dir ../shared/data/brecahad-sample --epochs 20 --store /tmp/fp

Trains smoke.yaml and smoke-stain.yaml for --epochs epochs (or takes --plain/--stain versions already
in the store), tunes both models' thresholds (postprocess studies), registers a TTA version (all
four flips) of the tuned plain model with the same weights, trains a second look on the tuned model
and on its TTA version, and compares all of them. Prints timings and the comparison table;
everything is in the sqlite store under --store.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> str:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "detection", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(args[:2])} failed:\n{out.stderr[-3000:]}")
    print(
        json.dumps(
            {
                "step": " ".join(args[:1]),
                "args": " ".join(args[1:])[:160],
                "seconds": round(time.monotonic() - start, 1),
            }
        ),
        flush=True,
    )
    return out.stdout


def tta_version(model: str, alias: str) -> str:
    """Register the version's weights again with eval.tta_views set (the same run's split)."""
    import mlflow

    from detection import tracking
    from detection.predict import log_detector

    ref = tracking.resolve_model(model)
    detector = tracking.load_model(ref)
    split = mlflow.artifacts.load_dict(f"runs:/{ref.run_id}/split.json")
    mlflow.set_experiment("brecahad")
    with mlflow.start_run(run_name=f"tta of v{ref.version}"):
        mlflow.log_text(json.dumps(split), "split.json")
        uri = log_detector(detector.config.replace("eval.tta_views=[none,h,v,hv]"), detector.model)
    version = tracking.register(uri, ref.name, alias, {"tta_of": ref.version})
    return f"models:/{ref.name}/{version}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--store", type=Path, default=Path("/tmp/brecahad-fp"))
    p.add_argument("--plain", help="a version of smoke.yaml already trained in the store (skips its training)")
    p.add_argument("--stain", help="a version of smoke-stain.yaml already trained in the store")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated versions to make now (default: every missing one, then the comparison)",
    )
    p.add_argument(
        "--second-look",
        default="second_look.epochs=5 second_look.max_examples=4000",
        help="overrides of the second looks (default: %(default)s)",
    )
    args = p.parse_args()
    data = args.data_dir.resolve()
    args.store.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.store.resolve() / 'mlflow.db'}"
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    name = "brecahad-faster-rcnn"
    # Every version made is recorded in versions.json: a rerun (or --only) picks up where it stopped.
    record = args.store / "versions.json"
    versions = json.loads(record.read_text()) if record.exists() else {}
    versions |= {k: v for k, v in (("plain", args.plain), ("stain", args.stain)) if v}
    wanted = set(args.only.split(",")) if args.only else None

    def step(label: str, make) -> None:
        if label in versions or (wanted is not None and label not in wanted):
            return
        versions[label] = make()
        record.write_text(json.dumps(versions, indent=1))
        print(json.dumps({"version": label, "model": versions[label]}), flush=True)

    def train(cfg: str) -> str:
        out = cli(
            "train",
            "--config",
            str(ROOT / "experiments" / cfg),
            "--data-dir",
            str(data),
            "-o",
            f"train.epochs={args.epochs} train.figure_every={args.epochs}",
            cwd=args.store,
        )
        return f"models:/{name}/{out.split('registered version ')[1].split('.')[0]}"

    def tune(label: str) -> str:
        cli(
            "tune",
            "--model",
            versions[label],
            "--data-dir",
            str(data),
            "--study",
            f"fp-thresholds-{label}",
            "--n-trials",
            str(args.trials),
            "--storage",
            str(args.store / "optuna-journal.log"),
            cwd=args.store,
        )
        return tracking.resolve_model(f"models:/{name}@challenger").pinned

    def second_look(source: str) -> str:
        out = cli(
            "second-look",
            "--model",
            versions[source],
            "--data-dir",
            str(data),
            "--alias",
            "second-look",
            "-o",
            args.second_look,
            cwd=args.store,
        )
        print(out.strip().splitlines()[-1], flush=True)
        return tracking.resolve_model(f"models:/{name}@second-look").pinned

    from detection import tracking

    step("plain", lambda: train("smoke.yaml"))
    step("plain tuned", lambda: tune("plain"))
    step("tuned + tta", lambda: tta_version(versions["plain tuned"], "tta"))
    step("tuned + second look", lambda: second_look("plain tuned"))
    step("tuned + tta + second look", lambda: second_look("tuned + tta"))
    step("stain", lambda: train("smoke-stain.yaml"))
    step("stain tuned", lambda: tune("stain"))
    order = ["plain tuned", "tuned + tta", "tuned + second look", "tuned + tta + second look", "stain tuned"]
    if not all(k in versions for k in order):
        print(json.dumps({"missing": [k for k in order if k not in versions]}), flush=True)
        return
    print(
        cli(
            "compare",
            "--models",
            " ".join(versions[k] for k in order),
            "--data-dir",
            str(data),
            "--targets",
            "0.5 0.6 0.7 0.8 0.9",
            cwd=args.store,
        )
    )
    print_costs()


def print_costs() -> None:
    """Wall time of every finished training, second look and evaluation run: each tool's cost."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    for r in client.search_runs(ids, "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]):
        tags = r.data.tags
        kind = (
            "evaluate"
            if tags.get("detection.evaluation")
            else "second look"
            if tags.get("detection.second_look")
            else "train"
            if "train.epochs" in r.data.params and not tags.get("mlflow.parentRunId")
            else None
        )
        if kind:
            print(
                json.dumps(
                    {
                        "cost": kind,
                        "run": r.info.run_name,
                        "model_version": tags.get("detection.model_version"),
                        "split": tags.get("detection.split"),
                        "tta_views": tags.get("detection.tta_views", ""),
                        "seconds": round((r.info.end_time - r.info.start_time) / 1000, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
