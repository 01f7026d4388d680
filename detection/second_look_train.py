"""`python -m detection second-look`: train the second look's classifier (classifier.py) on a
registered version's own detections, choose its weight on val, and register the pair as a new version.

It runs the version through the evaluation's pipeline, so it sits above evaluate.py; the stage it
trains sits below it (the pipeline and the served model import second_look.py and classifier.py,
never this module).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from . import config as config_mod
from . import figures, model_card, tracking
from .choices import promoted_alias_problem
from .classifier import BATCH, build_classifier, crops, normalise
from .config import Config, SecondLookConfig
from .engine import PRECISION_NAMES
from .evaluate import infer_views
from .heldout import Request, recorded_split, renamed, select
from .inference import Cache, Item, Runtime
from .metrics import SWEEP, fdr_at, rates, score, threshold_counts
from .pipeline import Pipeline
from .predict import log_detector
from .progress import Bar
from .second_look import SecondLookError, item_probabilities, rescored
from .tta import fused_postprocess


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
        )
        tr.set_tags(
            {"registered_model": ref.name, "registered_version": version, "precision": PRECISION_NAMES[rt.dtype]}
        )
        model_card.publish(ref.name, version)
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


# --- training the classifier and choosing its weight ---------------------------------------------

WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)  # candidate fusion weights, 0 = the detector alone


@dataclass(frozen=True)
class Examples:
    crops: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) float32: 1 a true positive, 0 a false positive

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    def __len__(self) -> int:
        return len(self.labels)


def examples(cache: Cache, images: list[np.ndarray], radius: float, size: int, limit: int, seed: int) -> Examples:
    """The kept detections' crops, labelled by greedy matching to the annotated cells (detections in
    a don't-care band left out), at most `limit`: drawn at random, each class keeping all its crops
    when it has fewer than half of them."""
    scored = score(cache, fused_postprocess(0.0), "greedy", radius)
    rows = [
        (i, k, bool(t))
        for i, (kept, tp, counted) in enumerate(zip(scored.kept, scored.tp, scored.counted))
        for k, t in zip(kept[counted], tp[counted])
    ]
    pos, neg = [r for r in rows if r[2]], [r for r in rows if not r[2]]
    n_pos = min(len(pos), max(limit - len(neg), limit // 2))
    n_neg = min(len(neg), limit - n_pos)
    rng = np.random.default_rng(seed)
    picked = [pos[j] for j in rng.permutation(len(pos))[:n_pos]] + [neg[j] for j in rng.permutation(len(neg))[:n_neg]]
    all_crops = [
        crops(images[i], cache.det_boxes[[k for j, k, _ in picked if j == i]], size) for i in range(len(cache))
    ]
    labels = [torch.tensor([float(t) for j, _, t in picked if j == i]) for i in range(len(cache))]
    return Examples(torch.cat(all_crops), torch.cat(labels).float())


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a true positive outscores a false positive), Mann-Whitney U."""
    pos, neg = probs[labels > 0.5], probs[labels <= 0.5]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips and quarter turns: a cell has no orientation."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def fit(
    train: Examples, val: Examples, sl: SecondLookConfig, seed: int, rt: Runtime, on_epoch=lambda epoch, values: None
) -> torch.nn.Module:
    """Train the classifier; the epoch with the best val AUC is kept."""
    if train.positives == 0 or train.positives == len(train):
        raise SecondLookError(
            f"the detector's {len(train)} kept detections on the training split are all "
            f"{'false' if train.positives == 0 else 'true'} positives: nothing to tell apart"
        )
    torch.manual_seed(seed)
    net = build_classifier().to(rt.device)
    opt = torch.optim.AdamW(net.parameters(), lr=sl.lr, weight_decay=1e-4)
    pos_weight = torch.tensor((len(train) - train.positives) / train.positives, device=rt.device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(seed)
    best, best_auc = copy.deepcopy(net.state_dict()), -1.0
    steps = (len(train) + sl.batch_size - 1) // sl.batch_size
    with Bar(sl.epochs * steps, "second look: train", every=max(1, steps)) as bar:
        for epoch in range(sl.epochs):
            net.train()
            order = torch.randperm(len(train), generator=gen)
            total = 0.0
            for k in range(steps):
                idx = order[k * sl.batch_size : (k + 1) * sl.batch_size]
                x = _dihedral(normalise(train.crops[idx].to(rt.device)), int(torch.randint(8, (1,), generator=gen)))
                loss = loss_fn(net(x)[:, 0], train.labels[idx].to(rt.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                bar.advance(epoch=epoch + 1, loss=loss.item())
            net.eval()
            val_auc = auc(_predict(net, val.crops, rt), val.labels.numpy()) if len(val) else float("nan")
            on_epoch(epoch, {"second_look/train_loss": total / len(train), "second_look/val_auc": val_auc})
            if not np.isfinite(val_auc) or val_auc > best_auc:
                best, best_auc = copy.deepcopy(net.state_dict()), val_auc if np.isfinite(val_auc) else best_auc
    net.load_state_dict(best)
    return net.eval().cpu()


def _predict(net: torch.nn.Module, batch: torch.Tensor, rt: Runtime) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for k in range(0, len(batch), BATCH):
            out.append(torch.sigmoid(net(normalise(batch[k : k + BATCH].to(rt.device)))[:, 0]).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


@dataclass(frozen=True)
class Choice:
    weight: float
    thresh: float
    detection_rate: float  # what the version reaches alone on val, and keeps
    fdr_alone: float
    fdr: float
    table: pd.DataFrame  # per candidate weight: FDR at that detection rate
    curves: dict[str, pd.DataFrame]


def choose(cache: Cache, probs: list[np.ndarray], radius: float, weights=WEIGHTS) -> Choice:
    """Of `weights`, the one with the lowest val FDR at the detection rate the version reaches alone
    (ties: the smaller weight), and the highest threshold that keeps that rate."""

    def counts(weight: float) -> np.ndarray:
        return threshold_counts(rescored(cache, probs, weight), fused_postprocess(0.0), "greedy", radius, SWEEP)[2].sum(
            0
        )

    alone = counts(0.0)
    target = float(rates(alone)[0][0])  # every kept detection: the version's own operating point
    if not np.isfinite(target) or target <= 0:
        raise SecondLookError(
            "the version finds no cell on the val split, so there is no detection rate to keep; "
            "train the detector longer or lower its score threshold"
        )
    rows, curves, by_weight = [], {}, {0.0: alone}
    for w in weights:
        c = counts(float(w))
        by_weight[float(w)] = c
        rows.append({"weight": float(w), "fdr": float(fdr_at(c, target))})
    table = pd.DataFrame(rows)
    best = float(table.loc[table.fdr.idxmin(), "weight"])
    for label, w in (("detector alone", 0.0), (f"second look, weight {best:g}", best)):
        dr, fdr = rates(by_weight[w])
        curves[label] = pd.DataFrame({"threshold": SWEEP, "detection_rate": dr, "fdr": fdr})
    dr = rates(by_weight[best])[0]
    thresh = float(SWEEP[np.flatnonzero(dr >= target - 1e-12).max()])
    return Choice(best, thresh, target, float(table.fdr.iloc[0]), float(table.fdr.min()), table, curves)
