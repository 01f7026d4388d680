"""Promote a registered version to `champion` only when it earns it on the same evaluation.

The candidate and the current champion are compared on the same images with the same protocol,
matching and match radius (an evaluation is made for either one that lacks it). The decision is made
on the validation split by default and the test split is reported beside it: test figures that
decide promotion after promotion become a selection set and flatter the champion, so every
version counts the decisions made on its test images. The alias `champion` moves
only when the candidate beats the champion by `min_delta`; the former champion keeps `previous`.
`previous` is moved before `champion`, so a failure part-way never leaves the registry without a
champion. Every decision is one run, `promote vN`, in the experiment every other run of the project
goes to (the one `mlflow run` launched, or `brecahad`): the evaluations it needs are nested under it
(or reused), with a side-by-side table and figure, and tags on both versions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from . import figures, model_card, tracking
from .choices import CHAMPION, MATCHERS, PREVIOUS, PROMOTE_METRIC, PROTOCOLS
from .config import TrackingConfig
from .errors import DetectionError
from .evaluate import Request, earlier_evaluation, evaluate

EXPERIMENT = TrackingConfig.experiment  # one place for every run; was brecahad-promotions beside it
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
    """What `decide` concluded and everything it looked at: `record` writes it down as it is."""

    req: PromoteRequest
    cand: Judged
    champ: Judged | None
    outcome: str  # "promoted" | "kept champion"
    reason: str
    candidate_value: float
    champion_value: float | None


def evaluation_of(req: PromoteRequest, ref: tracking.ModelRef, split: str, parent: str) -> Evaluation:
    """The version's evaluation on these images with this protocol, matching and radius: an earlier
    one, or one made now as a run nested under the promotion's."""
    eval_req = Request(
        ref.pinned, req.data_dir, split, req.protocol, req.matching, req.seed, match_radius_um=req.match_radius_um
    )
    run, digest = earlier_evaluation(eval_req, same_matching=True)
    run_id = run.info.run_id if run else evaluate(eval_req, parent=parent)[0]
    return Evaluation(run_id, dict(tracking.get_run(run_id).data.metrics), digest)


def judged(req: PromoteRequest, ref: tracking.ModelRef, parent: str) -> Judged:
    decisive = evaluation_of(req, ref, req.split, parent)
    test = decisive if req.split == "test" else evaluation_of(req, ref, "test", parent)
    return Judged(ref, decisive, test)


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
    _refuse_the_champion(cand_ref)
    pending = {"promotion": "true", "decision": "pending"}
    run_id = tracking.create_run(EXPERIMENT, f"promote v{cand_ref.version}", pending)
    try:
        cand = judged(req, cand_ref, run_id)
        with tracking.registry_lock(cand_ref.name) as lease:
            settle(cand_ref.name)  # a promotion killed part-way is finished before this one looks
            champ_ref = _refuse_the_champion(cand_ref)
            champ = judged(req, champ_ref, run_id) if champ_ref else None
            decision = decide(req, cand, champ)
            plan = record(decision, run_id)
            if lease.lost.is_set():
                raise PromotionError(f"lost the promotion lease of {cand_ref.name!r} while deciding; nothing moved")
            carry_out(cand_ref.name, plan)
            final = tracking.alias_version(cand_ref.name, CHAMPION)
    except BaseException as e:
        if tracking.get_run(run_id).info.status == "RUNNING":  # nothing was carried out
            tracking.client().set_tag(run_id, tracking.TAG + "error", f"{type(e).__name__}: {e}"[:5000])
            tracking.client().set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return {
        "decision": decision.outcome,
        "reason": decision.reason,
        "run_id": run_id,
        "champion": final.version,
        "champion_run": final.run_id,
    }


def _refuse_the_champion(cand_ref: tracking.ModelRef) -> tracking.ModelRef | None:
    """The champion in place; a candidate that already is it is refused before any run is made."""
    champ_ref = tracking.alias_version(cand_ref.name, CHAMPION)
    if champ_ref is not None and champ_ref.version == cand_ref.version:
        raise PromotionError(f"{cand_ref.pinned} is already the champion")
    return champ_ref


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
    return Decision(req, cand, champ, "promoted" if promoted else "kept champion", reason, value, old)


TEST_DECISIONS = "test_decisions"  # promotion.test_decisions: decisions made on the version's test images


def test_decisions(ref: tracking.ModelRef) -> int:
    """How many promotion decisions have used the version's test images so far."""
    version = tracking.client().get_model_version(ref.name, str(ref.version))
    return int(version.tags.get(f"promotion.{TEST_DECISIONS}", "0"))


def record(decision: Decision, run_id: str) -> dict:
    """What the decision's run holds (table, figure, params; RUNNING until carried out) and its plan:
    the aliases to move, the tags each version and the run get. Test decisions are counted here."""
    req, cand, champ = decision.req, decision.cand, decision.champ
    table = side_by_side(req, cand, champ)
    on_test = req.split == "test"
    tr = tracking.Tracker(run_id)
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
    tr.client.log_table(run_id, table, "side_by_side.json")
    fig = figures.side_by_side(table[table.decides], req.metric, decision.outcome)
    tr.client.log_figure(run_id, fig, "side_by_side.png")
    figures.close(fig)
    counts = {cand.ref.version: test_decisions(cand.ref) + on_test} | (
        {champ.ref.version: test_decisions(champ.ref) + on_test} if champ else {}
    )
    # The decision run's tags (empty where there is no champion) and, with the champion's test
    # evaluation, its decision.json.
    detail = {
        "decision": decision.outcome,
        "reason": decision.reason,
        "metric": req.metric,
        "candidate_version": cand.ref.version,
        "candidate_value": decision.candidate_value,
        "champion_version": champ.ref.version if champ else None,
        "champion_value": decision.champion_value,
        "candidate_eval_run": cand.decisive.run_id,
        "champion_eval_run": champ.decisive.run_id if champ else None,
        "candidate_test_eval_run": cand.test.run_id,
    }
    champion_test = champ.test.run_id if champ else None
    tr.client.log_dict(run_id, detail | {"champion_test_eval_run": champion_test}, "decision.json")
    # A version keeps the few tags a user filters the registry on; the rest is the decision run's.
    tags = {cand.ref.version: {"promotion.decision": decision.outcome, "promotion.run": run_id}}
    if champ:  # the champion's promotion.decision keeps saying how it became champion
        tags[champ.ref.version] = {"promotion.last_challenge": f"v{cand.ref.version} {decision.outcome} ({run_id})"}
    for version, n in counts.items() if on_test else ():
        tags[version][f"promotion.{TEST_DECISIONS}"] = n
    aliases = {}
    if decision.outcome == "promoted":
        aliases = ({PREVIOUS: champ.ref.version} if champ else {}) | {CHAMPION: cand.ref.version}
    return {
        "run": run_id,
        "aliases": aliases,
        "tags": {str(v): {k: str(x) for k, x in t.items()} for v, t in tags.items()},
        "run_tags": {k: "" if v is None else v for k, v in detail.items()}
        | {"decided_on_test": str(on_test).lower(), f"candidate_{TEST_DECISIONS}": counts[cand.ref.version]}
        | ({f"champion_{TEST_DECISIONS}": counts[champ.ref.version]} if champ else {}),
    }


PENDING = "promotion.pending"  # a registered-model tag: the plan of a promotion not yet carried out


def carry_out(name: str, plan: dict) -> None:
    """Write the plan down, move its aliases, tag its versions and run, end the run FINISHED, then
    clear the plan. Every step may be repeated, so a process killed part-way leaves a plan that the
    next promotion or rollback carries out (`settle`): no tag or run tells what did not happen."""
    api = tracking.client()
    api.set_registered_model_tag(name, PENDING, json.dumps(plan))
    for alias, version in plan["aliases"].items():
        api.set_registered_model_alias(name, alias, str(version))
    for version, tags in plan["tags"].items():
        tracking.tag_version(name, int(version), "", tags)
    tracking.Tracker(plan["run"]).set_tags(plan["run_tags"])
    api.set_terminated(plan["run"], "FINISHED")
    for version in plan["tags"]:  # their cards say the decision, the aliases and the test decisions
        model_card.publish(name, int(version))
    api.delete_registered_model_tag(name, PENDING)


def settle(name: str) -> str | None:
    """Carry out the plan a killed promotion or rollback left; returns its run, or None."""
    text = tracking.client().get_registered_model(name).tags.get(PENDING)
    if not text:
        return None
    plan = json.loads(text)
    plan["run_tags"] = plan["run_tags"] | {"settled": "its process was killed; the next promotion carried it out"}
    carry_out(name, plan)
    return plan["run"]


def rollback(req: PromoteRequest) -> dict:
    """Swap `champion` and `previous` back; the registry always has a champion while it happens."""
    name = tracking.resolve_model(req.candidate).name
    with tracking.registry_lock(name):
        settle(name)
        return _rollback(name)


def _rollback(name: str) -> dict:
    champ, prev = tracking.alias_version(name, CHAMPION), tracking.alias_version(name, PREVIOUS)
    if champ is None or prev is None:
        raise PromotionError(
            f"rollback needs both aliases {CHAMPION!r} and {PREVIOUS!r} on {name!r}; "
            f"found champion={champ and champ.version}, previous={prev and prev.version}"
        )
    run_id = tracking.create_run(
        EXPERIMENT, f"rollback to v{prev.version}", {"promotion": "true", "decision": "pending"}
    )
    carry_out(
        name,
        {
            "run": run_id,
            "aliases": {CHAMPION: prev.version, PREVIOUS: champ.version},
            "tags": {
                str(ref.version): {"promotion.decision": "rolled back", "promotion.run": run_id}
                for ref in (champ, prev)
            },
            "run_tags": {
                "decision": "rolled back",
                "candidate_version": prev.version,
                "champion_version": champ.version,
            },
        },
    )
    return {
        "decision": "rolled back",
        "reason": f"champion v{champ.version} -> v{prev.version}",
        "run_id": run_id,
        "champion": prev.version,
        "champion_run": prev.run_id,
    }
