import numpy as np
import pytest

from detection.matching import Counts, box_centres, count_at, greedy_match


def test_centres_of_boxes():
    assert box_centres(np.array([[0, 0, 10, 20]])).tolist() == [[5, 10]]


def test_each_cell_is_matched_once_by_the_best_scored_detection():
    points = np.array([[10.0, 10.0]])
    centres = np.array([[11.0, 10.0], [10.0, 10.0]])
    matched = greedy_match(centres, np.array([0.9, 0.5]), points, radius=5)
    assert matched.tolist() == [0, -1]  # the duplicate is a false positive


def test_detection_takes_the_nearest_free_cell():
    points = np.array([[0.0, 0.0], [8.0, 0.0]])
    matched = greedy_match(np.array([[6.0, 0.0], [1.0, 0.0]]), np.array([0.9, 0.8]), points, radius=10)
    assert matched.tolist() == [1, 0]


def test_outside_the_radius_is_a_miss():
    matched = greedy_match(np.array([[20.0, 0.0]]), np.array([0.9]), np.array([[0.0, 0.0]]), radius=16)
    assert matched.tolist() == [-1]


def test_counts_at_thresholds_and_empty_cases():
    scores, tp = np.array([0.9, 0.6, 0.3]), np.array([True, False, True])
    assert count_at(scores, tp, 3, 0.05) == Counts(2, 1, 1)
    assert count_at(scores, tp, 3, 0.5) == Counts(1, 1, 2)
    c = Counts(2, 1, 1)
    assert (c.detection_rate, c.false_discovery_rate, c.precision, c.f1) == pytest.approx((2 / 3, 1 / 3, 2 / 3, 2 / 3))
    none = Counts(0, 0, 5)
    assert (none.detection_rate, none.false_discovery_rate, none.f1) == (0.0, 0.0, 0.0)
    assert np.isnan(Counts(0, 3, 0).detection_rate)  # no cells: undefined, not 0
    assert greedy_match(np.zeros((0, 2)), np.zeros(0), np.ones((3, 2)), 5).shape == (0,)
