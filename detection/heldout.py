"""What an evaluation may look at: the request, the held-out images its version's training run
recorded (split.json), and the guard that refuses renamed held-out images and copies of training
images (leakage.py). `evaluate`, `second-look` and `promote` select their images here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from . import leakage, tracking
from .choices import MATCHERS, PROTOCOLS, SPLITS
from .data import Sample, load_dataset
from .errors import DetectionError
from .split import Split


class EvaluationError(DetectionError, ValueError):
    """Bad input to an evaluation, found before any run or registry entry is written."""


@dataclass(frozen=True)
class Request:
    model: str
    data_dir: Path
    split: str = SPLITS[0]
    protocol: str = PROTOCOLS[0]
    matching: str = MATCHERS[0]
    seed: int = 0
    allow_overlap: bool = False
    device: str = ""  # auto|cpu|cuda|cuda:N; empty: $BRECAHAD_DEVICE, else auto
    match_radius_um: float | None = None  # None: the version's own eval.match_radius_um

    def check(self) -> None:
        if self.match_radius_um is not None and not self.match_radius_um > 0:
            raise EvaluationError(f"match_radius_um={self.match_radius_um} must be > 0 micrometres")
        for name, value, choices in (
            ("split", self.split, SPLITS),
            ("protocol", self.protocol, PROTOCOLS),
            ("matching", self.matching, MATCHERS),
        ):
            if value not in choices:
                raise EvaluationError(f"{name}={value!r} must be one of {', '.join(choices)}")


def run_split(run_id: str) -> Split:
    """The split a training run recorded (its split.json); TrackingError when it recorded none."""
    return Split.from_dict(yaml.safe_load(tracking.read_artifact_text(run_id, "split.json")))


def recorded_split(ref: tracking.ModelRef) -> Split:
    if not ref.run_id:
        raise EvaluationError(f"{ref.uri} (version {ref.version}) has no training run; use split=all")
    try:
        return run_split(ref.run_id)
    except tracking.TrackingError:
        raise EvaluationError(
            f"{ref.uri} (version {ref.version}): its training run {ref.run_id} recorded no split.json, "
            f"so its held-out images are unknown; evaluate a folder of new images with split=all"
        ) from None


def select(req: Request, split: Split | None) -> tuple[list[Sample], dict[str, str]]:
    """The samples to evaluate and the hash of each, of the kind the split recorded (pixels for
    current models)."""
    samples = load_dataset(req.data_dir)
    if req.split != "all":
        wanted = split.names(req.split)
        by_name = {s.name: s for s in samples}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise EvaluationError(
                f"{req.data_dir} lacks {len(missing)} of the {len(wanted)} {req.split} images recorded by the "
                f"model's training run: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        samples = [by_name[n] for n in wanted]
    if not samples:
        raise EvaluationError(f"no {req.split} images to evaluate in {req.data_dir}")
    if split is not None and split.hash_kind == "file":
        return samples, {s.name: s.sha256() for s in samples}
    return samples, {s.name: s.fingerprint()[0] for s in samples}


def renamed(req: Request, split: Split | None, hashes: dict[str, str]) -> list[str]:
    """Held-out images whose pixels differ from what the training run recorded under their name."""
    if split is None or req.split == "all":
        return []
    return sorted(n for n, h in hashes.items() if n in split.sha256 and split.sha256[n] != h)


def leaked(split: Split | None, samples: list[Sample], hashes: dict[str, str]) -> dict[str, str]:
    """Evaluated images that are a training image, each with what it is: the same pixels, or (with
    recorded thumbnails) an edited copy of a named training image (leakage.py)."""
    if split is None:
        return {}
    trained = {split.sha256[n]: n for n in split.train if n in split.sha256}
    found = {n: f"the pixels of {trained[h]}" for n, h in hashes.items() if h in trained}
    rest = [s for s in samples if s.name not in found]
    if split.thumbnails and rest and split.thumbnail_kind == leakage.KIND:
        recorded = leakage.banks(split.thumbnails)
        for s in rest:
            name, similarity = leakage.most_like(s.read_image(), recorded)
            if similarity >= leakage.COPY_SIMILARITY:
                found[s.name] = f"a copy of {name}, correlation {similarity:.2f}"
    elif split.thumbnails and rest:
        found |= {s.name: "a copy" for s in rest if leakage.legacy_copy(s.read_image(), split.thumbnails)}
    return dict(sorted(found.items()))


def guard(
    req: Request, ref: tracking.ModelRef, split: Split | None, samples: list[Sample], hashes: dict[str, str]
) -> list[str]:
    """Refuse held-out images that are not what the training run recorded under their names, and
    evaluated images that are training images; with allow_overlap, the names to tag instead."""
    changed = renamed(req, split, hashes)
    overlap = leaked(split, samples, hashes)
    problems = []
    if changed:
        problems.append(
            f"{len(changed)} {req.split} image(s) in {req.data_dir} are not the images {ref.uri}'s "
            f"training run recorded under those names (their pixels differ): {', '.join(changed[:8])}; "
            f"restore the original files"
        )
    if overlap:
        listed = ", ".join(f"{n} ({what})" for n, what in list(overlap.items())[:8])
        problems.append(
            f"{len(overlap)} evaluated image(s) are training images of {ref.uri} (the same pixels, or a "
            f"re-compressed, flipped, turned, shifted, cropped or recoloured copy): {listed}"
        )
    if problems and not req.allow_overlap:
        raise EvaluationError("; ".join(problems) + "; pass allow_overlap=true to evaluate anyway (the run is tagged)")
    return sorted(set(overlap) | set(changed))
