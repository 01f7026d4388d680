"""Every class (issue 25): per-class thresholds are one pipeline stage, which evaluate, predict
and tune's replay all run, and a version carries them in its config."""

import numpy as np
import pytest

from detection.config import ConfigError, load
from detection.evaluate import judge
from detection.pipeline import ClassThresholds, Pipeline
from detection.postprocess import PostProcess
from tests.conftest import SMOKE
from tests.test_metrics import make_cache

KEEP_ALL = PostProcess(0.0, 1.0, 1000, False)
# One image: two tumour cells (label 1) and two lymphocytes (label 2), each found, plus a weak
# false positive of each class.
ITEMS = [
    (
        [
            (20, 20, 0.9, 1),
            (60, 60, 0.5, 1),
            (100, 100, 0.9, 2),
            (140, 140, 0.35, 2),
            (180, 20, 0.3, 1),
            (20, 180, 0.2, 2),
        ],
        [(20, 20, 1), (60, 60, 1), (100, 100, 2), (140, 140, 2)],
    )
]


def test_each_class_is_kept_above_its_own_threshold():
    cache = make_cache(ITEMS, classes=("tumor", "lymphocyte"))
    pooled = judge(cache, PostProcess(0.25, 1.0, 1000, False), "greedy", 10).metrics
    assert (pooled["tp"], pooled["fp"]) == (4, 1)  # one threshold cannot drop the tumour FP (0.3) and keep 0.35
    step = Pipeline(KEEP_ALL, 10, (ClassThresholds((0.4, 0.25), 10),)).run({"none": cache}, [])
    per_class = judge(step.cache, step.pp, "greedy", 10).metrics
    assert (per_class["tp"], per_class["fp"], per_class["fn"]) == (4, 0, 0)
    assert per_class["tumor/fp"] == 0 and per_class["lymphocyte/tp"] == 2


def test_point_ap_is_read_per_class():
    """A tumour false positive scoring above a true tumour cell costs the tumour class's AP alone:
    precision 2/3 past recall 0.5, so (51 x 1 + 50 x 2/3) / 101 on COCO's 101 recall points."""
    items = [([(180, 20, 0.6, 1) if d[2] == 0.3 else d for d in ITEMS[0][0]], ITEMS[0][1])]
    report = judge(make_cache(items, classes=("tumor", "lymphocyte")), KEEP_ALL, "greedy", 10).metrics
    assert report["tumor/ap"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert report["lymphocyte/ap"] == pytest.approx(1.0)
    alone = judge(make_cache([([(20, 20, 0.9), (60, 60, 0.5)], [(20, 20), (99, 99)])]), KEEP_ALL, "greedy", 10)
    assert alone.metrics["ap"] == pytest.approx(51 / 101)  # one class: the pooled AP is the class's


def test_a_version_carries_its_thresholds_and_the_pipeline_built_from_it_applies_them():
    cfg = load(SMOKE, ["data.classes=[tumor,lymphocyte]", "model.num_classes=3", "model.class_score_thresh=[0.4,0.25]"])
    pipe = Pipeline.of(cfg, 10)
    assert [type(s).__name__ for s in pipe.stages] == ["ClassThresholds"]
    cache = make_cache(ITEMS, classes=("tumor", "lymphocyte"))
    step = Pipeline(KEEP_ALL, 10, pipe.stages).run({"none": cache}, [])
    assert sorted(step.cache.det_scores.tolist()) == pytest.approx([0.35, 0.5, 0.9, 0.9])
    with pytest.raises(ConfigError, match="one threshold in \\[0, 1\\] per class"):
        load(SMOKE, ["model.class_score_thresh=[0.4,0.25]"])  # two thresholds, one class


def test_tunes_replay_of_per_class_thresholds_is_the_pipelines():
    from detection.tune import PipelineReplay

    cache = make_cache(ITEMS, classes=("tumor", "lymphocyte"))
    replay = PipelineReplay({"none": cache}, 10)
    counts = replay.counts(KEEP_ALL, None, (0.4, 0.25))
    assert (counts.tp, counts.fp, counts.fn) == (4, 0, 0)
    assert replay.counts(KEEP_ALL, None, ()).fp == 2
    assert np.isfinite(replay.froc(KEEP_ALL, None, (0.4, 0.25))["froc"])


def test_compare_reads_each_class_off_what_the_version_keeps_and_the_classes_sum_to_the_pooled():
    from detection.compare import views_of
    from detection.metrics import threshold_counts

    cache = make_cache(ITEMS, classes=("tumor", "lymphocyte"))
    cache.meta["match_radius"] = 10
    views = views_of(cache, PostProcess(0.05, 0.5, 100, False))
    assert [name for name, _, _ in views] == ["all", "tumor", "lymphocyte"]
    grid = np.round(np.arange(0, 1, 0.05), 2)
    counts = {name: threshold_counts(c, pp, "greedy", 10, grid)[2].sum(0) for name, c, pp in views}
    assert np.array_equal(counts["tumor"] + counts["lymphocyte"], counts["all"])
    assert counts["tumor"][grid.tolist().index(0.4)].tolist() == [2, 0, 0]  # at 0.4: both cells, no FP
    assert counts["lymphocyte"][grid.tolist().index(0.4)].tolist() == [1, 0, 1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_model_trained_on_two_classes_finds_each_above_chance(synth_dir, tmp_path):
    """Synthetic tumour and non-tumour cells trained together (data.classes=[tumor,non_tumor]): on the
    test split each class's detection rate beats what as many detections of that class, scattered at
    random, could reach (1 - exp(-N pi r^2 / A) bounds it: a cell is hit if any lands within r)."""
    import math

    import mlflow

    from tests.conftest import run_cli, train_tiny

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    trained = train_tiny(
        synth_dir, "train.epochs=4 data.classes=[tumor,non_tumor] model.num_classes=3", cwd=tmp_path, env=env
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    judged = run_cli(
        "evaluate", "--model", "models:/brecahad-faster-rcnn/1", "--data-dir", str(synth_dir), cwd=tmp_path, env=env
    )
    assert judged.returncode == 0, judged.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    m = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName LIKE 'evaluate%'").iloc[0]
    disc_mm2 = math.pi * (7.5e-3) ** 2  # the match radius, 7.5 um
    for c in ("tumor", "non_tumor"):
        found = m[f"metrics.test/{c}/tp"] + m[f"metrics.test/{c}/fp"]
        chance = 1 - math.exp(-found * disc_mm2 / m["metrics.test/area_mm2"])
        assert m[f"metrics.test/{c}/detection_rate"] > chance + 0.1, (c, m[f"metrics.test/{c}/detection_rate"], chance)
