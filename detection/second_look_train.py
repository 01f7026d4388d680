"""`python -m detection second-look`: train the second look (second_look.py) on a registered
version's own detections, choose its weight on val, and register the pair as a new version.

It runs the version through the evaluation's pipeline, so it sits above evaluate.py; the stage it
trains sits below it (evaluate and the served model import second_look.py, never this module).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from . import config as config_mod
from . import figures, tracking
from .choices import promoted_alias_problem
from .config import Config, SecondLookConfig
from .engine import PRECISION_NAMES
from .evaluate import infer_views
from .heldout import Request, recorded_split, renamed, select
from .inference import Cache, Item, Runtime
from .pipeline import Pipeline
from .predict import log_detector
from .second_look import WEIGHTS, Choice, Examples, SecondLookError, choose, examples, fit, item_probabilities


@dataclass(frozen=True)
class SecondLookRequest:
    model: str
    data_dir: Path
    overrides: tuple[str, ...] = ()  # second_look.* keys, e.g. second_look.epochs=5
    device: str = ""
    alias: str = ""  # the alias of the new version; empty: the version's tracking.alias

    def check(self) -> None:
        """Before anything is resolved or loaded."""
        bad = [o for o in " ".join(self.overrides).split() if not o.startswith("second_look.")]
        if bad:
            raise SecondLookError(f"override {bad[0]!r}: only second_look.* keys apply here (the detector is trained)")
        reserved = promoted_alias_problem(self.alias)
        if reserved:
            raise SecondLookError(f"--alias: {reserved}")

    def config(self, cfg: Config) -> Config:
        return cfg.replace("second_look.weight=0", *self.overrides)

    @property
    def fixed_weight(self) -> float | None:
        """A weight the user set (second_look.weight=W) instead of searching WEIGHTS on val."""
        given = config_mod.parse_overrides(self.overrides).get("second_look", {})
        return float(given["weight"]) if "weight" in given else None


def detections(cfg: Config, model, samples, part: str, rt: Runtime) -> tuple[list[Item], Cache]:
    """What the version (without a second look) keeps on whole images of one split part."""
    req = Request("", Path("."), part, "whole")
    items, views = infer_views(req, cfg, model, samples, rt, {"split": part})
    pipe = Pipeline.of(cfg, views["none"].meta["match_radius"])  # second_look.weight=0: no rescoring yet
    return items, pipe.kept(pipe.run(views, [it.image for it in items]))


def second_look(req: SecondLookRequest) -> tuple[str, int, dict]:
    """Train, choose the weight, log a nested run of the version's run, register the pair."""
    req.check()
    tracking.check_reachable()
    ref = tracking.resolve_model(req.model)
    detector = tracking.load_model(ref)
    cfg = req.config(detector.config)
    try:
        split = recorded_split(ref)
        rt = Runtime.choose(req.device or None)
    except (ValueError, RuntimeError) as e:
        raise SecondLookError(str(e)) from None
    parts = {}
    for part in ("train", "val"):
        ev = Request(ref.pinned, req.data_dir, part, "whole")
        samples, hashes = select(ev, split)  # names the missing images
        changed = renamed(ev, split, hashes)
        if changed:
            raise SecondLookError(
                f"{len(changed)} {part} image(s) in {req.data_dir} are not the images {ref.uri}'s "
                f"training run recorded under those names: {', '.join(changed[:8])}; restore "
                f"the original files"
            )
        parts[part] = samples
    model = rt.place(detector.model)
    with tracking.run(cfg.tracking.experiment, parent=ref.run_id, name=f"second look of v{ref.version}") as tr:
        tr.set_tags(
            {"second_look_of": ref.version, "model_uri": ref.pinned, "model_name": ref.name, "second_look": "true"}
            | {f"inference.{k}": v for k, v in rt.describe().items()}
        )
        tr.log_params(
            {f"second_look.{k}": v for k, v in cfg.to_dict()["second_look"].items() if k not in ("weight", "thresh")}
            | {"second_look.source": ref.pinned}
        )
        found = {p: detections(cfg, model, s, p, rt) for p, s in parts.items()}
        radius, size = cfg.match_radius_px, cfg.second_look.crop
        ex = {
            p: examples(c, [it.image for it in items], radius, size, cfg.second_look.max_examples, cfg.train.seed)
            for p, (items, c) in found.items()
        }
        tr.log_metrics(
            {f"second_look/{p}_examples": len(e) for p, e in ex.items()}
            | {f"second_look/{p}_true_positives": e.positives for p, e in ex.items()},
            step=0,
        )
        net = fit(
            ex["train"],
            ex["val"],
            cfg.second_look,
            cfg.train.seed,
            rt,
            lambda epoch, values: tr.log_metrics(values, step=epoch),
        )
        val_items, val_cache = found["val"]
        probs = item_probabilities(net.to(rt.device), val_cache, [it.image for it in val_items], size, rt)
        fixed = req.fixed_weight
        choice = choose(val_cache, probs, radius, WEIGHTS if fixed is None else [fixed])
        _log_choice(tr, choice)
        tuned = cfg.replace(f"second_look.weight={choice.weight}", f"second_look.thresh={choice.thresh}")
        tuned = replace(tuned, name=f"{cfg.name}+second-look")
        # The new version's run holds the split, so it can be judged on the same images.
        tr.client.log_text(tr.run_id, split.to_json(), "split.json")
        uri = log_detector(tuned, detector.model.cpu(), net.cpu())
        version = tracking.register(
            uri,
            ref.name,
            req.alias or cfg.tracking.alias,
            {
                "second_look_of": ref.version,
                "config": tuned.name,
                "second_look_weight": choice.weight,
                "second_look_thresh": choice.thresh,
            },
            describe(ref.version, tuned.second_look, ex["train"], choice, tr.run_id),
        )
        tr.set_tags(
            {"registered_model": ref.name, "registered_version": version, "precision": PRECISION_NAMES[rt.dtype]}
        )
        summary = {
            "weight": choice.weight,
            "thresh": choice.thresh,
            "val_detection_rate": choice.detection_rate,
            "val_fdr_alone": choice.fdr_alone,
            "val_fdr": choice.fdr,
            "train_examples": len(ex["train"]),
            "train_true_positives": ex["train"].positives,
        }
        return tr.run_id, version, summary


def describe(source: int, sl: SecondLookConfig, train: Examples, choice: Choice, run_id: str) -> str:
    """The registry's description of a version with a second look."""
    return (
        f"Version {source} plus a learned second look: ResNet-18 on {sl.crop} px crops around each detection, "
        f"trained on {len(train)} crops ({train.positives} true positives) of the training split in run "
        f"{run_id}. Fused score (1 - w) x detector + w x classifier with w = {sl.weight:g}, kept above "
        f"{sl.thresh:g}. On val at detection rate {choice.detection_rate:.3f}: FDR {choice.fdr_alone:.3f} "
        f"alone, {choice.fdr:.3f} with the second look."
    )


def _log_choice(tr, choice: Choice) -> None:
    tr.log_metrics(
        {
            "second_look/weight": choice.weight,
            "second_look/thresh": choice.thresh,
            "val/detection_rate": choice.detection_rate,
            "val/fdr_alone": choice.fdr_alone,
            "val/fdr": choice.fdr,
        },
        step=0,
    )
    tr.client.log_table(tr.run_id, choice.table, "second_look_weights.json")
    fig = figures.dr_vs_fdr(
        choice.curves, [round(choice.detection_rate, 4)], f"val split: the second look at weight {choice.weight:g}"
    )
    tr.client.log_figure(tr.run_id, fig, "figures/second_look_val.png")
    figures.close(fig)
