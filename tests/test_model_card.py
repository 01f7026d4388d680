"""Issue 26: a registered version's model card, rendered from facts (no store needed)."""

from detection import config, model_card
from detection.model_card import Evaluated, Facts
from detection.split import Split
from tests.conftest import ROOT, SMOKE


def _split(test: tuple[str, ...]) -> Split:
    names = {"train": ("Case_1-01", "Case_1-02", "Case_2-01"), "val": ("Case_3-01",), "test": test}
    sha = {n: "0" * 64 for part in names.values() for n in part}
    return Split("case", 0, names["train"], names["val"], names["test"], sha, "pixels")


def _facts(cfg, split, evaluations=None, tags=None, training=None) -> Facts:
    return Facts(
        "brecahad-faster-rcnn",
        3,
        "a" * 32,
        "models:/m-0123456789abcdef",
        {"split_hash": split.digest} | (tags or {}),
        ("challenger",),
        cfg,
        split,
        evaluations or {},
        training or {},
    )


def test_a_card_gives_metrics_with_their_intervals_and_the_cases_behind_them():
    cfg = config.load(str(ROOT / "experiments" / "paper.yaml"))
    metrics = {"detection_rate": 0.9902, "detection_rate_ci_low": 0.95, "detection_rate_ci_high": 1.0}
    metrics |= {"fdr": 0.61, "f1": 0.56, "fp_per_mm2": 412.5, "n_images": 12, "n_cases": 3}
    test = Evaluated("b" * 32, metrics, "whole", "case", "")
    card = model_card.render(_facts(cfg, _split(("Case_4-01", "Case_5-01", "Case_6-01")), {"test": test}))
    assert card.startswith("# brecahad-faster-rcnn v3\n")
    for section in ("## Intended use", "## Data and split", "## Metrics", "## Operating point", "## Known limits"):
        assert section in card
    assert "| test (whole) | 0.990 [0.950, 1.000] | 0.610 | 0.560 | 412.5 | – | – | 12 | 3 | `bbbbbbbb` |" in card
    assert "| test | 3 | 3: Case_4, Case_5, Case_6 |" in card
    assert "score threshold 0.05, NMS IoU 0.8" in card and "within 7.5 µm" in card
    assert "the paper's image_std (0.0044)" in card  # a known limit of paper.yaml
    assert "3 cases: too few patients" in card
    assert "logged model `m-0123456789abcdef`" in card and "## Lineage" in card


def test_a_one_case_test_split_and_lineage_are_said():
    cfg = config.load(SMOKE)
    tags = {"parent_version": "models:/brecahad-faster-rcnn/1", "promotion.test_decisions": "2"}
    tags |= {"promotion.decision": "promoted", "promotion.run": "r" * 32}
    training = {"val/detection_rate": 0.8, "val/fdr": 0.5}
    card = model_card.render(_facts(cfg, _split(("Case_4-01", "Case_4-02")), tags=tags, training=training))
    assert "Fine-tuned from models:/brecahad-faster-rcnn/1." in card
    assert "2 images of 1 case: its figures speak for that patient" in card
    assert "Not evaluated yet: `python -m detection evaluate --model models:/brecahad-faster-rcnn/3" in card
    assert "Training's last validation (patches, not whole images): detection rate 0.800, FDR 0.500." in card
    assert "Promotion decisions made on its test images: 2." in card
    assert f"promotion: promoted (decision run `{'r' * 32}`)" in card
    assert "Trained from scratch" in card  # smoke.yaml's weights: none
    assert "image_std" not in card  # smoke.yaml measures the pixels' spread


def test_a_card_too_long_for_the_registry_is_cut_at_a_section_and_points_to_the_file():
    card = "# m v1\n\n## A\n" + "x" * 3000 + "\n\n## B\n" + "y" * 3000 + "\n"
    described = model_card.description(card)
    assert len(described) <= model_card.DESCRIPTION_LIMIT and "## B" not in described
    assert described.endswith("the full card is model_card.md among the version's files.")
    assert model_card.description("# short\n") == "# short\n"


def test_a_tuned_or_second_look_version_says_what_it_was_made_from():
    cfg = config.load(SMOKE)
    split = _split(("Case_4-01",))
    tags = {"study": "pp", "trial": "12", "objective": "f1", "source_version": "2"}
    card = model_card.render(_facts(cfg, split, tags=tags))
    assert "Version 2 with its thresholds tuned by Optuna study `pp` (trial 12, objective f1)." in card
    val = {"val/detection_rate": 0.9, "val/fdr_alone": 0.6, "val/fdr": 0.4}
    card = model_card.render(_facts(cfg, split, tags={"second_look_of": "3"}, training=val))
    assert "Version 3 with a learned second look that rescores each detection." in card
    assert "it takes the FDR from 0.600 (the detector alone) to 0.400." in card
    assert "Optuna" not in card and "?" not in card.split("## Intended use")[0]
