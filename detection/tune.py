"""Optuna studies over the thresholds that decide what the detector keeps, tracked in MLflow.

`postprocess` studies replay the cached raw predictions of the validation split: a trial costs
microseconds, not an inference pass. `training` studies train one model per trial (a nested run)
over the training-time IoU thresholds and the learning rate, pruned on the validation metric.

One parent MLflow run per study; workers on one storage share it. A training trial is a nested run
of its own. A postprocess trial costs less than a store write, so its figures are series on the
parent run (step: trial number), written a batch at a time; when the study ends the parent gets
every trial as one table with its figures, and nested runs for the trials a user looks at (the
chosen one, the Pareto front, the top ten). When a worker ends and no trial is still running, it
evaluates the chosen point once on the test split, registers a version carrying it, and gives
that version the alias `challenger`.

Optuna's storage keeps every trial: its user attributes `settings` (what the version would run)
and `val` (its validation counts and rates), one write each.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from . import figures, model_card, tracking
from .choices import (
    OBJECTIVES,
    PROTOCOLS,
    TPE_MAX_TRIALS,
    TUNE_HEARTBEAT,
    TUNE_KINDS,
    TUNE_MAX_FDR,
    TUNE_RANGES,
    TUNE_SAMPLERS,
)
from .config import Config
from .evaluate import (
    Request,
    cached_evaluation,
    evaluate,
    judge,
    load_view_caches,
    log_report,
    operating_metrics,
    recorded_split,
    select,
)
from .inference import Cache
from .matching import Counts
from .metrics import Replayer, froc, score
from .pipeline import Pipeline, replay_stages
from .postprocess import PostProcess
from .predict import log_detector
from .studies import (
    Study,
    TuneError,
    default_storage,
    open_storage,
    redact,
    run,
    study_lock,
)

NMS_STEP = 0.05  # NMS runs once per distinct IoU value, so the IoU search is on a grid
# Where top-k binds in a tile the replay builds a plan per (image, IoU, k) once: k is searched on
# this log grid (x 10^n), so a long study reuses its plans instead of building one a trial (1.9 ms
# each, 90% of a trial on the real sample's whole images).
TOPK_SERIES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
TOP_K = 10  # a postprocess study's best trials that get a nested run of their own
SERIES = ("detection_rate", "fdr", "f1", "froc")  # a trial's figures charted on the parent run (trial/...)


class Pruned(optuna.TrialPruned):
    run_status = "KILLED"  # a pruned trial's nested run was stopped on purpose, it did not fail


@dataclass(frozen=True)
class TuneRequest:
    model: str
    data_dir: Path
    study: str
    n_trials: int
    storage: str | None = None
    kind: str = TUNE_KINDS[0]
    objective: str = OBJECTIVES[0]
    max_fdr: float = TUNE_MAX_FDR  # the FDR bound of recall_at_fdr
    protocol: str = PROTOCOLS[0]  # tune on the protocol that is deployed: whole images
    seed: int | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    train_overrides: tuple[str, ...] = ()  # for training studies, e.g. train.epochs=1
    heartbeat: float = TUNE_HEARTBEAT  # seconds between a running trial's heartbeats
    sampler: str = TUNE_SAMPLERS[0]

    @property
    def storage_url(self) -> str:
        """The study's storage: as given, else a journal file beside the local tracking store."""
        return self.storage or default_storage()

    @property
    def stale_after(self) -> float:
        """A running trial without a heartbeat for this long belongs to a dead worker."""
        return 3 * self.heartbeat

    def space(self) -> dict[str, tuple[float, float]]:
        return TUNE_RANGES | self.ranges

    def check(self) -> None:
        if self.kind not in TUNE_KINDS:
            raise TuneError(f"kind={self.kind!r} must be one of {', '.join(TUNE_KINDS)}")
        if self.objective not in OBJECTIVES:
            raise TuneError(f"objective={self.objective!r} must be one of {', '.join(OBJECTIVES)}")
        if self.sampler not in TUNE_SAMPLERS:
            raise TuneError(f"sampler={self.sampler!r} must be one of {', '.join(TUNE_SAMPLERS)}")
        if self.n_trials <= 0:
            raise TuneError(f"n_trials={self.n_trials} must be > 0")
        if self.objective == "froc" and self.kind != "postprocess":
            raise TuneError(
                "objective=froc reads each trial's detection rate at 10-300 false positives per mm² off its "
                "replayed curve: use kind=postprocess (a training trial's validation has no such curve)"
            )
        if not 0 < self.max_fdr < 1:
            raise TuneError(f"max_fdr={self.max_fdr} must be in (0, 1)")
        if not self.study:
            raise TuneError("study must name the study, e.g. -P study=nms-sweep")
        for name, (low, high) in self.ranges.items():
            if name not in TUNE_RANGES:
                raise TuneError(f"range {name!r} is unknown; tunable: {', '.join(TUNE_RANGES)}")
            if low > high:
                raise TuneError(f"range {name}={low}:{high} has low > high; write it as {high}:{low}")
        space = self.space()
        for name in (
            "score_thresh",
            "nms_thresh",
            "tta_thresh",
            "rpn_fg_iou_thresh",
            "rpn_bg_iou_thresh",
            "box_fg_iou_thresh",
            "box_bg_iou_thresh",
        ):
            low, high = space[name]
            if not 0 <= low <= high <= 1:
                raise TuneError(f"range {name}={low}:{high} must lie within [0, 1]")
        if space["detections_per_img"][0] < 1 or space["lr"][0] <= 0:
            raise TuneError("detections_per_img must be >= 1 and lr > 0")
        if self.heartbeat <= 0:
            raise TuneError(f"heartbeat={self.heartbeat} must be > 0 seconds")


def parse_ranges(items: list[str]) -> dict[str, tuple[float, float]]:
    """`["score_thresh=0.01:0.5", ...]` as {name: (low, high)}."""
    out = {}
    for item in [t for i in items for t in i.split()]:
        name, sep, span = item.partition("=")
        low, colon, high = span.partition(":")
        try:
            out[name] = (float(low), float(high))
        except ValueError:
            raise TuneError(f"range {item!r} is not NAME=LOW:HIGH, e.g. score_thresh=0.01:0.5") from None
        if not sep or not colon:
            raise TuneError(f"range {item!r} is not NAME=LOW:HIGH, e.g. score_thresh=0.01:0.5")
    return out


# --- objectives -------------------------------------------------------------------------------


def objective_values(
    objective: str, counts: Counts, max_fdr: float, froc_score: float | None = None
) -> float | tuple[float, float]:
    if objective == "f1":
        return counts.f1
    if objective == "froc":
        return froc_score
    if objective == "recall_at_fdr":
        fdr = counts.false_discovery_rate
        # Infeasible points score below every feasible one, closer to feasible scoring higher.
        return counts.detection_rate if fdr <= max_fdr else -(fdr - max_fdr)
    return counts.detection_rate, counts.false_discovery_rate


def directions(objective: str) -> list[str]:
    return ["maximize", "minimize"] if objective == "pareto" else ["maximize"]


def nms_grid(low: float, high: float) -> np.ndarray:
    """The NMS IoU values searched: multiples of NMS_STEP within [low, high], both ends included.
    Counted in whole steps, so float rounding cannot drop the top value (0.3:0.7 reaches 0.7)."""
    first, last = int(np.ceil(round(low / NMS_STEP, 6))), int(np.floor(round(high / NMS_STEP, 6)))
    return np.round(np.arange(first, max(first, last) + 1) * NMS_STEP, 6)


def topk_grid(low: float, high: float) -> np.ndarray:
    """The detections-per-input values searched: TOPK_SERIES x 10^n within [low, high], both ends included."""
    low, high = int(np.ceil(low)), int(np.floor(high))
    decades = 10.0 ** np.arange(0, int(np.log10(max(high, 1))) + 1)
    grid = np.round(np.outer(decades, TOPK_SERIES).ravel()).astype(int)
    return np.unique(np.concatenate([[low, high], grid[(grid > low) & (grid < high)]]))


def suggest_postprocess(trial: optuna.Trial, space: dict, multiclass: bool) -> PostProcess:
    grid, topk = nms_grid(*space["nms_thresh"]), topk_grid(*space["detections_per_img"])
    pp = PostProcess(
        score_thresh=trial.suggest_float("score_thresh", *space["score_thresh"]),
        # NMS runs once per IoU value, and a plan is made once per top-k: both are steps on a grid.
        nms_thresh=float(grid[trial.suggest_int("nms_step", 0, len(grid) - 1)]),
        detections_per_img=int(topk[trial.suggest_int("topk_step", 0, len(topk) - 1)]),
        # With one foreground class, per-class and class-agnostic NMS are the same thing.
        class_agnostic=trial.suggest_categorical("class_agnostic", [False, True]) if multiclass else False,
    )
    return pp


# A trial's record in Optuna's storage. Studies made before issue 26 wrote each entry as an attribute
# of its own (pp.score_thresh, f1, tta.tta_thresh...), fifteen storage writes a trial; they still resume.


def trial_settings(trial: optuna.trial.FrozenTrial) -> dict:
    """What the version would run at this trial: PostProcess's fields, and tta_thresh and
    class_score_thresh where searched."""
    if "settings" in trial.user_attrs:
        return trial.user_attrs["settings"]
    attrs = trial.user_attrs
    out = {k[3:]: v for k, v in attrs.items() if k.startswith("pp.") and k != "pp.class_score_thresh"}
    if "tta.tta_thresh" in attrs:
        out["tta_thresh"] = attrs["tta.tta_thresh"]
    if "pp.class_score_thresh" in attrs:
        out["class_score_thresh"] = attrs["pp.class_score_thresh"]
    return out


def trial_metrics(trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's validation counts and rates (operating_metrics, and the FROC where read)."""
    if "val" in trial.user_attrs:
        return trial.user_attrs["val"]
    return {k: v for k, v in trial.user_attrs.items() if "." not in k and k != "heartbeat"}


def trial_postprocess(trial: optuna.trial.FrozenTrial) -> PostProcess:
    settings = trial_settings(trial)
    return PostProcess(**{k: settings[k] for k in PostProcess.__dataclass_fields__})


def choose(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The operating point: the best trial, or on a Pareto front the one with the best F1."""
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: (trial_metrics(t)["f1"], t.number))


def make_sampler(name: str, seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler `name` asks for; auto is TPE for a study of at most TPE_MAX_TRIALS trials in all
    (`trials`: those it has and those this worker adds), else QMC."""
    if name == "auto":
        name = "tpe" if trials <= TPE_MAX_TRIALS else "qmc"
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # "experimental" in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


# --- the study --------------------------------------------------------------------------------


def open_study(req: TuneRequest, storage, ref: tracking.ModelRef, cfg: Config, model) -> Study:
    """Create or resume the study and its parent run, one worker at a time."""
    with study_lock(req):
        study = optuna.create_study(
            study_name=req.study,
            storage=storage,
            load_if_exists=True,
            directions=directions(req.objective),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        )
        study.sampler = make_sampler(req.sampler, req.seed, len(study.get_trials(deepcopy=False)) + req.n_trials)
        attrs = study.user_attrs
        mine = {
            "model_uri": ref.uri,
            "model_name": ref.name,
            "model_version": ref.version,
            "kind": req.kind,
            "objective": req.objective,
            "max_fdr": req.max_fdr,
            "protocol": req.protocol,
        }
        for k, v in mine.items():
            if k in attrs and attrs[k] != v and k != "model_uri":
                raise TuneError(
                    f"study {req.study!r} was made with {k}={attrs[k]!r}, not {v!r}; choose another study name"
                )
        parent = attrs.get("mlflow_run_id")
        if parent is None:
            parent = tracking.create_run(
                cfg.tracking.experiment,
                f"tune {req.study}",
                {
                    "study": req.study,
                    "study_storage": redact(req.storage_url),
                    "study_kind": req.kind,
                    "objective": req.objective,
                    "model_uri": ref.uri,
                    "model_name": ref.name,
                    "model_version": ref.version,
                },
            )
            study.set_user_attr("mlflow_run_id", parent)
            for k, v in mine.items():
                study.set_user_attr(k, v)
            tracking.tag_version(ref.name, ref.version, "tune.study.", {req.study: parent})
        else:
            try:
                tracking.get_run(parent)
            except tracking.TrackingError:
                raise TuneError(
                    f"study {req.study!r} in {redact(req.storage_url)} belongs to MLflow run "
                    f"{parent}, which is not in the tracking store {tracking.client().tracking_uri}; use "
                    f"another study name or storage"
                ) from None
            tracking.client().update_run(parent, status="RUNNING")  # reopened for this worker
            if tracking.launched_run_id() != parent:
                tracking.tag_launched_run("study_parent", parent)
    return Study(req, study, parent, ref, cfg, model)


def record_trial(s: Study, trial: optuna.Trial, settings: dict, values: dict[str, float]) -> None:
    """A postprocess trial in Optuna's storage (two writes) and, when the study is tracked, its
    figures on the parent run's trial/... series, written a batch at a time."""
    trial.set_user_attr("settings", settings)
    trial.set_user_attr("val", values)
    if s.log is not None:
        s.log.add({f"trial/{k}": values[k] for k in SERIES if k in values}, trial.number)


class PipelineReplay:
    """Counts of a version whose pipeline has stages over caches (test-time flips, per-class
    thresholds), for any post-processing and stage settings, from the raw cache of each view
    (inferred once): the stages run per trial, since what post-processing keeps decides them."""

    def __init__(self, views: dict[str, Cache], radius: float):
        self.views, self.radius = views, radius

    def judged(self, pp: PostProcess, tta_thresh: float | None, class_thresh=()) -> tuple[Cache, PostProcess]:
        """What the version with these settings reports: its pipeline, run on the caches."""
        step = Pipeline(pp, self.radius, replay_stages(self.radius, tta_thresh, class_thresh)).run(self.views, [])
        return step.cache, step.pp

    def counts(self, pp: PostProcess, tta_thresh: float | None, class_thresh=()) -> Counts:
        cache, kept_pp = self.judged(pp, tta_thresh, class_thresh)
        return sum(score(cache, kept_pp, "greedy", self.radius).counts(), Counts(0, 0, 0))

    def froc(self, pp: PostProcess, tta_thresh: float | None, class_thresh=()) -> dict[str, float]:
        cache, kept_pp = self.judged(pp, tta_thresh, class_thresh)
        replayer = Replayer(cache, "greedy", self.radius)
        return froc(replayer.table(kept_pp, replayer.thresholds(kept_pp)))


def trial_class_thresh(trial: optuna.trial.FrozenTrial) -> tuple[float, ...]:
    return tuple(trial_settings(trial).get("class_score_thresh", ()))


def trial_tta_thresh(trial: optuna.trial.FrozenTrial) -> float | None:
    return trial_settings(trial).get("tta_thresh")


def postprocess_objective(s: Study, replayer: Replayer, staged: PipelineReplay | None = None):
    """Each trial's settings replayed on the val caches: the fast replay for a plain version, the
    pipeline's stages when the version has flips (whose threshold joins the search) or several
    classes (a threshold per class joins it)."""
    multiclass = s.config.model.num_classes > 2
    space = s.req.space()
    by_froc = s.req.objective == "froc"
    classes = s.config.data.classes if multiclass else ()

    def objective(trial: optuna.Trial):
        pp = suggest_postprocess(trial, space, multiclass)
        settings = dict(pp.__dict__)
        if staged is None:
            counts = replayer.counts(pp)
            reading = (lambda: froc(replayer.table(pp, replayer.thresholds(pp)))) if by_froc else dict
        else:
            tta_thresh = trial.suggest_float("tta_thresh", *space["tta_thresh"]) if s.config.eval.tta_views else None
            if tta_thresh is not None:
                settings["tta_thresh"] = tta_thresh
            per_class = tuple(trial.suggest_float(f"score_thresh.{c}", *space["score_thresh"]) for c in classes)
            if per_class:
                settings["class_score_thresh"] = list(per_class)
            counts = staged.counts(pp, tta_thresh, per_class)
            reading = (lambda: staged.froc(pp, tta_thresh, per_class)) if by_froc else dict
        curve = reading()  # the FROC of what the trial keeps, over its thresholds (objective froc only)
        record_trial(s, trial, settings, operating_metrics(counts) | curve)
        if s.req.objective == "pareto" and counts.tp + counts.fp == 0:
            # Detecting nothing has FDR 0 and would sit on the front; it is no operating point.
            raise optuna.TrialPruned("keeps no detection")
        return objective_values(s.req.objective, counts, s.req.max_fdr, curve.get("froc"))

    return objective


def training_objective(s: Study, data_dir: Path):
    from .train import train_nested

    split = recorded_split(s.ref)
    # A trial trains a new detector: no second look was fitted to it.
    base = s.config.replace("second_look.weight=0", *s.req.train_overrides)
    space = s.req.space()
    single = len(s.study.directions) == 1

    def objective(trial: optuna.Trial):
        p = {"train.lr": trial.suggest_float("lr", *space["lr"], log=True)}
        for name in ("rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh"):
            p[f"model.{name}"] = trial.suggest_float(name, *space[name])
        if (
            p["model.rpn_bg_iou_thresh"] > p["model.rpn_fg_iou_thresh"]
            or p["model.box_bg_iou_thresh"] > p["model.box_fg_iou_thresh"]
        ):
            raise optuna.TrialPruned("a background IoU threshold above its foreground one")
        cfg = base.replace(*(f"{k}={v}" for k, v in p.items()))
        last: dict[str, Counts] = {}

        def on_epoch(epoch: int, val) -> None:
            last["counts"] = val.counts
            if single:
                trial.report(float(objective_values(s.req.objective, val.counts, s.req.max_fdr)), epoch)
                if trial.should_prune():
                    raise Pruned(f"pruned after epoch {epoch + 1}")

        run_id, model_uri, _ = train_nested(cfg, data_dir, split, s.parent, f"trial {trial.number}", on_epoch)
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("model_uri", model_uri)
        trial.set_user_attr("val", operating_metrics(last["counts"]))
        return objective_values(s.req.objective, last["counts"], s.req.max_fdr)

    return objective


# --- when the study ends ----------------------------------------------------------------------


def finalize(s: Study, data_dir: Path, test_views: dict[str, Cache] | None) -> dict | None:
    """Once no trial runs: test metrics of the chosen point, figures, and a registered version."""
    with study_lock(s.req):
        trials = s.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials) or not done:
            return None  # another worker is still at it and will finish the study
        attrs = s.study.user_attrs
        chosen = choose(s.study)
        if attrs.get("registered_trial") == chosen.number:
            # The choice did not change since the last registration: no second, identical version;
            # the study's table and figures show the trials this worker added.
            with tracking.reopen(s.parent) as tr:
                log_study(tr, s, chosen)
            return {
                "trial": attrs["registered_trial"],
                "params": attrs["registered_params"],
                "version": attrs["registered_version"],
                "test": attrs["registered_test"],
                "unchanged": True,
            }
        result = _finalize(s, data_dir, test_views)
        for k in ("trial", "params", "version", "test"):
            s.study.set_user_attr(f"registered_{k}", result[k])
        return result


def _finalize(s: Study, data_dir: Path, test_views: dict[str, Cache] | None) -> dict:
    chosen = choose(s.study)
    with tracking.reopen(s.parent) as tr:
        log_study(tr, s, chosen)
        kind = KINDS[s.req.kind]
        test_metrics, chosen_params = kind.chosen_on_test(s, chosen, tr, test_views)
        tags = {
            "study": s.req.study,
            "trial": chosen.number,
            "study_kind": s.req.kind,
            "objective": s.req.objective,
            "source_version": s.ref.version,
            "tune_run_id": s.parent,
        }
        # A worker killed after registering, before the study recorded it, registered this trial already.
        version = tracking.version_with_tags(s.ref.name, {"tune_run_id": s.parent, "trial": chosen.number})
        if version is None:
            version = tracking.register(kind.chosen_model(s, chosen, tr), s.ref.name, "challenger", tags)
        else:
            tracking.client().set_registered_model_alias(s.ref.name, "challenger", str(version))
        if test_metrics is None:
            _, test_metrics = evaluate(
                Request(f"models:/{s.ref.name}/{version}", data_dir, "test", s.req.protocol), parent=s.parent
            )
        tr.set_tags({"chosen_trial": chosen.number, "registered_version": version})
        tr.log_params({f"chosen.{k}": v for k, v in chosen_params.items()})
        model_card.publish(s.ref.name, version)
    return {
        "trial": chosen.number,
        "params": chosen_params,
        "version": version,
        "test": {k: test_metrics[k] for k in ("detection_rate", "fdr", "f1")},
    }


def trial_row(t: optuna.trial.FrozenTrial, objectives: int) -> dict:
    """A trial as one row of the study's table: number, state, parameters, settings, validation
    figures and objective values (objective, or objective0, objective1...)."""
    values = t.values or [None] * objectives
    return (
        {"trial": t.number, "state": t.state.name}
        | {f"objective{i if objectives > 1 else ''}": v for i, v in enumerate(values)}
        | {f"val.{k}": v for k, v in trial_metrics(t).items()}
        | {f"settings.{k}": v if np.isscalar(v) else json.dumps(v) for k, v in trial_settings(t).items()}
        | {f"param.{k}": v for k, v in t.params.items()}
    )


def best_first(table: pd.DataFrame, study: optuna.Study) -> pd.DataFrame:
    """The study's table with its best trials first: by the objective, or the Pareto front first
    and then by F1. The UI previews the first 500 rows of a CSV."""
    if len(study.directions) == 1:
        ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
        return table.sort_values(["objective", "trial"], ascending=[ascending, True], na_position="last")
    front = table["trial"].isin([t.number for t in study.best_trials])
    ranked = table.assign(_front=front).sort_values(["_front", "val.f1", "trial"], ascending=[False, False, True])
    return ranked.drop(columns="_front")


def log_study(tr: tracking.Tracker, s: Study, chosen: optuna.trial.FrozenTrial) -> None:
    """What a study's end tracks on its parent run: every trial's table and the figures, and a
    nested run for each trial a user opens (a training trial is one already)."""
    _log_study_figures(tr, s, chosen)
    KINDS[s.req.kind].log_looked_at(s, chosen)


def _log_study_figures(tr: tracking.Tracker, s: Study, chosen: optuna.trial.FrozenTrial) -> None:
    """The study's every trial as a table (study_trials.json for mlflow.load_table, in trial order;
    study_trials.csv for the UI's table view, best first) and its figures: history or Pareto front,
    parallel coordinates, the trade-off."""
    from optuna.visualization import matplotlib as ovm

    table = pd.DataFrame([trial_row(t, len(s.study.directions)) for t in s.study.get_trials(deepcopy=False)])
    tracking.delete_artifacts(tr.run_id, ["study_trials.json"])  # log_table appends to a table already there
    tr.client.log_table(tr.run_id, table, "study_trials.json")
    tr.client.log_text(tr.run_id, best_first(table, s.study).to_csv(index=False), "study_trials.csv")
    multi = len(s.study.directions) > 1
    # Optuna's plots switch matplotlib to its own style globally; rc_context puts it back.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if multi:
            front = [
                {"trial": t.number, **t.params, **trial_settings(t), "detection_rate": t.values[0], "fdr": t.values[1]}
                for t in s.study.best_trials
            ]
            tracking.delete_artifacts(tr.run_id, ["pareto_front.json"])
            tr.client.log_table(tr.run_id, pd.DataFrame(front), "pareto_front.json")
            history = ovm.plot_pareto_front(s.study, target_names=["detection rate", "FDR"])
            lines = ovm.plot_parallel_coordinate(s.study, target=lambda t: t.values[0], target_name="detection rate")
        else:
            history = ovm.plot_optimization_history(s.study)
            lines = ovm.plot_parallel_coordinate(s.study, target_name=s.req.objective)
        for ax, name in ((history, "study"), (lines, "parallel_coordinates")):
            fig = ax.figure
            fig.set_size_inches(9 if name == "parallel_coordinates" else 8, 5)
            tr.client.log_figure(tr.run_id, fig, f"figures/{name}.png")
            figures.close(fig)
    complete = s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    done = [{"trial": t.number, **trial_metrics(t)} for t in complete]
    fig = figures.tradeoff(done, chosen.number, s.req.study)
    tr.client.log_figure(tr.run_id, fig, "figures/tradeoff.png")
    figures.close(fig)


def looked_at(study: optuna.Study, chosen: optuna.trial.FrozenTrial, k: int = TOP_K) -> list[optuna.trial.FrozenTrial]:
    """The trials a user opens: the chosen one, the Pareto front (several objectives) or the best
    `k` (one), in that order, each once."""
    if len(study.directions) > 1:
        best = sorted(study.best_trials, key=lambda t: t.number)
    else:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        best = sorted(done, key=lambda t: (-sign * t.value, t.number))[:k]
    return [chosen] + [t for t in best if t.number != chosen.number]


def check_inputs(req: TuneRequest, ref: tracking.ModelRef, cfg: Config) -> None:
    """Everything a study needs, checked before it writes a study, a run or a tag: the recorded
    split, its val and test images in the folder, and the training overrides."""
    split = recorded_split(ref)
    for part in ("val", "test"):
        select(Request(ref.pinned, req.data_dir, part, req.protocol), split)
    KINDS[req.kind].check(req, ref, cfg)


def tune(req: TuneRequest) -> tuple[str, dict | None, list[str]]:
    """Run (or resume) a study; returns the parent run id, what this worker chose and registered
    if it finished the study, and a line per trial of a dead worker that it failed and re-ran."""
    req.check()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports trials
    tracking.check_reachable()
    # Everything that can be refused is checked before the storage, its journal or a lock is made.
    url = req.storage_url
    ref = tracking.resolve_model(req.model)
    detector = tracking.load_model(ref)
    cfg = detector.config
    check_inputs(req, ref, cfg)
    kind = KINDS[req.kind]
    storage = open_storage(url, req.heartbeat if kind.beats else None)
    tracking.ensure_store()
    s = open_study(req, storage, ref, cfg, detector.model)
    s.log = tracking.StepLog(s.parent) if not kind.beats else None
    objective, test_views = kind.prepare(s)
    lines = run(s, objective, kind.beats)
    return s.parent, finalize(s, req.data_dir, test_views), lines


# --- the two kinds of study -------------------------------------------------------------------


class PostprocessStudy:
    """Thresholds, NMS and top-k (and the fused threshold of a version with flips), replayed from
    the source version's raw caches: one inference pass on val and one on test, whatever the trials."""

    what = "post-processing"
    beats = False  # a trial takes milliseconds: no heartbeat, and its figures are series on the parent

    @staticmethod
    def check(req: TuneRequest, ref: tracking.ModelRef, cfg: Config) -> None:
        if cfg.second_look.weight > 0:
            raise TuneError(
                f"{ref.pinned} carries a second look (second_look.weight={cfg.second_look.weight}), which "
                f"was fitted to the detections of its source version's post-processing; tune that source "
                f"version (second_look_of tag), then run `second-look` on the tuned version"
            )

    @staticmethod
    def prepare(s: Study):
        """The objective, and the raw test caches the chosen trial is judged on."""
        req, ref, cfg = s.req, s.ref, s.config
        # Pinned to the resolved version: an alias may move while the study runs. Workers take
        # turns, so the first one's inference pass serves the others.
        with study_lock(req):
            val_run, val_cache = cached_evaluation(Request(ref.pinned, req.data_dir, "val", req.protocol), s.parent)
            test_run, test_cache = cached_evaluation(Request(ref.pinned, req.data_dir, "test", req.protocol), s.parent)
        flips = [v for v in cfg.eval.tta_views if v != "none"]
        radius = val_cache.meta["match_radius"]
        staged = cfg.eval.tta_views or cfg.model.num_classes > 2
        replay = PipelineReplay({"none": val_cache} | load_view_caches(val_run, flips), radius) if staged else None
        test_views = {"none": test_cache} | load_view_caches(test_run, flips)
        return postprocess_objective(s, Replayer(val_cache, "greedy", radius), replay), test_views

    @staticmethod
    def chosen_on_test(s: Study, chosen, tr: tracking.Tracker, test_views: dict[str, Cache]):
        """The chosen settings replayed on the test cache, logged in the study's run."""
        pp, tta_thresh, per_class = trial_postprocess(chosen), trial_tta_thresh(chosen), trial_class_thresh(chosen)
        chosen_params = pp.__dict__ | ({"tta_thresh": tta_thresh} if tta_thresh is not None else {})
        chosen_params |= {"class_score_thresh": list(per_class)} if per_class else {}
        radius = test_views["none"].meta["match_radius"]
        # The chosen version's own pipeline (flips fused, classes thresholded), run on the test caches.
        step = Pipeline(pp, radius, replay_stages(radius, tta_thresh, per_class)).run(test_views, [])
        report = judge(step.cache, step.pp, "greedy", radius)
        log_report(tr, "test", report, step.cache, [], step.pp)
        return report.metrics, chosen_params

    @staticmethod
    def log_looked_at(s: Study, chosen) -> None:
        """A nested run for each trial a user opens (looked_at), once: every other trial is a row of
        the study's table and a step of its series."""
        api = tracking.client()
        experiment = tracking.get_run(s.parent).info.experiment_id
        existing = {
            r.data.tags.get(tracking.TAG + "trial")
            for r in api.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{s.parent}'", max_results=5000)
        }
        for t in looked_at(s.study, chosen):
            if str(t.number) in existing:
                continue
            params = {f"pp.{k}": v for k, v in trial_settings(t).items()} | t.params | {"trial": t.number}
            tracking.create_child_run(
                s.parent,
                f"trial {t.number}",
                params,
                {f"val/{k}": v for k, v in trial_metrics(t).items()},
                {"study": s.req.study, "trial": t.number},
            )

    @staticmethod
    def chosen_model(s: Study, chosen, tr: tracking.Tracker) -> str:
        """The source detector with the chosen settings, logged in the study's run, which carries
        the split to judge it by."""
        tta_thresh = trial_tta_thresh(chosen)
        overrides = trial_postprocess(chosen).as_overrides()
        overrides += [f"eval.tta_thresh={tta_thresh}"] if tta_thresh is not None else []
        per_class = trial_class_thresh(chosen)
        overrides += [f"model.class_score_thresh=[{','.join(map(str, per_class))}]"] if per_class else []
        cfg = replace(s.config.replace(*overrides), name=f"{s.config.name}+{s.req.study}")
        model_uri = log_detector(cfg, s.model)
        tr.client.log_text(tr.run_id, recorded_split(s.ref).to_json(), "split.json")
        return model_uri


class TrainingStudy:
    """Learning rate and the RPN and box heads' IoU thresholds: one nested training run per trial,
    judged on its validation counts; the chosen model is evaluated on test once registered."""

    what = "training"
    beats = True  # a trial trains for minutes: it beats, and is a nested run of its own

    @staticmethod
    def check(req: TuneRequest, ref: tracking.ModelRef, cfg: Config) -> None:
        cfg.replace(*req.train_overrides)  # names a bad override before any trial

    @staticmethod
    def log_looked_at(s: Study, chosen) -> None:
        """Every trial is its training run already."""

    @staticmethod
    def prepare(s: Study):
        return training_objective(s, s.req.data_dir), None

    @staticmethod
    def chosen_on_test(s: Study, chosen, tr: tracking.Tracker, test_views):
        return None, chosen.params  # evaluated once registered: its own model, not a replay

    @staticmethod
    def chosen_model(s: Study, chosen, tr: tracking.Tracker) -> str:
        return chosen.user_attrs["model_uri"]  # the trial logged its own


KINDS = {"postprocess": PostprocessStudy, "training": TrainingStudy}
