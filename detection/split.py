"""Deterministic train/val/test splits, recorded as split.json with a hash.

`case` keeps every image of a case in one split, so a model is never judged on a patient it
trained on. `paper` draws images at random, as the paper did (138 / 12 / 12 of 162).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from . import leakage
from .config import SplitConfig
from .data import Sample
from .errors import DetectionError

SPLITS = ("train", "val", "test")


class SplitError(DetectionError, ValueError):
    """A split that cannot be made or no longer matches the data; the message names the images."""


@dataclass(frozen=True)
class Split:
    mode: str
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    sha256: dict[str, str]  # image hash by name, for leakage checks at evaluation
    # "pixels": sha256 of the decoded pixels (data.pixel_sha256); "file": of the file's bytes (older runs)
    hash_kind: str = "file"
    thumbnails: dict[str, str] = field(default_factory=dict)  # training images' grey thumbnails (leakage.py)
    thumbnail_kind: str = leakage.KIND  # leakage.LEGACY_KIND in splits recorded before issue 20

    def names(self, split: str) -> tuple[str, ...]:
        return getattr(self, split)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "sha256": dict(sorted(self.sha256.items())),
            "hash_kind": self.hash_kind,
            "thumbnails": dict(sorted(self.thumbnails.items())),
            "thumbnail_kind": self.thumbnail_kind,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def digest(self) -> str:
        """Names the split's membership (not its order), for the `split_hash` tag."""
        key = json.dumps({s: sorted(self.names(s)) for s in SPLITS}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls(
            d["mode"],
            d["seed"],
            tuple(d["train"]),
            tuple(d["val"]),
            tuple(d["test"]),
            dict(d["sha256"]),
            d.get("hash_kind", "file"),
            dict(d.get("thumbnails", {})),
            d.get("thumbnail_kind", leakage.LEGACY_KIND),
        )


def _target(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def split_by_case(names_by_case: dict[str, list[str]], cfg: SplitConfig) -> dict[str, list[str]]:
    """Whole cases into test, then val, each filled up to its share of images; the rest train.

    A case too big for what a split still lacks is passed over, so a small dataset keeps most
    images for training; a split that would stay empty takes the smallest case left.
    """
    if len(names_by_case) < 3:
        raise SplitError(
            f"split mode 'case' needs at least 3 cases (one per split), found {len(names_by_case)}: "
            f"{', '.join(sorted(names_by_case))}; use data.split.mode=paper for this folder"
        )
    cases = sorted(names_by_case)
    random.Random(cfg.seed).shuffle(cases)
    total = sum(len(v) for v in names_by_case.values())
    chosen: dict[str, list[str]] = {}
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        target, taken = _target(total, fraction), []
        count = 0
        for case in list(cases):
            if count < target and count + len(names_by_case[case]) <= target:
                taken.append(case)
                count += len(names_by_case[case])
                cases.remove(case)
        if not taken:
            smallest = min(cases, key=lambda c: len(names_by_case[c]))
            taken.append(smallest)
            cases.remove(smallest)
        chosen[split] = taken
        if len(cases) < 1 + (split == "test"):
            raise SplitError(f"split mode 'case': too few cases left for train after filling {split}")
    chosen["train"] = cases
    return {s: sorted(n for c in chosen[s] for n in names_by_case[c]) for s in SPLITS}


def split_by_image(names: list[str], cfg: SplitConfig) -> dict[str, list[str]]:
    if len(names) < 3:
        raise SplitError(f"split mode 'paper' needs at least 3 images, found {len(names)}")
    order = sorted(names)
    random.Random(cfg.seed).shuffle(order)
    n_test = _target(len(order), cfg.test_fraction)
    n_val = _target(len(order), cfg.val_fraction)
    if n_test + n_val >= len(order):
        raise SplitError(f"{len(order)} images leave none for training with {n_val} val and {n_test} test")
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


def make_split(
    samples: list[Sample], cfg: SplitConfig, sha256: dict[str, str], thumbnails: dict[str, str] | None = None
) -> Split:
    if cfg.mode == "case":
        by_case: dict[str, list[str]] = {}
        for s in samples:
            by_case.setdefault(s.case, []).append(s.name)
        parts = split_by_case(by_case, cfg)
    else:
        parts = split_by_image([s.name for s in samples], cfg)
    train = tuple(parts["train"])
    kept = {n: t for n, t in (thumbnails or {}).items() if n in set(train)}
    return Split(cfg.mode, cfg.seed, train, tuple(parts["val"]), tuple(parts["test"]), sha256, "pixels", kept)
