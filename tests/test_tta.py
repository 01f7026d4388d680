"""Test-time augmentation with point fusion: identities that must hold whatever the model."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from detection import config
from detection.data import load_dataset
from detection.model import build_model
from detection.pipeline import detect
from detection.tta import flip, fuse, unflip
from tests.conftest import ROOT


def _view(rng, n=40):
    centres = rng.uniform(20, 600, (n, 2))
    boxes = np.concatenate([centres - 16, centres + 16], 1).astype(np.float32)
    return boxes, rng.uniform(0.05, 1, n).astype(np.float32), np.ones(n, np.int64)


def test_fusing_identical_views_gives_the_single_view():
    boxes, scores, labels = _view(np.random.default_rng(0))
    for n in (1, 2, 4):
        fused = fuse([(boxes, scores, labels)] * n, radius=16)
        order = np.argsort(-scores, kind="stable")
        assert np.allclose(fused.boxes, boxes[order], atol=1e-4) and np.allclose(fused.scores, scores[order])
        assert (fused.votes == n).all()


def test_a_detection_one_view_dreams_up_keeps_a_quarter_of_its_score():
    boxes, scores, labels = _view(np.random.default_rng(1), 10)
    extra = np.array([[700, 700, 732, 732]], np.float32)
    lone = (np.concatenate([boxes, extra]), np.concatenate([scores, [0.8]]).astype(np.float32), np.ones(11, np.int64))
    fused = fuse([lone, (boxes, scores, labels), (boxes, scores, labels), (boxes, scores, labels)], radius=16)
    (k,) = np.flatnonzero(np.isclose(fused.boxes[:, 0], 700))
    assert fused.scores[k] == pytest.approx(0.2) and fused.votes[k] == 1
    # Two detections of one view are never fused with each other, however close.
    twins = (
        np.array([[0, 0, 32, 32], [2, 0, 34, 32]], np.float32),
        np.array([0.9, 0.8], np.float32),
        np.ones(2, np.int64),
    )
    assert len(fuse([twins], radius=16).scores) == 2


def test_unflip_inverts_flip():
    rng = np.random.default_rng(2)
    boxes, _, _ = _view(rng)
    for view in ("none", "h", "v", "hv"):
        assert np.allclose(unflip(unflip(boxes, view, 700, 1000), view, 700, 1000), boxes)
    image = rng.integers(0, 255, (7, 10, 3), dtype=np.uint8)
    assert np.array_equal(flip(image, "hv"), image[::-1, ::-1])


@pytest.mark.parametrize(
    "views, mirror",
    [
        pytest.param(("none", "h", "v", "hv"), "h", marks=pytest.mark.slow),
        pytest.param(("none", "h", "v", "hv"), "v", marks=pytest.mark.slow),
        (("none", "h"), "h"),
    ],
)
def test_a_flipped_image_gives_the_mirrored_fused_detections(synth_dir, views, mirror):
    cfg = config.load(str(ROOT / "experiments" / "smoke.yaml"), ["data.patch_size=[320,420]"])
    cfg = replace(cfg, eval=replace(cfg.eval, tta_views=views, tta_thresh=0.05))
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    image = load_dataset(synth_dir)[0].read_image()[:300, :400]
    plain = detect(model, [image], cfg)
    flipped = detect(model, [flip(image, mirror)], cfg)
    assert len(plain) > 10 and len(plain) == len(flipped)
    mirrored = unflip(flipped[["x1", "y1", "x2", "y2"]].to_numpy(), mirror, 300, 400)
    a = np.lexsort(plain[["y1", "x1"]].to_numpy().T.round(2))
    b = np.lexsort(mirrored[:, [1, 0]].T.round(2))
    assert np.allclose(plain[["x1", "y1", "x2", "y2"]].to_numpy()[a], mirrored[b], atol=1e-3)
    assert np.allclose(plain["score"].to_numpy()[a], flipped["score"].to_numpy()[b], atol=1e-5)
