"""Promote a registered version to `champion` only when it earns it on the same evaluation.

The candidate and the current champion are compared on the same images with the same protocol,
matching and match radius (an evaluation is made for either one that lacks it). The decision is made
on the validation split by default and the test split is reported beside it: test figures that
decide promotion after promotion become a selection set and flatter the champion, so every
version counts the decisions made on its test images. The alias `champion` moves
only when the candidate beats the champion by `min_delta`; the former champion keeps `previous`.
`previous` is moved before `champion`, so a failure part-way never leaves the registry without a
champion. Every decision is a run with a side-by-side table and figure, and tags on both versions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from . import figures, tracking
from .choices import CHAMPION, MATCHERS, PREVIOUS, PROMOTE_METRIC, PROTOCOLS
from .errors import DetectionError
from .evaluate import Request, earlier_evaluation, evaluate

EXPERIMENT = "brecahad-promotions"
LOWER_IS_BETTER = ("fdr", "fp", "fn")
COMPARED = ("detection_rate", "fdr", "precision", "f1", "ap", "box_ap50", "box_ap")


class PromotionError(DetectionError, ValueError):
    """A promotion refused before any alias moved."""


@dataclass(frozen=True)
class PromoteRequest:
    candidate: str
    data_dir: Path
    metric: str = PROMOTE_METRIC
    min_delta: float = 0.0
    rollback: bool = False
    protocol: str = PROTOCOLS[0]
    matching: str = MATCHERS[0]
    seed: int = 0
    match_radius_um: float | None = None  # None: the candidate's eval.match_radius_um, for both

    @property
    def split(self) -> str:
        return self.metric.split("/", 1)[0]

    def check(self) -> None:
        split, _, name = self.metric.partition("/")
        if split not in ("test", "val") or name not in COMPARED + ("tp", "fp", "fn"):
            raise PromotionError(
                f"metric={self.metric!r} must be test/ or val/ followed by one of {', '.join(COMPARED)}"
            )
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise PromotionError(f"min_delta={self.min_delta} must be a finite number >= 0 (0: any gain promotes)")


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    metrics: dict[str, float]
    images: str  # digest of the evaluated images' contents


@dataclass(frozen=True)
class Judged:
    """A version and its evaluations: on the deciding split, and on test (the same one when the
    decision is made on test)."""

    ref: tracking.ModelRef
    decisive: Evaluation
    test: Evaluation


@dataclass(frozen=True)
class Decision:
    outcome: str  # "promoted" | "kept champion"
    reason: str
    candidate_value: float
    champion_value: float | None


def evaluation_of(req: PromoteRequest, ref: tracking.ModelRef, split: str) -> Evaluation:
    """The version's evaluation on these images with this protocol, matching and radius, made if missing."""
    eval_req = Request(
        ref.pinned, req.data_dir, split, req.protocol, req.matching, req.seed, match_radius_um=req.match_radius_um
    )
    run, digest = earlier_evaluation(eval_req, same_matching=True)
    run_id = run.info.run_id if run else evaluate(eval_req)[0]
    return Evaluation(run_id, dict(tracking.get_run(run_id).data.metrics), digest)


def judged(req: PromoteRequest, ref: tracking.ModelRef) -> Judged:
    decisive = evaluation_of(req, ref, req.split)
    return Judged(ref, decisive, decisive if req.split == "test" else evaluation_of(req, ref, "test"))


def beats(metric: str, candidate: float, champion: float, min_delta: float) -> bool:
    """Strictly better by more than min_delta (a tie keeps the champion)."""
    if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
        return champion - candidate > min_delta
    return candidate - champion > min_delta


def side_by_side(req: PromoteRequest, cand: Judged, champ: Judged | None) -> pd.DataFrame:
    """Every compared metric on the deciding split and, beside it, on test."""
    rows = []
    for split, which in ((req.split, "decisive"), ("test", "test")) if req.split != "test" else (("test", "test"),):
        for name in COMPARED:
            key = f"{split}/{name}"
            rows.append(
                {
                    "metric": key,
                    "decides": split == req.split,
                    f"candidate v{cand.ref.version}": getattr(cand, which).metrics.get(key),
                    **({f"champion v{champ.ref.version}": getattr(champ, which).metrics.get(key)} if champ else {}),
                }
            )
    return pd.DataFrame(rows)


def promote(req: PromoteRequest) -> dict:
    """Compare-and-set: the candidate's evaluations are made first; then, under the registry's lock,
    the champion actually in place is read, compared and replaced, so promotions started together
    cannot crown the wrong version."""
    req.check()
    tracking.check_reachable()
    if req.rollback:
        return rollback(req)
    cand_ref = tracking.resolve_model(req.candidate)
    config = tracking.load_model(cand_ref).config  # refuses a version whose artifacts do not load
    req = replace(req, match_radius_um=req.match_radius_um or config.eval.match_radius_um)  # one radius for both
    cand = judged(req, cand_ref)
    with tracking.registry_lock(cand_ref.name):
        champ_ref = tracking.alias_version(cand_ref.name, CHAMPION)
        if champ_ref is not None and champ_ref.version == cand_ref.version:
            raise PromotionError(f"{cand_ref.pinned} is already the champion")
        champ = judged(req, champ_ref) if champ_ref else None
        decision = decide(req, cand, champ)
        run_id = record(req, cand, champ, decision)
        if decision.outcome == "promoted":
            if champ:
                tracking.client().set_registered_model_alias(cand_ref.name, PREVIOUS, str(champ.ref.version))
            tracking.client().set_registered_model_alias(cand_ref.name, CHAMPION, str(cand_ref.version))
        final = tracking.alias_version(cand_ref.name, CHAMPION)
    return {"decision": decision.outcome, "reason": decision.reason, "run_id": run_id, "champion": final.version}


def decide(req: PromoteRequest, cand: Judged, champ: Judged | None) -> Decision:
    """The outcome of comparing the two on the same images."""
    if champ and champ.decisive.images != cand.decisive.images:
        raise PromotionError(
            f"the evaluations of {req.candidate} (run {cand.decisive.run_id}) and the champion {champ.ref.pinned} "
            f"(run {champ.decisive.run_id}) used different images; their {req.split} splits differ, so "
            f"{req.metric} is not comparable"
        )
    if req.metric not in cand.decisive.metrics or (champ and req.metric not in champ.decisive.metrics):
        raise PromotionError(f"{req.metric} is missing from an evaluation; pick another metric")
    value = cand.decisive.metrics[req.metric]
    old = champ.decisive.metrics[req.metric] if champ else None
    promoted = champ is None or beats(req.metric, value, old, req.min_delta)
    reason = (
        "first champion"
        if champ is None
        else f"{req.metric} {value:.4f} vs champion v{champ.ref.version} {old:.4f} (min_delta {req.min_delta})"
    )
    return Decision("promoted" if promoted else "kept champion", reason, value, old)


TEST_DECISIONS = "test_decisions"  # promotion.test_decisions: decisions made on the version's test images
_TEST_LINE = re.compile(r"\n*Promotion decisions made on its test images: \d+\.?$")


def count_test_use(ref: tracking.ModelRef, decided_on_test: bool) -> int:
    """How many promotion decisions have used the version's test images, counting this one; kept as a
    version tag and as the last line of its description (test figures chosen among many are optimistic)."""
    version = tracking.client().get_model_version(ref.name, str(ref.version))
    n = int(version.tags.get(f"promotion.{TEST_DECISIONS}", "0")) + int(decided_on_test)
    if decided_on_test:
        tracking.tag_version(ref.name, ref.version, "promotion.", {TEST_DECISIONS: n})
        text = _TEST_LINE.sub("", version.description or "").rstrip()
        line = f"Promotion decisions made on its test images: {n}."
        tracking.client().update_model_version(ref.name, str(ref.version), description=f"{text}\n\n{line}".lstrip())
    return n


def record(req: PromoteRequest, cand: Judged, champ: Judged | None, decision: Decision) -> str:
    """The decision as a run (table and figure) and as tags on both versions."""
    table = side_by_side(req, cand, champ)
    on_test = req.split == "test"
    with tracking.run(EXPERIMENT, name=f"promote v{cand.ref.version}") as tr:
        uses = {f"candidate_{TEST_DECISIONS}": count_test_use(cand.ref, on_test)} | (
            {f"champion_{TEST_DECISIONS}": count_test_use(champ.ref, on_test)} if champ else {}
        )
        tr.set_tags(
            {
                "promotion": "true",
                "decision": decision.outcome,
                "reason": decision.reason,
                "candidate_version": cand.ref.version,
                "champion_version": champ.ref.version if champ else "",
                "metric": req.metric,
                "decided_on_test": str(on_test).lower(),
            }
            | uses
        )
        tr.log_params(
            {
                "promote.candidate": cand.ref.pinned,
                "promote.metric": req.metric,
                "promote.min_delta": req.min_delta,
                "promote.protocol": req.protocol,
                "promote.matching": req.matching,
                "promote.match_radius_um": req.match_radius_um,
                "promote.data_dir": str(req.data_dir),
            }
        )
        tr.client.log_table(tr.run_id, table, "side_by_side.json")
        fig = figures.side_by_side(table[table.decides], req.metric, decision.outcome)
        tr.client.log_figure(tr.run_id, fig, "side_by_side.png")
        figures.close(fig)
        tags = {
            "decision": decision.outcome,
            "metric": req.metric,
            "candidate_value": decision.candidate_value,
            "champion_value": "" if decision.champion_value is None else decision.champion_value,
            "candidate_eval_run": cand.decisive.run_id,
            "champion_eval_run": champ.decisive.run_id if champ else "",
            "candidate_test_eval_run": cand.test.run_id,
            "promotion_run": tr.run_id,
        }
        tracking.tag_version(cand.ref.name, cand.ref.version, "promotion.", tags)
        if champ:
            # The champion's own promotion.* tags keep saying how it became champion.
            tracking.tag_version(
                champ.ref.name,
                champ.ref.version,
                "promotion.challenge.",
                {"by_version": cand.ref.version, "decision": decision.outcome, "promotion_run": tr.run_id},
            )
        return tr.run_id


def rollback(req: PromoteRequest) -> dict:
    """Swap `champion` and `previous` back; the registry always has a champion while it happens."""
    name = tracking.resolve_model(req.candidate).name
    with tracking.registry_lock(name):
        return _rollback(name)


def _rollback(name: str) -> dict:
    champ, prev = tracking.alias_version(name, CHAMPION), tracking.alias_version(name, PREVIOUS)
    if champ is None or prev is None:
        raise PromotionError(
            f"rollback needs both aliases {CHAMPION!r} and {PREVIOUS!r} on {name!r}; "
            f"found champion={champ and champ.version}, previous={prev and prev.version}"
        )
    with tracking.run(EXPERIMENT, name=f"rollback to v{champ.version}") as tr:
        tr.set_tags(
            {
                "promotion": "true",
                "decision": "rolled back",
                "candidate_version": prev.version,
                "champion_version": champ.version,
            }
        )
        tracking.client().set_registered_model_alias(name, CHAMPION, str(prev.version))
        tracking.client().set_registered_model_alias(name, PREVIOUS, str(champ.version))
        for ref in (champ, prev):
            tracking.tag_version(
                name, ref.version, "promotion.", {"decision": "rolled back", "promotion_run": tr.run_id}
            )
        run_id = tr.run_id
    return {
        "decision": "rolled back",
        "reason": f"champion v{champ.version} -> v{prev.version}",
        "run_id": run_id,
        "champion": prev.version,
    }
