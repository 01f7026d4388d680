"""Every choice and default the entry points offer, written once. The CLI's options, the request
dataclasses (evaluate, tune, promote, compare) and the config read them from here, and
tests/test_packaging.py checks MLproject's parameters against them. Light on purpose (no torch,
no mlflow), so `python -m detection --help` answers at once.

In each tuple of choices the first is the default.
"""

from __future__ import annotations

# The registry: one model name, and the aliases the workflow moves.
MODEL_NAME = "brecahad-faster-rcnn"
CHALLENGER = "challenger"  # set by train, tune and second-look on what they register
CHAMPION = "champion"  # set by promote; what predict and serving use
PREVIOUS = "previous"  # the champion before the last promotion, for a rollback
PROMOTED_ALIASES = (CHAMPION, PREVIOUS)  # moved by `promote` alone, behind its evaluation and lock


def promoted_alias_problem(alias: str) -> str | None:
    """Why a command other than `promote` may not set this alias, or None."""
    if alias in PROMOTED_ALIASES:
        return (
            f"alias {alias!r} is moved only by `promote`, which evaluates the version against the champion "
            f"first; register as {CHALLENGER!r} (or another alias) and promote it"
        )
    return None


def model_uri(alias: str) -> str:
    return f"models:/{MODEL_NAME}@{alias}"


# Evaluation.
SPLITS = ("test", "val", "all")  # the recorded held-out images, or every image of a new folder
PROTOCOLS = ("whole", "paper")  # every cell of whole images once, or the paper's 10 random patches
MATCHERS = ("greedy", "hungarian", "iou")  # how a detection and a cell are paired (matching.py)
PREFIX_MATCHERS = ("greedy", "iou")  # those under which a higher threshold's matches are a prefix
COMPARE_AXES = ("fdr", "froc")  # FDR at equal detection rate, or detection rate at equal FP per mm²
COMPARE_TARGETS = ""  # empty: the axis's own (compare.TARGETS)
BOOLEANS = ("false", "true")  # MLproject passes every parameter as a string

# Tuning.
TUNE_KINDS = ("postprocess", "training")  # replay cached predictions, or train a model per trial
OBJECTIVES = ("f1", "recall_at_fdr", "pareto", "froc")
TUNE_TRIALS = 100
# auto: TPE while the study stays within TPE_MAX_TRIALS trials, QMC beyond. TPE models every earlier
# trial at each new one (69 ms a trial at 1,500 trials here, growing with the study); a scrambled
# Sobol sequence (qmc) costs the same at any size and covers the thresholds evenly.
TUNE_SAMPLERS = ("auto", "tpe", "qmc", "random")
TPE_MAX_TRIALS = 1000
TUNE_STUDY = "postprocess"  # the study name a tune without --study resumes
TUNE_MAX_FDR = 0.2
TUNE_HEARTBEAT = 30.0  # seconds; a trial silent 3x this long is failed and run again
TUNE_STORAGE = "optuna-journal.log"  # beside mlflow.db: a journal file takes several workers
TUNE_RANGES = {
    "score_thresh": (0.0, 0.95),
    "nms_thresh": (0.1, 0.9),
    "detections_per_img": (10, 1000),
    "tta_thresh": (0.0, 0.95),  # the fused score threshold, searched for versions with test-time flips
    "lr": (1e-5, 1e-3),
    "rpn_fg_iou_thresh": (0.5, 0.9),
    "rpn_bg_iou_thresh": (0.1, 0.4),
    "box_fg_iou_thresh": (0.5, 0.9),
    "box_bg_iou_thresh": (0.1, 0.5),
}
TTA_VIEWS = ("none", "h", "v", "hv")  # the image, left-right, top-bottom and both flips (tta.py)

# Promotion.
PROMOTE_METRIC = "val/f1"  # test is reported beside it, not decided on (docs/serving.md)

# Everything else.
CONFIG = "experiments/smoke.yaml"  # train and cv
STATS_CONFIG = "experiments/paper.yaml"
PREDICT_FORMATS = ("json", "geojson", "both")  # geojson: points QuPath imports
STACK_ACTIONS = ("up", "status", "env", "down")
