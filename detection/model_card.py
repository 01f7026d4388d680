"""A model card for each registered version (Mitchell et al., "Model Cards for Model Reporting",
2019): what the version is for, what it was trained and judged on, how well and on how many
patients, at which operating point, where it falls short, and where it came from.

Everything on the card is read back from the registry and the runs (the version's config and
split, its evaluations, its tags), so writing it again gives the same card until one of those
changes. It is written as the version's description, which the registry page renders as
Markdown, and as `model_card.md` among the version's files (its LoggedModel's artifacts). Every
command that registers a version writes its card; `evaluate` and `promote` write it again.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from . import config as config_mod
from . import heldout, tracking
from .config import Config
from .metrics import case_of
from .split import SPLITS, Split

CARD = "model_card.md"
DESCRIPTION_LIMIT = 5000  # characters: the registry's description column
SHOWN = ("detection_rate", "fdr", "f1", "fp_per_mm2", "froc", "ap")
LABELS = {
    "detection_rate": "detection rate",
    "fdr": "FDR",
    "f1": "F1",
    "fp_per_mm2": "FP per mm²",
    "froc": "FROC",
    "ap": "point AP",
}
PAPER_STD = 0.01  # an image_std below this is the paper's (~0.004), not a pixel std (~0.15)


@dataclass(frozen=True)
class Evaluated:
    """The latest evaluation of the version on one split: its run, metrics (split prefix removed)
    and how its intervals were made."""

    run_id: str
    metrics: dict[str, float]
    protocol: str
    ci_unit: str
    ci_note: str


@dataclass(frozen=True)
class Facts:
    name: str
    version: int
    run_id: str | None
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]
    config: Config | None
    split: Split | None
    evaluations: dict[str, Evaluated] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)  # the registering run's last val/ figures

    @property
    def model_id(self) -> str | None:
        return self.source.removeprefix("models:/") if self.source.startswith("models:/m-") else None


# --- reading the facts ------------------------------------------------------------------------


def gather(name: str, version: int) -> Facts:
    """Everything the card says, read from the registry and the runs."""
    mlflow.flush_async_logging()  # the registering run's last metrics may still be queued
    api = tracking.client()
    mv = api.get_model_version(name, str(version))
    run = _run(mv.run_id)
    return Facts(
        name,
        int(version),
        mv.run_id,
        mv.source or "",
        dict(mv.tags),
        tuple(sorted(getattr(mv, "aliases", ()) or ())),
        _config(name, version),
        _split(mv.run_id),
        _evaluations(name, version, run),
        {k: v for k, v in (run.data.metrics if run else {}).items() if k.startswith("val/")},
    )


def _run(run_id: str | None):
    if not run_id:
        return None
    try:
        return tracking.client().get_run(run_id)
    except MlflowException:
        return None


def _config(name: str, version: int) -> Config | None:
    """The version's own config.yaml (a small file among its artifacts)."""
    location = tracking.client().get_model_version_download_uri(name, str(version))
    with tempfile.TemporaryDirectory(prefix="brecahad-card-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/artifacts/config.yaml", dst_path=tmp)
            return config_mod.from_dict(yaml.safe_load(Path(path).read_text()), f"{name} v{version} config.yaml")
        except (MlflowException, OSError, config_mod.ConfigError):
            return None


def _split(run_id: str | None) -> Split | None:
    if not run_id:
        return None
    try:
        return heldout.run_split(run_id)
    except (tracking.TrackingError, KeyError, TypeError):
        return None


def _evaluations(name: str, version: int, run) -> dict[str, Evaluated]:
    """The newest finished evaluation of the version per split, in its own terms first (whole
    images, greedy matching, its own radius), else the test figures its registering run logged (a
    tune study judges its chosen point on the test caches before the version exists)."""
    found = tracking.find_runs(
        f"tags.`{tracking.TAG}evaluation` = 'true' and tags.`{tracking.TAG}model_name` = '{name}' "
        f"and tags.`{tracking.TAG}model_version` = '{version}'"
    )
    out: dict[str, Evaluated] = {}
    own = {"protocol": "whole", "matching": "greedy", "radius_from": "version"}

    def departures(r) -> int:
        return sum(r.data.tags.get(tracking.TAG + k, v) != v for k, v in own.items())

    for r in sorted(found, key=departures):  # stable: the newest first among equals
        split = r.data.tags.get(tracking.TAG + "split", "")
        if split not in out:
            out[split] = _evaluated(r, split)
    registered = run.data.tags.get(tracking.TAG + "registered_version") if run is not None else None
    if "test" not in out and registered == str(version) and "test/f1" in run.data.metrics:
        out["test"] = _evaluated(run, "test")
    return out


def _evaluated(run, split: str) -> Evaluated:
    tags = run.data.tags
    metrics = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(f"{split}/")}
    return Evaluated(
        run.info.run_id,
        metrics,
        tags.get(tracking.TAG + "protocol", "whole"),
        tags.get(tracking.TAG + "ci_unit", "case"),
        tags.get(tracking.TAG + "ci_note", ""),
    )


# --- writing the card -------------------------------------------------------------------------


def render(f: Facts) -> str:
    """The card as Markdown: pure, so a test can read it without a store."""
    parts = [f"# {f.name} v{f.version}", _summary(f), _intended_use(f), _data(f), _metrics(f), _operating_point(f)]
    parts += [_limits(f), _lineage(f)]
    return "\n\n".join(p for p in parts if p).strip() + "\n"


# What a version was made from, one sentence per lineage tag it carries.
ORIGINS = (
    ("parent_version", "Fine-tuned from {parent_version}."),
    (
        "study",
        "Version {source_version} with its thresholds tuned by Optuna study `{study}` (trial {trial}, "
        "objective {objective}).",
    ),
    ("second_look_of", "Version {second_look_of} with a learned second look that rescores each detection."),
    ("reregistered_from", "Version {reregistered_from} re-registered from its weights (it was a pickled object)."),
)


def _summary(f: Facts) -> str:
    tags = defaultdict(lambda: "?", f.tags)
    lines = [sentence.format_map(tags) for key, sentence in ORIGINS if f.tags.get(key)]
    val = f.training
    if f.tags.get("second_look_of") and {"val/detection_rate", "val/fdr_alone", "val/fdr"} <= val.keys():
        lines.append(
            f"On val at detection rate {val['val/detection_rate']:.3f} it takes the FDR from "
            f"{val['val/fdr_alone']:.3f} (the detector alone) to {val['val/fdr']:.3f}."
        )
    cfg = f.config
    if cfg is not None:
        classes = ", ".join(cfg.data.classes)
        lines.append(
            f"Faster R-CNN ({cfg.model.backbone} FPN, start: {cfg.model.weights}) that finds {classes} cells "
            f"in H&E images at {cfg.data.mpp:g} µm/px; config `{cfg.name}`, {cfg.train.epochs} epochs."
        )
    if f.aliases:
        lines.append("Aliases: " + ", ".join(f"`{a}`" for a in f.aliases) + ".")
    return " ".join(lines)


def _intended_use(f: Facts) -> str:
    return (
        "## Intended use\n"
        "Research on breast-cancer histopathology: finding and counting tumour-cell nuclei in H&E fields of "
        "view (BreCaHAD-like, 40×), or pre-annotating them for a pathologist who checks each one. Not for "
        "diagnosis, and not validated on other stains, scanners, magnifications or organs."
    )


def _data(f: Facts) -> str:
    s = f.split
    if s is None:
        return "## Data and split\nThe registering run recorded no split: its held-out images are unknown."
    rows = ["| split | images | cases |", "| --- | --- | --- |"]
    for part in SPLITS:
        names = s.names(part)
        cases = Counter(case_of(n) for n in names)
        shown = ", ".join(sorted(cases)) if len(cases) <= 6 else f"{len(cases)} cases"
        rows.append(f"| {part} | {len(names)} | {len(cases)}: {shown} |")
    digests = f"Split `{s.mode}` (seed {s.seed}), hash `{f.tags.get('split_hash', s.digest)}`"
    digests += f"; images by SHA-256 of their {'pixels' if s.hash_kind == 'pixels' else 'files'}."
    return "## Data and split\n" + "\n".join(rows) + "\n\n" + digests


def _metrics(f: Facts) -> str:
    head = "## Metrics\n"
    if not f.evaluations:
        val = f.training
        seen = (
            f" Training's last validation (patches, not whole images): detection rate "
            f"{val.get('val/detection_rate', float('nan')):.3f}, FDR {val.get('val/fdr', float('nan')):.3f}."
            if "val/detection_rate" in val
            else ""
        )
        return (
            head + f"Not evaluated yet: `python -m detection evaluate --model models:/{f.name}/{f.version} "
            f"--data-dir DIR` fills this table.{seen}"
        )
    rows = ["| split | " + " | ".join(LABELS[k] for k in SHOWN) + " | images | cases | run |"]
    rows.append("| --- " * (len(SHOWN) + 4) + "|")
    notes = []
    for split in ("val", "test", "all"):
        e = f.evaluations.get(split)
        if e is None:
            continue
        cells = [_with_interval(e.metrics, k) for k in SHOWN] + [_count(e.metrics, k) for k in ("n_images", "n_cases")]
        rows.append(f"| {split} ({e.protocol}) | " + " | ".join(cells) + f" | `{e.run_id[:8]}` |")
        if e.ci_note:
            notes.append(f"{split}: {e.ci_note}.")
    radius = f.config.eval.match_radius_um if f.config else None
    how = (
        "95% intervals in brackets: a bootstrap over whole cases (patients), or images where one case is all there is."
    )
    how += f" A detection matches a cell within {radius:g} µm of its centre." if radius else ""
    return head + "\n".join(rows) + "\n\n" + how + ("\n\n" + " ".join(notes) if notes else "")


def _count(metrics: dict[str, float], key: str) -> str:
    return str(int(metrics[key])) if key in metrics else "?"


def _with_interval(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return "–"
    value = metrics[key]
    text = f"{value:.1f}" if key == "fp_per_mm2" else f"{value:.3f}"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{text} [{low:.3f}, {high:.3f}]" if low is not None and high is not None else text


def _operating_point(f: Facts) -> str:
    cfg = f.config
    if cfg is None:
        return "## Operating point\nThe version's config could not be read."
    m = cfg.model
    lines = [
        f"- score threshold {m.box_score_thresh:g}, NMS IoU {m.box_nms_thresh:g}"
        f"{' (class-agnostic)' if m.box_nms_class_agnostic else ''}, at most {m.box_detections_per_img} "
        f"detections per model input",
    ]
    if m.class_score_thresh:
        per = ", ".join(f"{c} {t:g}" for c, t in zip(cfg.data.classes, m.class_score_thresh, strict=False))
        lines.append(f"- per-class score thresholds: {per}")
    if cfg.eval.tta_views:
        lines.append(
            f"- test-time flips {', '.join(cfg.eval.tta_views)}, fused score kept above {cfg.eval.tta_thresh:g}"
        )
    if cfg.second_look.weight > 0:
        lines.append(
            f"- second look: fused score (weight {cfg.second_look.weight:g}) kept above {cfg.second_look.thresh:g}"
        )
    lines.append(f"- input scale {cfg.data.mpp:g} µm/px, the scale it was trained at")
    return "## Operating point\n" + "\n".join(lines)


def _limits(f: Facts) -> str:
    lines = []
    if f.split is not None:
        test_cases = {case_of(n) for n in f.split.test}
        if len(test_cases) <= 1:
            lines.append(
                f"The test split holds {len(f.split.test)} images of {len(test_cases)} case: its figures speak for "
                f"that patient, and its intervals are over images, not patients."
            )
        elif len(test_cases) < 5:
            lines.append(f"The test split holds {len(test_cases)} cases: too few patients for a tight interval.")
    cfg = f.config
    if cfg is not None:
        if max(cfg.model.image_std) < PAPER_STD:
            lines.append(
                f"Inputs are normalised with the paper's image_std ({max(cfg.model.image_std):.4f}), about 40× "
                f"smaller than the pixels' spread: colour shifts move its scores much more than a pixel-std "
                f"model's (experiments/paper-norm.yaml measures the spread instead)."
            )
        lines.append(
            f"Trained at {cfg.data.mpp:g} µm/px: cells look another size at another scale; give images their "
            f"resolution (TIFF tags) or resample them to it."
        )
        if cfg.model.weights == "none":
            lines.append("Trained from scratch (no ImageNet weights): a smoke-sized model, not the paper's.")
    size = f"{cfg.data.box_size} px" if cfg is not None else "fixed-size"
    lines.append(f"Annotations are points: it learned {size} boxes around them, not the cells' outlines.")
    decisions = f.tags.get("promotion.test_decisions")
    body = "## Known limits\n" + "\n".join(f"- {line}" for line in lines)
    if decisions and decisions != "0":
        body += f"\n\nPromotion decisions made on its test images: {decisions}."
    return body


def _lineage(f: Facts) -> str:
    t = f.tags
    lines = [f"- registered from run `{f.run_id}`" if f.run_id else "- registering run unknown"]
    if f.model_id:
        lines.append(f"- logged model `{f.model_id}` (`models:/{f.model_id}`)")
    for key, label in (
        ("parent_version", "fine-tuned from"),
        ("source_version", "tuned from version"),
        ("second_look_of", "second look of version"),
        ("reregistered_from", "re-registered from version"),
    ):
        if t.get(key):
            lines.append(f"- {label} {t[key]}")
    if t.get("study"):
        lines.append(
            f"- Optuna study `{t['study']}`, trial {t.get('trial', '?')}, study run `{t.get('tune_run_id', '?')}`"
        )
    if t.get("promotion.decision"):
        lines.append(f"- promotion: {t['promotion.decision']} (decision run `{t.get('promotion.run', '?')}`)")
    if t.get("promotion.last_challenge"):
        lines.append(f"- last challenge: {t['promotion.last_challenge']}")
    return "## Lineage\n" + "\n".join(lines)


def description(card: str) -> str:
    """The card as a registry description: whole when it fits, else cut at a section with a pointer
    to the full card among the version's files."""
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    tail = f"\n\n… the full card is {CARD} among the version's files."
    cut = card[: DESCRIPTION_LIMIT - len(tail)]
    return cut[: cut.rfind("\n## ")] + tail if "\n## " in cut else cut + tail


def publish(name: str, version: int) -> str:
    """Write the version's card as its description and as model_card.md among its files; the card."""
    facts = gather(name, version)
    card = render(facts)
    api = tracking.client()
    api.update_model_version(name, str(version), description=description(card))
    if facts.model_id:
        with tempfile.TemporaryDirectory(prefix="brecahad-card-") as tmp:
            path = Path(tmp) / CARD
            path.write_text(card)
            api.log_model_artifact(facts.model_id, str(path))
    return card
