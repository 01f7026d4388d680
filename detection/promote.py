"""Promote a registered version to `champion` only when it earns it on the same evaluation.

The candidate and the current champion are compared on the same images with the same protocol
and matching (an evaluation is made for either one that lacks it). The alias `champion` moves
only when the candidate beats the champion by `min_delta`; the former champion keeps `previous`.
`previous` is moved before `champion`, so a failure part-way never leaves the registry without a
champion. Every decision is a run with a side-by-side table and figure, and tags on both versions.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def split(self) -> str:
        return self.metric.split("/", 1)[0]

    def check(self) -> None:
        split, _, name = self.metric.partition("/")
        if split not in ("test", "val") or name not in COMPARED + ("tp", "fp", "fn"):
            raise PromotionError(
                f"metric={self.metric!r} must be test/ or val/ followed by one of {', '.join(COMPARED)}"
            )
        if self.min_delta < 0:
            raise PromotionError(f"min_delta={self.min_delta} must be >= 0")


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    metrics: dict[str, float]
    images: str  # digest of the evaluated images' contents


def evaluation_of(req: PromoteRequest, ref: tracking.ModelRef) -> Evaluation:
    """The version's evaluation on these images with this protocol and matching, made if missing."""
    eval_req = Request(ref.pinned, req.data_dir, req.split, req.protocol, req.matching, req.seed)
    run, digest = earlier_evaluation(eval_req, same_matching=True)
    run_id = run.info.run_id if run else evaluate(eval_req)[0]
    return Evaluation(run_id, dict(tracking.get_run(run_id).data.metrics), digest)


def beats(metric: str, candidate: float, champion: float, min_delta: float) -> bool:
    """Strictly better by more than min_delta (a tie keeps the champion)."""
    if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER:
        return champion - candidate > min_delta
    return candidate - champion > min_delta


def side_by_side(
    req: PromoteRequest, cand: tuple[tracking.ModelRef, Evaluation], champ: tuple[tracking.ModelRef, Evaluation] | None
) -> pd.DataFrame:
    rows = []
    for name in COMPARED:
        key = f"{req.split}/{name}"
        rows.append(
            {
                "metric": key,
                f"candidate v{cand[0].version}": cand[1].metrics.get(key),
                **({f"champion v{champ[0].version}": champ[1].metrics.get(key)} if champ else {}),
            }
        )
    return pd.DataFrame(rows)


def promote(req: PromoteRequest) -> dict:
    """Compare-and-set: the candidate's evaluation is made first; then, under the registry's lock,
    the champion actually in place is read, compared and replaced, so promotions started together
    cannot crown the wrong version."""
    req.check()
    tracking.check_reachable()
    if req.rollback:
        return rollback(req)
    cand = tracking.resolve_model(req.candidate)
    tracking.load_model(cand)  # refuses a version whose artifacts do not load
    cand_eval = evaluation_of(req, cand)
    with tracking.registry_lock(cand.name):
        champ = tracking.alias_version(cand.name, CHAMPION)
        if champ is not None and champ.version == cand.version:
            raise PromotionError(f"{cand.pinned} is already the champion")
        champ_eval = evaluation_of(req, champ) if champ else None
        decision, reason, value, old = decide(req, cand_eval, champ, champ_eval)
        run_id = record(req, cand, cand_eval, champ, champ_eval, decision, reason, value, old)
        if decision == "promoted":
            if champ:
                tracking.client().set_registered_model_alias(cand.name, PREVIOUS, str(champ.version))
            tracking.client().set_registered_model_alias(cand.name, CHAMPION, str(cand.version))
        final = tracking.alias_version(cand.name, CHAMPION)
    return {"decision": decision, "reason": reason, "run_id": run_id, "champion": final.version}


def decide(req: PromoteRequest, cand_eval: Evaluation, champ, champ_eval: Evaluation | None):
    """(decision, reason, candidate value, champion value) of comparing on the same images."""
    if champ_eval and champ_eval.images != cand_eval.images:
        raise PromotionError(
            f"the evaluations of {req.candidate} (run {cand_eval.run_id}) and the champion {champ.pinned} "
            f"(run {champ_eval.run_id}) used different images; their {req.split} splits differ, so "
            f"{req.metric} is not comparable"
        )
    if req.metric not in cand_eval.metrics or (champ_eval and req.metric not in champ_eval.metrics):
        raise PromotionError(f"{req.metric} is missing from an evaluation; pick another metric")
    value = cand_eval.metrics[req.metric]
    old = champ_eval.metrics[req.metric] if champ_eval else None
    promoted = champ is None or beats(req.metric, value, old, req.min_delta)
    reason = (
        "first champion"
        if champ is None
        else f"{req.metric} {value:.4f} vs champion v{champ.version} {old:.4f} (min_delta {req.min_delta})"
    )
    return ("promoted" if promoted else "kept champion"), reason, value, old


def record(req, cand, cand_eval, champ, champ_eval, decision, reason, value, old) -> str:
    """The decision as a run (table and figure) and as tags on both versions."""
    table = side_by_side(req, (cand, cand_eval), (champ, champ_eval) if champ else None)
    with tracking.run(EXPERIMENT, name=f"promote v{cand.version}") as tr:
        tr.set_tags(
            {
                "promotion": "true",
                "decision": decision,
                "reason": reason,
                "candidate_version": cand.version,
                "champion_version": champ.version if champ else "",
                "metric": req.metric,
            }
        )
        tr.log_params(
            {
                "promote.candidate": cand.pinned,
                "promote.metric": req.metric,
                "promote.min_delta": req.min_delta,
                "promote.protocol": req.protocol,
                "promote.matching": req.matching,
                "promote.data_dir": str(req.data_dir),
            }
        )
        tr.client.log_table(tr.run_id, table, "side_by_side.json")
        fig = figures.side_by_side(table, req.metric, decision)
        tr.client.log_figure(tr.run_id, fig, "side_by_side.png")
        figures.close(fig)
        tags = {
            "decision": decision,
            "metric": req.metric,
            "candidate_value": value,
            "champion_value": "" if old is None else old,
            "candidate_eval_run": cand_eval.run_id,
            "champion_eval_run": champ_eval.run_id if champ_eval else "",
            "promotion_run": tr.run_id,
        }
        tracking.tag_version(cand.name, cand.version, "promotion.", tags)
        if champ:
            # The champion's own promotion.* tags keep saying how it became champion.
            tracking.tag_version(
                champ.name,
                champ.version,
                "promotion.challenge.",
                {"by_version": cand.version, "decision": decision, "promotion_run": tr.run_id},
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
