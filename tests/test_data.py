import json

import numpy as np
import pytest
import tifffile

from detection import config
from detection.config import BRECAHAD_CLASSES, DataConfig
from detection.data import DatasetError, check_dataset, load_dataset, points_to_boxes, read_points
from detection.sampling import crop, validation_patches
from tests.conftest import GROUND_TRUTH, ROOT, SAMPLE, need_shared, run_cli


def test_reads_real_ground_truth_files():
    root = need_shared(GROUND_TRUTH)
    points = read_points(root / "Case_1-02.json")
    assert set(points) == set(BRECAHAD_CLASSES)
    assert len(points["tumor"]) == 153 and len(points["mitosis"]) == 3 and len(points["non_mitosis"]) == 0
    # normalised coordinates become pixels of the 1360x1024 image
    raw = json.loads((root / "Case_1-02.json").read_text())["tumor"][0]
    assert points["tumor"][0] == pytest.approx([raw["x"] * 1360, raw["y"] * 1024])


def test_reads_the_real_sample():
    samples = load_dataset(need_shared(SAMPLE))
    assert len(samples) == 18
    assert {s.case for s in samples} == {"Case_101", "Case_102", "Case_103", "Case_105"}
    image = samples[0].read_image()
    assert image.shape == (1024, 1360, 3) and image.dtype == np.uint8
    assert all(len(s.points["tumor"]) >= 20 for s in samples)
    xy = np.concatenate([s.points["tumor"] for s in samples])
    assert xy.min() >= 0 and xy[:, 0].max() <= 1360 and xy[:, 1].max() <= 1024


def test_points_become_square_boxes_clipped_to_the_image():
    boxes = points_to_boxes(np.array([[100.0, 50.0], [5.0, 1020.0]]), 32, width=1360, height=1024)
    assert boxes.tolist() == [[84, 34, 116, 66], [0, 1004, 21, 1024]]
    assert points_to_boxes(np.zeros((0, 2)), 32, 10, 10).shape == (0, 4)


def test_patch_keeps_points_inside_and_flips_them(synth_dir):
    sample = load_dataset(synth_dir)[0]
    image = sample.read_image()
    cfg = DataConfig()
    plain = crop(sample, image, cfg, 100, 200, flip=False)
    flipped = crop(sample, image, cfg, 100, 200, flip=True)
    assert plain.image.shape == (512, 680, 3)
    assert np.array_equal(flipped.image, plain.image[:, ::-1])
    inside = sorted((x - 100, y - 200) for x, y in sample.points["tumor"] if 100 <= x < 780 and 200 <= y < 712)
    assert np.allclose(sorted(map(tuple, plain.points.tolist())), inside, atol=1e-3)
    assert np.allclose(flipped.points[:, 0], 680 - plain.points[:, 0])
    assert (plain.boxes[:, 2] - plain.boxes[:, 0]).max() == pytest.approx(32, abs=1e-3)
    assert (plain.labels == 1).all()


def test_several_classes_get_their_own_labels(synth_dir):
    sample = load_dataset(synth_dir)[0]
    patch = crop(sample, sample.read_image(), DataConfig(classes=("tumor", "non_tumor")), 0, 0, flip=False)
    assert set(patch.labels.tolist()) == {1, 2}
    assert len(patch.boxes) == len(patch.labels) == len(patch.points)


def test_validation_patches_repeat_exactly(synth_dir):
    samples = load_dataset(synth_dir)[:2]
    a, b = validation_patches(samples, DataConfig(), 0, 5), validation_patches(samples, DataConfig(), 0, 5)
    assert len(a) == 10 and [p.origin for p in a] == [p.origin for p in b]
    assert len({p.origin for p in a}) > 1


def test_synthetic_data_is_valid_and_annotated(synth_dir):
    assert check_dataset(synth_dir) == []
    samples = load_dataset(synth_dir)
    assert len(samples) == 6 and len({s.case for s in samples}) == 3
    assert all(len(s.points["tumor"]) > 30 and len(s.points["non_tumor"]) > 10 for s in samples)


# --- bad input: each problem names its file -----------------------------------------------------


def _break(root, kind):
    image, label = root / "images" / "Case_1-01.tif", root / "groundTruth" / "Case_1-01.json"
    if kind == "truncated":
        image.write_bytes(image.read_bytes()[:100_000])
        return image, "unreadable TIFF"
    if kind == "shape":
        tifffile.imwrite(image, np.zeros((512, 680, 3), np.uint8), photometric="rgb")
        return image, "shape (512, 680, 3)"
    if kind == "dtype":
        tifffile.imwrite(image, np.zeros((1024, 1360, 3), np.uint16), photometric="rgb")
        return image, "dtype uint16"
    if kind == "channels":
        tifffile.imwrite(image, np.zeros((1024, 1360), np.uint8))
        return image, "1 channel(s)"
    if kind == "json":
        label.write_text('{"tumor": [')
        return label, "not valid JSON"
    if kind == "key":
        doc = json.loads(label.read_text()) | {"tumour": []}
        label.write_text(json.dumps(doc))
        return label, "unknown key 'tumour'"
    if kind == "range":
        doc = json.loads(label.read_text())
        doc["tumor"][0]["x"] = 1.7
        label.write_text(json.dumps(doc))
        return label, "tumor[0].x = 1.7 is outside [0, 1]"
    if kind == "no-label":
        label.unlink()
        return image, "no ground truth"
    if kind == "no-image":
        image.unlink()
        return label, "no image"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "shape", "dtype", "channels", "json", "key", "range", "no-label", "no-image"]
)
def test_bad_input_is_named(kind, synth_dir, copy_of):
    root = copy_of(synth_dir)
    path, words = _break(root, kind)
    problems = check_dataset(root)
    assert len(problems) == 1 and str(path) in problems[0] and words in problems[0]
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    assert e.value.problems == problems


def test_empty_and_missing_folders(tmp_path, monkeypatch):
    assert "no such folder" in check_dataset(tmp_path / "nope")[0]
    # Issue 22: the message spoke of `mlflow run` to users who never ran it.
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    assert check_dataset("nope") == [
        f"nope: no such folder (relative paths are taken from {tmp_path}); point data_dir at a folder holding "
        "images/ and groundTruth/, best as an absolute path"
    ]
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123")
    assert "the project directory under `mlflow run`" in check_dataset("nope")[0]
    assert "missing folder" in check_dataset(tmp_path)[0]
    (tmp_path / "images").mkdir()
    (tmp_path / "groundTruth").mkdir()
    assert check_dataset(tmp_path) == [f"{tmp_path}: images/ and groundTruth/ are empty"]


@pytest.mark.subprocess
def test_validate_lists_every_problem_and_exits_nonzero(synth_dir, copy_of, tmp_path):
    root = copy_of(synth_dir)
    bad_image = root / "images" / "Case_2-01.tif"
    bad_image.write_bytes(bad_image.read_bytes()[:4096])
    bad_json = root / "groundTruth" / "Case_3-02.json"
    bad_json.write_text("{not json")
    result = run_cli("validate", str(root), cwd=tmp_path)
    assert result.returncode == 1
    assert str(bad_image) in result.stdout and str(bad_json) in result.stdout
    assert "2 problem(s)" in result.stderr
    ok = run_cli("validate", str(synth_dir), cwd=tmp_path)
    assert ok.returncode == 0 and "valid" in ok.stdout


@pytest.mark.subprocess
def test_an_implausible_number_of_points_is_refused_before_training(synth_dir, copy_of):
    data = copy_of(synth_dir)
    path = data / "groundTruth" / "Case_1-01.json"
    doc = json.loads(path.read_text())
    doc["tumor"] = [{"x": 0.5, "y": 0.5}] * 20_001
    path.write_text(json.dumps(doc))
    problems = check_dataset(data)
    assert len(problems) == 1 and "more than the 20,000" in problems[0] and "Case_1-01.json" in problems[0]
    result = run_cli("train", "--data-dir", str(data), cwd=data)
    assert result.returncode == 2 and "more than the 20,000" in result.stderr


@pytest.mark.subprocess
def test_predict_refuses_unusable_images_in_one_line(tmp_path):
    import pandas as pd

    from detection.predict import InputError, as_images

    for image, words in (
        (np.zeros((16, 16, 3), np.uint8), "smaller than one anchor"),
        (np.zeros((64, 64, 3), np.uint16), "expected RGB uint8"),
        (np.zeros((64, 64), np.uint8), "expected RGB uint8"),
    ):
        with pytest.raises(InputError, match=words):
            as_images(pd.DataFrame({"image": [image]}))
    for name, pixels in (("grey.tif", np.zeros((64, 64), np.uint8)), ("deep.tif", np.zeros((64, 64, 3), np.uint16))):
        tifffile.imwrite(tmp_path / name, pixels)
        result = run_cli(
            "predict",
            str(tmp_path / name),
            "--model",
            "models:/none@champion",
            "--out",
            str(tmp_path / "out"),
            cwd=tmp_path,
            env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
        )
        assert result.returncode == 2 and name in result.stderr and "Traceback" not in result.stderr


def test_stain_jitter_changes_colour_only_and_is_off_in_the_paper(synth_dir):
    from detection.sampling import TrainPatches, random_patch, stain_jitter

    paper, stained = (
        config.load(str(ROOT / "experiments" / "paper.yaml")),
        config.load(str(ROOT / "experiments" / "smoke-stain.yaml")),
    )
    assert paper.data.stain_jitter == 0.0 and stained.data.stain_jitter == 0.05
    samples = load_dataset(synth_dir)[:2]
    image = samples[0].read_image()
    # At zero strength the HED round trip keeps the pixels: only the random scale and shift change colour.
    assert np.abs(stain_jitter(image, 0.0, np.random.default_rng(0)).astype(int) - image).max() <= 1

    plain = TrainPatches(samples, paper.data, seed=4)[(2, 0)]
    assert np.array_equal(
        plain.image,
        random_patch(samples[0], image, paper.data, np.random.default_rng([4, 2, 0]), paper.data.hflip).image,
    )
    jittered = TrainPatches(samples, stained.data, seed=4)
    a, b = jittered[(2, 0)], jittered[(2, 0)]
    assert np.array_equal(a.image, b.image)  # drawn from (seed, epoch, image): a resumed run sees the same
    assert a.image.dtype == np.uint8 and a.image.shape == plain.image.shape
    assert np.array_equal(a.boxes, plain.boxes) and np.array_equal(a.origin, plain.origin)
    diff = np.abs(a.image.astype(int) - plain.image.astype(int))
    assert 1 < diff.mean() < 40  # a visible colour change, not noise and not a different image
    other = stain_jitter(plain.image, 0.05, np.random.default_rng(9))
    assert not np.array_equal(other, a.image)
    with pytest.raises(config.ConfigError, match="stain_jitter"):
        config.load(str(ROOT / "experiments" / "smoke.yaml"), ["data.stain_jitter=2"])
