"""Figures drawn from real BreCaHAD pixels: the overlay draws thousands of boxes as one collection,
and what it draws is the picture that one patch per box gave."""

import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PatchCollection
from matplotlib.patches import Rectangle

from detection import figures
from detection.data import load_dataset, points_to_boxes
from tests.conftest import SAMPLE, need_shared


def _one_patch_per_box(image, gt_boxes, boxes, scores, title):
    """The overlay as it was first written: a Rectangle added to the axes for every box."""
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
    ax.imshow(image)
    for x1, y1, x2, y2 in gt_boxes:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
    for (x1, y1, x2, y2), s in zip(boxes, scores):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.0, alpha=float(0.4 + 0.6 * s)))
    ax.set_title(f"{title}: ground truth red, predictions green", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    matplotlib.pyplot.close(fig)
    return out


@pytest.fixture(scope="module")
def real_image():
    sample = load_dataset(need_shared(SAMPLE))[0]
    image = sample.read_image()
    h, w = image.shape[:2]
    truth = points_to_boxes(sample.points["tumor"], 32, w, h)
    rng = np.random.default_rng(0)
    # Detections as an untrained model leaves them: many, overlapping, some past the image's edge.
    xy = rng.uniform(-20, [w, h], size=(400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 60, size=(400, 2))], axis=1).astype(np.float32)
    return sample.name, image, truth, boxes, rng.uniform(0, 1, 400).astype(np.float32)


def test_the_overlay_draws_what_one_patch_per_box_drew(real_image):
    name, image, truth, boxes, scores = real_image
    args = (image, truth, boxes, scores, name)
    new, old = figures.overlay(*args), _one_patch_per_box(*args)
    assert len(new.axes[0].patches) == 0 and len(new.axes[0].collections) == 2
    assert new.axes[0].get_xlim() == old.axes[0].get_xlim() and new.axes[0].get_ylim() == old.axes[0].get_ylim()
    a, b = _pixels(new), _pixels(old)
    assert a.shape == b.shape == image.shape
    assert np.array_equal(a, b), f"{(a != b).any(axis=2).sum()} pixels differ"


def test_an_overlay_without_boxes_is_the_image_and_its_title(real_image):
    name, image, truth, boxes, scores = real_image
    fig = figures.overlay(image, truth[:0], boxes[:0], scores[:0], name)
    layers = [c for c in fig.axes[0].collections if isinstance(c, PatchCollection)]
    assert len(layers) == 2 and all(len(c.get_paths()) == 0 for c in layers)  # both layers there, empty
    assert fig.axes[0].get_title().startswith(name) and len(truth) > 10
    matplotlib.pyplot.close(fig)


def test_an_overlay_without_ground_truth_does_not_claim_to_draw_it(real_image):
    """Issue 22: predict's overlays said "ground truth red" with no ground truth drawn."""
    name, image, truth, boxes, scores = real_image
    drawn = figures.overlay(image, truth[:0], boxes, scores, name)
    assert "ground truth" not in drawn.axes[0].get_title() and "predictions green" in drawn.axes[0].get_title()
    both = figures.overlay(image, truth, boxes, scores, name)
    assert "ground truth red" in both.axes[0].get_title()
    matplotlib.pyplot.close(drawn)
    matplotlib.pyplot.close(both)


def test_the_froc_figures_draw_from_a_curve_table():
    import pandas as pd

    from detection import figures

    curve = pd.DataFrame(
        {"threshold": [0.1, 0.5, 0.9], "detection_rate": [0.9, 0.6, 0.2], "fp_per_mm2": [300.0, 40.0, 0.0]}
    )
    metrics = {"froc_dr_at_10": 0.2, "froc_dr_at_300": 0.9, "froc": 0.55}
    for fig in (figures.froc(curve, metrics, "t"), figures.froc_versions({"a": curve, "b": curve}, [10, 300], "t")):
        assert fig.axes[0].get_xscale() == "log" and fig.axes[0].lines
        figures.close(fig)


def test_a_curve_without_false_positives_stays_in_view_and_target_labels_keep_off_it():
    """Issue 22: a compare curve with FDR 0 up to detection rate 0.97 hid on the axis, and the
    target labels were written over it."""
    import pandas as pd

    clean = pd.DataFrame({"fdr": [0.0, 0.0, 0.0, 0.2], "detection_rate": [0.1, 0.5, 0.97, 1.0]})
    fig = figures.dr_vs_fdr({"v1": clean}, [0.5, 0.6, 0.7], "test whole")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] < 0  # the curve at FDR 0 is off the spine
    (right,) = ax.child_axes  # the targets' own axis, beside the plot rather than on its curves
    fig.canvas.draw()
    assert [t.get_text() for t in right.get_yticklabels()] == ["0.5", "0.6", "0.7"]
    assert not [t for t in ax.texts if t.get_text() in ("0.5", "0.6", "0.7")]
    matplotlib.pyplot.close(fig)
