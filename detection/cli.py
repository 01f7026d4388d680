"""`python -m detection COMMAND`: the entry points of the MLproject, usable without `mlflow run`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from . import choices
from . import config as config_mod
from .errors import DetectionError

DESCRIPTION = """\
Faster R-CNN detection of tumour cells in BreCaHAD H&E images, tracked with MLflow.

Typical use:
  python -m detection synth data/demo --images 12       # offline demo data
  python -m detection validate data/demo                # every problem in one pass
  python -m detection train --config experiments/smoke.yaml --data-dir data/demo
  python -m detection ui                                 # the runs table in the MLflow UI
"""


def _optional_int(text: str) -> int | None:
    """An int, or None for '' (MLproject passes an unset parameter as an empty string)."""
    return int(text) if text.strip() else None


def _optional_float(text: str) -> float | None:
    """A float, or None for '' (an unset MLproject parameter)."""
    return float(text) if text.strip() else None


def _radius_option(p, default_help: str) -> None:
    p.add_argument(
        "--match-radius-um",
        type=_optional_float,
        default=None,
        metavar="UM",
        help="match radius in micrometres, e.g. 7.5 (MIDOG); pixels follow from the images' resolution "
        f"(default: {default_help})",
    )


def _boolean_option(p, flag: str, help: str) -> None:
    """true|false as a value, not a switch: MLproject passes every parameter as `--flag VALUE`."""
    p.add_argument(flag, default=choices.BOOLEANS[0], choices=choices.BOOLEANS, help=f"{help} (default: %(default)s)")


def _model_option(p, alias: str) -> None:
    p.add_argument(
        "--model",
        default=choices.model_uri(alias),
        help="models:/NAME@ALIAS or models:/NAME/VERSION (default: %(default)s)",
    )


def _protocol_option(p) -> None:
    p.add_argument(
        "--protocol",
        default=choices.PROTOCOLS[0],
        choices=choices.PROTOCOLS,
        help="whole: every annotated cell of whole images counted once (tiled at the training scale); "
        "paper: 10 random patches per image as the paper did, counting cell-patch pairs, with a "
        "don't-care band of eval.border_band px along inner patch edges (default: %(default)s)",
    )


def _matching_option(p) -> None:
    p.add_argument(
        "--matching",
        default=choices.MATCHERS[0],
        choices=choices.MATCHERS,
        help="greedy: centre within eval.match_radius, one-to-one in score order; hungarian: the most "
        "pairs within the radius; iou: box IoU >= 0.5 (default: %(default)s)",
    )


def _device_option(p) -> None:
    p.add_argument(
        "--device",
        default="",
        help="auto, cpu, cuda or cuda:N for inference (default: $BRECAHAD_DEVICE, "
        "else auto: CUDA when present). $BRECAHAD_PRECISION (auto|fp32|bf16|"
        "fp16; auto = bf16 on CUDA, fp32 on a CPU) and $BRECAHAD_TILE_BATCH "
        "(tiles per forward pass on CUDA, default 9) tune it further",
    )


def _config_options(p) -> None:
    p.add_argument(
        "--config",
        default=choices.CONFIG,
        help="experiments/*.yaml, looked up as given, then inside the project (default: %(default)s)",
    )
    p.add_argument("--data-dir", required=True, type=Path, help="BreCaHAD folder with images/ and groundTruth/")
    p.add_argument(
        "-o",
        "--overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. 'train.epochs=1 data.box_size=30' (repeatable)",
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train, log and register a model",
        description="Train the configured Faster R-CNN on DATA_DIR as one MLflow run: every config value as a "
        "param, losses per step, validation detection rate and FDR per epoch, a checkpoint per epoch, "
        "and a registered model version with the alias tracking.alias (default challenger). Under "
        "`mlflow run` it attaches to the run MLflow made.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection train --config experiments/smoke.yaml --data-dir data/demo -o train.epochs=1\n"
        "  python -m detection train --resume 0123abcd...   # continue an interrupted run\n",
    )
    _config_options(p)
    p.add_argument(
        "--resume",
        default="",
        metavar="RUN_ID",
        help="continue RUN_ID from its last checkpoint, with its recorded config and split",
    )


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="judge a registered model on held-out images",
        description="Evaluate a registered model as one MLflow run: one raw inference pass (cached as "
        "predictions.npz), then detection rate, FDR, precision, F1 and counts at the model's operating "
        "point with 95% bootstrap intervals over cases (patients), point AP, COCO box AP and AP50, a per-image "
        "table, the paper's Fig. 4 (TPR and FDR against the score threshold), the precision-recall curve and "
        "overlays. Metrics are named SPLIT/... (test/detection_rate).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m detection evaluate --model models:/brecahad-faster-rcnn@challenger "
        "--data-dir data/demo --protocol whole\n",
    )
    _model_option(p, choices.CHALLENGER)
    p.add_argument("--data-dir", required=True, type=Path, help="BreCaHAD folder with images/ and groundTruth/")
    p.add_argument(
        "--split",
        default=choices.SPLITS[0],
        choices=choices.SPLITS,
        help="test/val: the held-out images recorded by the model's training run; all: every image "
        "of DATA_DIR, e.g. a new cohort (default: %(default)s)",
    )
    _protocol_option(p)
    _matching_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the paper protocol's patches and the bootstrap")
    _boolean_option(p, "--allow-overlap", "evaluate images whose content was in the training split (the run is tagged)")
    _device_option(p)
    _radius_option(p, "the version's eval.match_radius_um")


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="Optuna study over the thresholds that cut false positives",
        description="Search post-processing (score threshold, NMS IoU, detections per image, class-agnostic NMS) "
        "by replaying the validation split's cached raw predictions, or training-time IoU thresholds "
        "and the learning rate by training one model per trial. One parent MLflow run per study, one "
        "nested run per training trial; a postprocess study's trials are series on the parent run (step: trial "
        "number), a table and figures, with nested runs for the chosen trial, the Pareto front and the top "
        "ten. The objective is measured on the validation split only. When the "
        "study ends, the chosen point is evaluated once on the test split and registered as a new "
        "version with the alias challenger. Rerun with the same --study to resume it; start several "
        "workers on one --storage to share it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection tune --data-dir data/demo --study pp --n-trials 200\n"
        "  python -m detection tune --data-dir data/demo --study front --objective pareto --n-trials 100\n"
        "  python -m detection tune --data-dir data/demo --study iou --kind training --n-trials 4 "
        "--train-overrides 'train.epochs=2'\n"
        "  optuna-dashboard optuna-journal.log      # watch the study\n",
    )
    _model_option(p, choices.CHALLENGER)
    p.add_argument("--data-dir", required=True, type=Path, help="the BreCaHAD folder the model was trained on")
    p.add_argument(
        "--study",
        default=choices.TUNE_STUDY,
        help="study name; an existing study of that name is resumed (default: %(default)s)",
    )
    p.add_argument(
        "--n-trials", type=int, default=choices.TUNE_TRIALS, help="trials this worker runs (default: %(default)s)"
    )
    p.add_argument(
        "--storage",
        default="",
        help=f"Optuna storage: a journal file path or an RDB URL such as sqlite:///optuna.db or "
        f"postgresql://... Keep passwords out of it (use PGPASSWORD or ~/.pgpass): MLflow logs "
        f"the value as a param (default: $BRECAHAD_OPTUNA_STORAGE, else {choices.TUNE_STORAGE} "
        f"beside mlflow.db)",
    )
    p.add_argument(
        "--kind",
        default=choices.TUNE_KINDS[0],
        choices=choices.TUNE_KINDS,
        help="postprocess: replay cached predictions (CPU-cheap); training: train a model per trial "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--objective",
        default=choices.OBJECTIVES[0],
        choices=choices.OBJECTIVES,
        help="f1: maximise F1; recall_at_fdr: maximise detection rate with FDR <= --max-fdr; pareto: "
        "maximise detection rate and minimise FDR; froc: maximise the mean detection rate at 10, 20, 50, "
        "100, 200 and 300 false positives per mm² (postprocess studies) (default: %(default)s)",
    )
    p.add_argument(
        "--max-fdr", type=float, default=choices.TUNE_MAX_FDR, help="FDR bound of recall_at_fdr (default: %(default)s)"
    )
    _protocol_option(p)
    p.add_argument(
        "--seed",
        type=_optional_int,
        default=None,
        help="sampler seed; give each worker its own (default: none, a random one per worker)",
    )
    p.add_argument(
        "--range",
        action="append",
        default=[],
        metavar="NAME=LOW:HIGH",
        help="narrow a search range, e.g. score_thresh=0.01:0.5 (repeatable); names: " + ", ".join(choices.TUNE_RANGES),
    )
    p.add_argument(
        "--train-overrides",
        default="",
        metavar="KEY=VALUE ...",
        help="config overrides for training trials, e.g. 'train.epochs=2'",
    )
    p.add_argument(
        "--sampler",
        default=choices.TUNE_SAMPLERS[0],
        choices=choices.TUNE_SAMPLERS,
        help=f"Optuna's sampler: tpe models the earlier trials (best for up to ~{choices.TPE_MAX_TRIALS} "
        f"trials; its cost per trial grows with the study), qmc a scrambled Sobol sequence (even cover, "
        f"the same cost at any size), random; auto: tpe while the study stays within "
        f"{choices.TPE_MAX_TRIALS} trials, else qmc (default: %(default)s)",
    )
    p.add_argument(
        "--heartbeat",
        type=float,
        default=choices.TUNE_HEARTBEAT,
        metavar="SECONDS",
        help="seconds between a running trial's heartbeats; a trial silent for 3x this long belongs to "
        "a dead worker and is failed and run again (default: %(default)s)",
    )


def _add_promote(sub) -> None:
    p = sub.add_parser(
        "promote",
        help="move the champion alias to a version that beats it",
        description="Compare a candidate version with the current champion on the same images, protocol and "
        "matching (evaluating either one that lacks such an evaluation), and move the alias champion "
        "only when the candidate beats it by --min-delta on --metric. The former champion keeps the "
        "alias previous. The decision is a run (side-by-side table and figure) and tags on both "
        "versions. --rollback true swaps champion and previous back.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection promote --candidate models:/brecahad-faster-rcnn/2 --data-dir data/demo\n"
        "  python -m detection promote --candidate models:/brecahad-faster-rcnn/2 --data-dir data/demo "
        "--rollback true\n",
    )
    p.add_argument("--candidate", required=True, help="models:/NAME/VERSION (or @ALIAS) to promote")
    p.add_argument("--data-dir", required=True, type=Path, help="BreCaHAD folder holding the evaluation images")
    p.add_argument(
        "--metric",
        default=choices.PROMOTE_METRIC,
        help="SPLIT/NAME deciding the promotion (default: %(default)s); fdr, fp and fn count lower as better",
    )
    p.add_argument("--min-delta", type=float, default=0.0, help="margin the candidate must win by (default: 0)")
    _boolean_option(p, "--rollback", "swap the aliases champion and previous back instead")
    _protocol_option(p)
    _matching_option(p)
    _radius_option(p, "the candidate's eval.match_radius_um, for both versions")


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="detect cells in images with a registered model",
        description="Run a registered model on TIFF or PNG images of any size (larger ones are tiled, as in "
        "evaluation) and write, per image, the detections as JSON (boxes, scores, labels, centre "
        "points) and an overlay PNG with the predictions in green.",
    )
    p.add_argument("images", nargs="+", type=Path, help="TIFF or PNG files (RGB)")
    _model_option(p, choices.CHAMPION)
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: %(default)s)")
    p.add_argument(
        "--format",
        default=choices.PREDICT_FORMATS[0],
        choices=choices.PREDICT_FORMATS,
        help="json: boxes, scores and centres; geojson: point detections with class and score in "
        "image pixels, for QuPath's File > Import objects (default: %(default)s)",
    )
    _device_option(p)


def _add_slides(sub) -> None:
    p = sub.add_parser(
        "slides",
        help="count tumour cells on whole-slide images (OpenSlide; Ray for many slides)",
        description="Read each slide through OpenSlide (tiffslide where OpenSlide cannot), resample it to the "
        "scale the version was trained at (its data.mpp), skip background found on a low-resolution level, "
        "and run the version's pipeline (post-processing, flips, second look) region by region, reading ahead "
        "in a thread. Writes per slide OUT/SLIDE.geojson.gz (QuPath: File > Import objects), SLIDE.parquet "
        "(every detection in slide px and um), SLIDE.thumbnail.png (a density heatmap) and SLIDE.done.json "
        "(counts per class per mm2 of tissue), last. A killed job rerun with the same arguments resumes "
        "at the first region not done. One MLflow run per job, a nested run per slide. Several slides "
        "run as Ray tasks, on Ray embedded here or on --ray-address.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection slides slide1.svs slide2.ndpi --out counts\n"
        "  python -m detection slides /data/*.svs --ray-address ray://head:10001 --out /shared/counts\n"
        "  python -m detection slides scan.tiff --mpp 0.25 --out counts   # a slide with no resolution tags\n",
    )
    p.add_argument("slides", nargs="+", type=Path, help="slide files: SVS, NDPI, MRXS, tiled TIFF, OME-TIFF")
    _model_option(p, choices.CHAMPION)
    p.add_argument("--out", type=Path, default=Path("slides"), help="output folder (default: %(default)s)")
    p.add_argument("--mpp", type=float, default=None, help="micrometres per pixel of slides that record none")
    p.add_argument(
        "--region", type=int, default=2048, help="region side in px at the model's scale (default: %(default)s)"
    )
    p.add_argument(
        "--ray-address",
        default="auto",
        help="auto: several slides on Ray embedded here, one slide in this process; off: one by one here; "
        "else a Ray address such as ray://head:10001 (default: %(default)s)",
    )
    _device_option(p)


def _optional_float(text: str) -> float | None:
    """A number, or nothing for an empty string (what `mlflow run` passes for an unset parameter)."""
    return float(text) if text.strip() else None


def _add_import(sub) -> None:
    p = sub.add_parser(
        "import",
        help="turn your own annotations (QuPath GeoJSON, COCO, CSV points) into a dataset folder",
        description="Read cell annotations and their images and write the project's dataset layout in OUT: "
        "images/NAME.tif (with its resolution), groundTruth/NAME.json, and dataset.json (the class map, um per px, "
        "the source files' SHA-256 and the counts per class). validate, train, evaluate and tune then read OUT as "
        "they read BreCaHAD (train with -o 'data.classes=[all]' for every class). QuPath: File > Export objects as "
        "GeoJSON, one file per image named after it; points, and polygons at their centroid. COCO: keypoints, or "
        "boxes at their centres. CSV: a header with image,x,y,class. Everything is checked before anything is "
        "written; the import is logged as an MLflow run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection import qupath-exports/ --format qupath --images scans/ --out data/lab --mpp 0.25\n"
        "  python -m detection import cells.json --format coco --images scans/ --out data/lab\n"
        "  python -m detection train --config experiments/smoke.yaml --data-dir data/lab -o 'data.classes=[all]' \\\n"
        "      -o 'model.weights=models:/brecahad-faster-rcnn@champion'   # fine-tune a registered version\n",
    )
    p.add_argument("src", type=Path, help="the annotations: a GeoJSON file or a folder of them, a COCO JSON, a CSV")
    p.add_argument("--format", required=True, choices=("qupath", "coco", "csv"), help="the annotations' format")
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder of the images (TIFF, PNG, JPEG) or whole slides (regions of them), by file stem",
    )
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write (new or empty)")
    p.add_argument(
        "--mpp", type=_optional_float, default=None, help="um per pixel of images that record none (BreCaHAD: 0.514)"
    )
    p.add_argument(
        "--classes",
        default="",
        help="the class map, comma-separated, in label order (default: every class named, sorted); "
        "a class outside it is refused",
    )
    p.add_argument(
        "--default-class", default="", help="class of unclassified objects (default: they are skipped and counted)"
    )
    p.add_argument("--units", choices=("px", "um"), default="px", help="unit of the coordinates (default: %(default)s)")


def _add_cv(sub) -> None:
    p = sub.add_parser(
        "cv",
        help="leave-one-case-out cross-validation (one training per case; meant for a GPU)",
        description="Hold out each case (patient) of DATA_DIR in turn: train the configured model on the other "
        "cases (the next case in name order validates) as a nested run, judge it on the held-out "
        "case's whole images, and pool the counts under one parent run (cv/detection_rate, cv/fdr, "
        "cv/f1 with 95% intervals over cases, cv_per_case.json). The patient-level estimate a single "
        "held-out split of one or two patients cannot give.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection cv --config experiments/paper.yaml --data-dir /data/BreCaHAD\n"
        "  python -m detection cv --config experiments/smoke.yaml --data-dir data/demo -o train.epochs=1 "
        "--cases Case_1,Case_2\n",
    )
    _config_options(p)
    p.add_argument("--cases", default="", help="comma-separated cases to hold out (default: every case)")


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="false positives at equal detection rate, for several registered versions",
        description="Evaluate each version on one split at one match radius (or reuse its evaluation), "
        "read its detection rate and false positives at every score threshold where what it keeps changes "
        "(the fused one for versions with test-time augmentation), and report per version, with 95% "
        "intervals from resampling cases (patients): on the fdr axis, the FDR at detection rates 0.90, "
        "0.95, 0.99 and at the highest rate all versions reach; on the froc axis, the detection rate at "
        "10, 20, 50, 100, 200 and 300 false positives per mm² and their mean (the MONKEY challenge's "
        "FROC). One MLflow run holds the table (comparison.json), the figure (every curve on one plot) "
        "and VERSION/... metrics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m detection compare --models models:/brecahad-faster-rcnn/1 "
        "models:/brecahad-faster-rcnn/2 --data-dir data/demo\n"
        "  python -m detection compare --models models:/brecahad-faster-rcnn/1 models:/brecahad-faster-rcnn/2 "
        "--data-dir data/demo --axis froc\n",
    )
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="models:/NAME/VERSION or @ALIAS, two or more (one string of several works too)",
    )
    p.add_argument("--data-dir", required=True, type=Path, help="BreCaHAD folder holding the evaluated images")
    p.add_argument("--split", default=choices.SPLITS[0], choices=choices.SPLITS, help="(default: %(default)s)")
    _protocol_option(p)
    p.add_argument(
        "--axis",
        default=choices.COMPARE_AXES[0],
        choices=choices.COMPARE_AXES,
        help="fdr: FDR at equal detection rate; froc: detection rate at equal false positives per mm² "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--targets",
        default=choices.COMPARE_TARGETS,
        help="where to read each version: detection rates for the fdr axis (default 0.90 0.95 0.99), false "
        "positives per mm² for the froc axis (default 10 20 50 100 200 300)",
    )
    _radius_option(p, "the first version's eval.match_radius_um, for every version")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a registered version over HTTP (mlflow models serve), after checking it",
        description="Check that the version is in the project's form (its code is this release's, its "
        "artifacts a config and weights, no pickle) and serve that very copy with `mlflow models serve` "
        "on the venv: POST images to /invocations. A crafted version is refused before anything of it "
        "runs. The copy is removed when the server stops.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m detection serve --model models:/brecahad-faster-rcnn@champion --port 5001 "
        "--workers 2\n",
    )
    _model_option(p, choices.CHAMPION)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=5001, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="server processes (default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=int,
        default=600,
        help="seconds a request may take; a whole image costs ~7 s on 2 CPU cores (default: %(default)s)",
    )


def _add_ui(sub) -> None:
    p = sub.add_parser(
        "ui",
        help="start the MLflow UI on the local store and print the URL of the runs table",
        description="Print the URL that opens the experiment on its runs table in the model-training view "
        "(a fresh browser would otherwise open MLflow's GenAI overview, with no Models link), then run "
        "`mlflow ui` on the store until Ctrl-C. A tracking server serves its own UI.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m detection ui            # sqlite:///mlflow.db on http://127.0.0.1:5000\n",
    )
    p.add_argument("--store", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument(
        "--experiment",
        default=config_mod.TrackingConfig.experiment,
        help="experiment whose runs the URL opens (default: %(default)s)",
    )
    p.add_argument("--host", default=UI_HOST, help="interface to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=UI_PORT, help="(default: %(default)s)")


def _add_reregister(sub) -> None:
    p = sub.add_parser(
        "reregister",
        help="register a version an earlier release pickled again, from the project's code",
        description="Earlier releases registered a version as a pickled Python object, which runs whatever it "
        "holds when MLflow loads it; this release refuses to load such a version. This reads only its config "
        "(YAML) and weights (state_dicts), logs them as a new version from the project's code in a run that "
        "carries the source run's split, and gives it the alias challenger.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m detection reregister models:/brecahad-faster-rcnn/3\n",
    )
    p.add_argument("model", help="models:/NAME/VERSION (or @ALIAS) to register again")


def _add_second_look(sub) -> None:
    p = sub.add_parser(
        "second-look",
        help="train a classifier that rescores a version's detections, register the pair",
        description="The paper's score-level fusion of two networks. Run the version (with its post-processing "
        "and any test-time flips) on the whole images of its training split, label each kept "
        "detection true or false positive, and train a ResNet-18 on a second_look.crop px square "
        "around each. On the val split, choose the fusion weight w of (1-w) x detector + w x "
        "classifier with the lowest FDR at the detection rate the version reaches alone, and the "
        "highest threshold that keeps that rate. Logged as a nested run of the version's run "
        "(figures/second_look_val.png, second_look_weights.json) and registered as a new version "
        "holding both networks, with the configured alias.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m detection second-look --model models:/brecahad-faster-rcnn/3 --data-dir data/demo\n"
        "  python -m detection second-look --data-dir data/demo -o 'second_look.epochs=3 second_look.crop=96'\n",
    )
    _model_option(p, choices.CHALLENGER)
    p.add_argument("--data-dir", required=True, type=Path, help="the BreCaHAD folder the version was trained on")
    p.add_argument(
        "-o",
        "--overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="second_look.* settings: epochs (10), lr (1e-3), batch_size (64), crop (64 px), "
        "max_examples (20000 crops per split); weight=W fixes the fusion weight instead of "
        "searching 0, 0.05, ..., 1 on val",
    )
    p.add_argument(
        "--alias",
        default="",
        help="alias of the new version (default: the version's tracking.alias, "
        "challenger unless its config says otherwise)",
    )
    _device_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m detection", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_tune(sub)
    _add_promote(sub)
    _add_predict(sub)
    _add_slides(sub)
    _add_import(sub)
    _add_cv(sub)
    _add_compare(sub)
    _add_second_look(sub)
    _add_reregister(sub)
    _add_serve(sub)
    _add_ui(sub)

    p = sub.add_parser(
        "validate",
        aliases=["check"],
        help="check a dataset folder and list every problem",
        description="The dataset check: every image and ground-truth file of DATA_DIR (readable RGB uint8 "
        "1360x1024 TIFFs, JSON with the seven BreCaHAD keys and points in [0, 1], "
        "no image without ground truth or the reverse; a folder written by `import` has its own classes in "
        "dataset.json and RGB images of any size). Exits 1 when any problem is found. "
        "`validate` is the MLproject entry point's name; `check` is the same command.",
    )
    p.add_argument("data_dir", type=Path, help="BreCaHAD folder with images/ and groundTruth/")

    p = sub.add_parser(
        "download",
        help="fetch BreCaHAD from figshare, verify every MD5, unpack it and check it",
        description="Download the BreCaHAD dataset from its figshare record (article 7379186, "
        "doi:10.6084/m9.figshare.7379186) through figshare's public API: file list, sizes and "
        "MD5s; a progress bar; a partial file is resumed; every checksum is verified; archives "
        "are unpacked into DATA_DIR/images and DATA_DIR/groundTruth; the dataset check (`validate`) runs at the end. "
        "Offline, it says so and gives the manual steps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m detection download data/BreCaHAD && python -m detection train "
        "--config experiments/paper.yaml --data-dir data/BreCaHAD\n",
    )
    p.add_argument("data_dir", type=Path, help="folder to put images/ and groundTruth/ in")

    p = sub.add_parser(
        "synth",
        help="write an H&E-looking synthetic dataset (offline demo data)",
        description="Write synthetic images in BreCaHAD's layout: pink stroma, white lumen, large pale "
        "tumour nuclei in nests and small dark non-tumour nuclei.",
    )
    p.add_argument("out_dir", type=Path, help="folder to write images/ and groundTruth/ into")
    p.add_argument("--images", type=int, default=12, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--per-case", type=int, default=4, help="images per case (default: %(default)s)")

    p = sub.add_parser(
        "stack",
        help="start, inspect or stop the team stack on this machine (PostgreSQL, mlflow server)",
        description="The team stack on one machine: PostgreSQL (databases mlflow, mlflow_auth, optuna; a password "
        "on every connection, a role per service, none of them a superuser) and `mlflow server --app-name "
        "basic-auth` with its artifacts in the folder, reached only through the server's logins; all on "
        "127.0.0.1 with free ports and every byte in one folder, so down then up keeps every run, version "
        "and artifact. `up` starts what is not running and prints the environment clients need; `down` "
        "stops each service by its process group. Needs the team extra: pip install -e '.[team]'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='example:\n  python -m detection stack up && eval "$(python -m detection stack env)"\n'
        "  python -m detection train --data-dir data/demo -o train.epochs=1\n"
        "  python -m detection stack down\n",
    )
    p.add_argument("action", choices=choices.STACK_ACTIONS, help="up | status | env (export lines for a shell) | down")
    p.add_argument("--dir", type=Path, default=Path(".stack"), help="the stack's folder (default: %(default)s)")

    p = sub.add_parser(
        "stats",
        help="RGB mean and std of the training split, for model.image_mean/std",
        description="Measure per-channel pixel mean and std over the training split that CONFIG "
        "would make of DATA_DIR, and optionally write a config that uses them.",
    )
    p.add_argument("data_dir", type=Path, help="BreCaHAD folder with images/ and groundTruth/")
    p.add_argument("--config", default=choices.STATS_CONFIG, help="config whose split to use (default: %(default)s)")
    p.add_argument(
        "--write", type=Path, metavar="YAML", help="write a config inheriting --config with these statistics"
    )
    return parser


def cmd_train(args) -> int:
    from . import tracking
    from .train import train

    overrides = [o for o in args.overrides if o.strip()]
    if args.resume and overrides:
        print("note: --resume continues with the run's recorded config; overrides are ignored", file=sys.stderr)
    cfg = None if args.resume else config_mod.load(args.config, overrides)
    run_id, version = train(cfg, args.data_dir, args.resume or None)
    experiment = tracking.get_run(run_id).info.experiment_id
    print(f"run {run_id} finished; registered version {version}. {_ui_hint(experiment)}")
    return 0


UI_HOST, UI_PORT = "127.0.0.1", 5000


def _ui_hint(experiment_id: str) -> str:
    """How to look at an experiment's runs: the one UI command, and the URL of its runs table."""
    from . import tracking

    uri = tracking.client().tracking_uri
    if uri.startswith("http"):
        return f"Its runs: {tracking.runs_url(uri, experiment_id)}"
    default = uri in (DEFAULT_STORE, f"sqlite:///{Path.cwd() / 'mlflow.db'}")  # MLflow makes the default absolute
    ui = "python -m detection ui" if default else f"python -m detection ui --store {uri}"
    return f"Start the UI with `{ui}` and open {tracking.runs_url(f'http://{UI_HOST}:{UI_PORT}', experiment_id)}"


DEFAULT_STORE = "sqlite:///mlflow.db"


def cmd_ui(args) -> int:
    """`mlflow ui` on a local store, after printing the URL that opens on the experiment's runs."""
    import subprocess

    from . import tracking

    store = args.store or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if store.startswith("http"):
        print(f"{store} is a tracking server, which serves its own UI: open it in a browser", file=sys.stderr)
        return 0
    os.environ["MLFLOW_TRACKING_URI"] = store
    found = tracking.client().get_experiment_by_name(args.experiment)
    if found is None:
        raise tracking.TrackingError(
            f"no experiment {args.experiment!r} in {store}; train first (make demo), or pass --store or --experiment"
        )
    url = tracking.runs_url(f"http://{args.host}:{args.port}", found.experiment_id)
    print(f"MLflow UI of {store}: open {url}  (Ctrl-C stops it)", flush=True)
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store]
    try:
        return subprocess.call([*command, "--host", args.host, "--port", str(args.port)])
    except KeyboardInterrupt:
        return 0


def cmd_cv(args) -> int:
    from .crossval import leave_one_case_out

    cfg = config_mod.load(args.config, [o for o in args.overrides if o.strip()])
    cases = [c for c in args.cases.replace(",", " ").split() if c]
    run_id, metrics = leave_one_case_out(cfg, args.data_dir, cases or None)

    def shown(k: str) -> str:
        low, high = metrics.get(f"{k}_ci_low"), metrics.get(f"{k}_ci_high")
        return f"cv/{k}={metrics[k]:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None else " (no interval)")

    print(
        f"run {run_id}: {metrics['n_cases']} held-out cases, "
        + "  ".join(shown(k) for k in ("detection_rate", "fdr", "f1"))
    )
    return 0


def cmd_compare(args) -> int:
    from .compare import CompareRequest, compare, figure_columns
    from .evaluate import EvaluationError

    models = tuple(m for arg in args.models for m in arg.split())
    try:
        targets = tuple(float(t) for t in args.targets.replace(",", " ").split())
    except ValueError:
        raise EvaluationError(
            f"--targets {args.targets!r}: give numbers, detection rates such as '0.90 0.95 0.99' (fdr axis) "
            f"or false positives per mm² such as '10 50 100' (froc axis)"
        ) from None
    req = CompareRequest(
        models,
        args.data_dir,
        args.split,
        args.protocol,
        targets=targets,
        axis=args.axis,
        match_radius_um=args.match_radius_um,
    )
    run_id, table = compare(req)
    print(table[["version", *figure_columns(table)]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"run {run_id}: figures/{'dr_vs_fdr' if args.axis == 'fdr' else 'froc'}.png and comparison.json")
    return 0


def cmd_serve(args) -> int:
    import signal
    import subprocess

    from . import tracking

    ref = tracking.resolve_model(args.model)
    with tracking.verified_copy(ref.pinned) as path:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            str(path),
            "--env-manager",
            "local",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--workers",
            str(args.workers),
        ]
        env = dict(os.environ) | {
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(args.timeout),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",  # uvicorn from the venv
        }
        print(f"serving {ref.pinned} on http://{args.host}:{args.port}/invocations", file=sys.stderr)
        server = subprocess.Popen(command, env=env)
        # A SIGTERM (a supervisor stopping us) ends the server and still removes the copy.
        signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        try:
            return server.wait()
        except KeyboardInterrupt:
            server.terminate()
            server.wait(timeout=60)
            raise


def cmd_reregister(args) -> int:
    from .train import reregister

    run_id, version = reregister(args.model)
    print(f"run {run_id}: registered version {version} from {args.model}'s config and weights")
    return 0


def request(cls, args: argparse.Namespace, **given):
    """A command's request (a dataclass) from the parsed options of its fields' names; `given`
    holds the fields whose option needs parsing first."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: getattr(args, n) for n in names if n not in given and hasattr(args, n)} | given)


def cmd_second_look(args) -> int:
    from .second_look_train import SecondLookRequest, second_look

    overrides = tuple(o for o in args.overrides if o.strip())
    run_id, version, summary = second_look(request(SecondLookRequest, args, overrides=overrides))
    print(
        f"run {run_id}: weight {summary['weight']:g}, threshold {summary['thresh']:g}; on val at detection rate "
        f"{summary['val_detection_rate']:.4f} the FDR goes from {summary['val_fdr_alone']:.4f} to "
        f"{summary['val_fdr']:.4f} ({summary['train_examples']} training crops, "
        f"{summary['train_true_positives']} true positives); registered version {version}."
    )
    return 0


def cmd_slides(args) -> int:
    from .slide_job import SlidesRequest, slides

    paths = tuple(Path(p) for arg in args.slides for p in str(arg).split())  # `mlflow run` joins them
    run_id, summaries = slides(request(SlidesRequest, args, slides=paths))
    for s in summaries:
        per = ", ".join(f"{k} {v:.1f}/mm2" for k, v in s["per_mm2"].items()) or "no detection"
        print(f"{s['slide']}: {s['detections']} detections on {s['tissue_mm2']:.3f} mm2 of tissue ({per})")
    print(f"run {run_id}: {len(summaries)} slide(s) in {args.out}")
    return 0


def cmd_import(args) -> int:
    from .annotations import ImportRequest, run_import

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    run_id, ds = run_import(request(ImportRequest, args, classes=classes))
    counts = ", ".join(f"{c} {n}" for c, n in ds.counts().items())
    print(f"{args.out}: {len(ds.images)} images at {ds.mpp:g} um/px; cells {counts}")
    if ds.unannotated:
        kept = ", ".join(ds.unannotated[:8])
        print(f"  {len(ds.unannotated)} image(s) without annotations, kept as images with no cell: {kept}")
    if ds.skipped:
        print(f"  {ds.skipped} unclassified object(s) left out; --default-class NAME keeps them")
    train = f"python -m detection train --config experiments/smoke.yaml --data-dir {args.out} -o 'data.classes=[all]'"
    print(f"run {run_id}. Next: {train}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import Request, evaluate

    run_id, metrics = evaluate(request(Request, args, allow_overlap=args.allow_overlap == "true"))
    keys = ("detection_rate", "fdr", "precision", "f1", "fp_per_mm2", "froc", "ap", "box_ap50")
    print(f"run {run_id}: " + "  ".join(f"{args.split}/{k}={metrics[k]:.4f}" for k in keys))
    return 0


def cmd_tune(args) -> int:
    from .tune import TuneRequest, parse_ranges, tune

    req = request(
        TuneRequest,
        args,
        storage=args.storage or os.environ.get("BRECAHAD_OPTUNA_STORAGE") or None,
        ranges=parse_ranges(args.range),
        train_overrides=tuple(args.train_overrides.split()),
    )
    parent, result, recovered = tune(req)
    for line in recovered:
        print(line)
    print(f"study {args.study}: parent run {parent}")
    if result and result.get("unchanged"):
        print(
            f"trial {result['trial']} is still the study's choice; version {result['version']} already carries it, "
            f"so nothing new was registered"
        )
    elif result:
        print(
            f"chose trial {result['trial']} {result['params']}; registered version {result['version']} "
            f"as challenger; test: " + "  ".join(f"{k}={v:.4f}" for k, v in result["test"].items())
        )
    else:
        print(
            "other workers are still running trials (their heartbeats are fresh); the last one to finish "
            "registers the result"
        )
    return 0


def cmd_promote(args) -> int:
    from .promote import PromoteRequest, promote

    result = promote(
        PromoteRequest(
            args.candidate,
            args.data_dir,
            args.metric,
            args.min_delta,
            args.rollback == "true",
            args.protocol,
            args.matching,
            match_radius_um=args.match_radius_um,
        )
    )
    # Before: "(run X)" named the promotion's run as if it were the champion's.
    print(
        f"{result['decision']}: {result['reason']}; champion is version {result['champion']} "
        f"(trained in run {result['champion_run']}); the decision is run {result['run_id']}"
    )
    return 0


def cmd_predict(args) -> int:
    import json

    import pandas as pd

    from . import figures, tracking
    from .export import to_geojson
    from .predict import InputError, as_images, decode_image

    # `mlflow run` passes several images as one space-separated parameter. Every image is read and
    # checked before the model loads, so a bad file fails in a second with its name.
    paths = [Path(p) for arg in args.images for p in str(arg).split()]
    outputs: dict[str, Path] = {}
    for path in paths:  # out/NAME.json per image: two images of one name would overwrite each other
        if path.stem.lower() in outputs:
            raise InputError(
                f"{outputs[path.stem.lower()]} and {path} would both be written to {args.out / path.stem}.*: "
                f"give the images distinct names, or predict them into separate --out folders"
            )
        outputs[path.stem.lower()] = path
    images = []
    for path in paths:
        try:
            images.append((path, as_images(pd.DataFrame({"image": [decode_image(path.read_bytes())]}))[0]))
        except (OSError, InputError) as e:
            raise InputError(f"{path}: {e}") from None
    ref = tracking.resolve_model(args.model)
    if args.device:
        os.environ["BRECAHAD_DEVICE"] = args.device  # read by the pyfunc when it loads
    detector = tracking.load_model(ref)
    print(f"{ref.pinned} on {detector.runtime.describe()}", file=sys.stderr)
    launched = tracking.name_launched_run(f"predict v{ref.version}", {tracking.TAG + "model": ref.pinned})
    args.out.mkdir(parents=True, exist_ok=True)
    outputs: list[Path] = []
    for path, image in images:
        table = detector.predict(None, pd.DataFrame({"image": [image]}))
        written = []
        if args.format in ("json", "both"):
            doc = {
                "image": str(path),
                "model": ref.pinned,
                "detections": table.drop(columns="image").to_dict("records"),
            }
            written.append(args.out / f"{path.stem}.json")
            written[-1].write_text(json.dumps(doc, indent=1))
        if args.format in ("geojson", "both"):
            written.append(args.out / f"{path.stem}.geojson")
            written[-1].write_text(json.dumps(to_geojson(table, ref.pinned)))
        boxes = table[["x1", "y1", "x2", "y2"]].to_numpy()
        fig = figures.overlay(image, boxes[:0], boxes, table["score"].to_numpy(), f"{path.name}, {ref.pinned}")
        fig.savefig(args.out / f"{path.stem}.png")
        figures.close(fig)
        outputs += [*written, args.out / f"{path.stem}.png"]
        print(f"{path}: {len(table)} detections -> {', '.join(str(w) for w in written)}")
    if launched:  # under `mlflow run` the run holds what it predicted
        for path in outputs:
            tracking.client().log_artifact(launched, str(path), "predictions")
    return 0


def _report(data_dir: Path, problems: list[str], found: str, valid: str) -> int:
    """Every problem on a line of its own, then a summary; exit 1 when there is any."""
    for p in problems:
        print(p)
    if problems:
        print(f"{data_dir}: {found}{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{data_dir}: {valid}")
    return 0


def cmd_download(args) -> int:
    from .download import download

    return _report(args.data_dir, download(args.data_dir), "downloaded, but ", "BreCaHAD downloaded, checked and valid")


def cmd_check(args) -> int:
    from .data import check_dataset

    return _report(args.data_dir, check_dataset(args.data_dir), "", "valid")


def cmd_synth(args) -> int:
    from .progress import Bar
    from .synth import write_dataset

    if args.images < 1 or args.per_case < 1:
        raise config_mod.ConfigError(f"--images={args.images} and --per-case={args.per_case} must be >= 1")
    with Bar(args.images, "synth", every=1) as bar:
        write_dataset(args.out_dir, args.images, args.seed, args.per_case, on_image=bar.advance)
    print(f"wrote {args.images} images to {args.out_dir}")
    return 0


def cmd_stack(args) -> int:
    from . import stack

    if args.action == "up":
        start = time.monotonic()
        running = stack.up(args.dir)
        print(f"stack up in {time.monotonic() - start:.1f} s ({args.dir})", file=sys.stderr)
        print("\n".join(stack.exports(running)))
    elif args.action == "env":
        running = stack.Stack.load(args.dir)
        if running is None or not all(running.alive().get(s) for s in stack.ORDER):
            raise stack.StackError(f"the stack in {args.dir} is not up: python -m detection stack up --dir {args.dir}")
        print("\n".join(stack.exports(running)))
    elif args.action == "status":
        print("\n".join(stack.status(args.dir)))
    else:
        stopped = stack.down(args.dir)
        print(f"stopped {', '.join(stopped) or 'nothing (no service was running)'}")
    return 0


def cmd_stats(args) -> int:
    from .data import load_dataset
    from .progress import Bar
    from .split import make_split
    from .stats import as_config, channel_stats

    cfg = config_mod.load(args.config)
    samples = load_dataset(args.data_dir)
    split = make_split(samples, cfg.data.split, {s.name: "" for s in samples})
    train = [s for s in samples if s.name in set(split.train)]
    with Bar(len(train), "stats", every=10) as bar:
        stats = channel_stats(train, on_image=bar.advance)
    print(f"training split of {args.data_dir}: {stats.images} images")
    print(f"  image_mean {list(stats.mean)}")
    print(f"  image_std  {list(stats.std)}")
    print(f"  variance of per-image means {list(stats.var_of_image_means)} (cf. the paper's image_std)")
    if args.write:
        base = os.path.relpath(Path(args.config).resolve(), args.write.resolve().parent)
        args.write.write_text(as_config(stats, base, args.data_dir.name))
        print(f"wrote {args.write}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "cv": cmd_cv,
    "compare": cmd_compare,
    "evaluate": cmd_evaluate,
    "tune": cmd_tune,
    "promote": cmd_promote,
    "predict": cmd_predict,
    "slides": cmd_slides,
    "import": cmd_import,
    "validate": cmd_check,
    "check": cmd_check,
    "synth": cmd_synth,
    "stats": cmd_stats,
    "stack": cmd_stack,
    "second-look": cmd_second_look,
    "reregister": cmd_reregister,
    "serve": cmd_serve,
    "ui": cmd_ui,
    "download": cmd_download,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports, so --help answers at once
    # MLflow's tqdm "Downloading artifacts" bars would cut through the project's own progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    try:
        code = COMMANDS[args.command](args)
        _name_launched_run(args.command, code)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        _fail_launched_run(e)
        if not isinstance(e, DetectionError):
            raise  # a bug: keep the traceback
        print(f"error: {e}" + (f"; {e.advice}" if e.advice else ""), file=sys.stderr)
        return e.exit_code


def _name_launched_run(command: str, code: int) -> None:
    if os.environ.get("MLFLOW_RUN_ID"):
        from . import tracking

        tracking.name_unnamed_launched_run(command if code == 0 else f"{command} failed")


def _fail_launched_run(error: Exception) -> None:
    """Mark the run `mlflow run` launched for this command FAILED, with the error, unless the
    command already ended it. A store that cannot be reached must not hide the first error."""
    if not os.environ.get("MLFLOW_RUN_ID") or getattr(error, "offline", False):
        return
    from . import tracking

    try:
        tracking.fail_launched_run(error, getattr(error, "problems", None))
    except Exception as e:  # say so, then let the first error through
        print(f"warning: could not mark the launched run FAILED: {e}", file=sys.stderr)
