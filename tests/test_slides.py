"""Whole slides on real pixels: pyramidal tiled TIFFs that OpenSlide opens, built from the real
BreCaHAD fields of ../shared/data (a mosaic on a white background, resolution tags set), counted
by the tiny smoke model through the same pipeline as a whole image."""

import gzip
import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from detection import slides, tracking
from detection.data import load_dataset
from detection.slides import Job, SlideError, count, open_slide
from detection.synth import mosaic, write_slide

from .conftest import SAMPLE, need_shared, run_cli
from .faults import KILLED, run_killed_at

MPP = 0.514  # BreCaHAD's, which the smoke model records as data.mpp
MODEL = "models:/brecahad-faster-rcnn@challenger"


@pytest.fixture(scope="module")
def fields() -> list[np.ndarray]:
    """Four real fields, cropped to 480 x 640 px so a slide of them runs in seconds on 2 cores."""
    samples = load_dataset(need_shared(SAMPLE))[:4]
    return [s.read_image()[:480, :640] for s in samples]


def slide_of(path, fields, mpp=MPP, margin=96, columns=2, upsample=1):
    image, origins = mosaic(fields, columns, margin)
    if upsample > 1:
        image = image.repeat(upsample, 0).repeat(upsample, 1)
    return write_slide(path, image, mpp), image, [(x * upsample, y * upsample) for x, y in origins]


def nothing_found(pixels: np.ndarray) -> pd.DataFrame:
    return slides._empty()


@pytest.fixture
def detector(in_store):
    return tracking.load_model(tracking.resolve_model(MODEL))


def job(detector, region=4096, mpp=None) -> Job:
    return Job.of(MODEL, detector.config.data, region, mpp)


def predictor(detector):
    return lambda pixels: detector.predict(None, pd.DataFrame({"image": [pixels]}))


@pytest.mark.slow
def test_a_slide_counts_what_the_whole_image_path_finds_on_each_field_at_any_scale(detector, fields, tmp_path):
    path, image, origins = slide_of(tmp_path / "two.tiff", fields[:2])
    summary = count(open_slide(path), job(detector), predictor(detector), tmp_path / "out")
    found = pd.read_parquet(tmp_path / "out" / "two.parquet")
    assert summary["detections"] == len(found) > 0 and summary["reader"] == "openslide"
    whole = predictor(detector)(image)  # the served model's path on the same pixels, on tissue
    whole = whole[slides.tissue_mask(open_slide(path)).covers(whole.cx, whole.cy)]
    for x, y in origins:  # inside each field (the tissue mask's edge is a few px coarse)
        h, w = fields[0].shape[:2]

        def inside(t, x=x, y=y, w=w, h=h):
            return t[(t.cx > x + 8) & (t.cx < x + w - 8) & (t.cy > y + 8) & (t.cy < y + h - 8)]

        a, b = inside(found).sort_values(["cx", "cy"]), inside(whole).sort_values(["cx", "cy"])
        assert len(a) == len(b) > 0
        assert np.allclose(a[["x1", "y1", "x2", "y2"]], b[["x1", "y1", "x2", "y2"]], atol=1e-3)
        assert np.allclose(a.score, b.score, atol=1e-6)
    assert np.allclose(found.cx_um, found.cx * MPP) and np.allclose(found.cy_um, found.cy * MPP)

    # Scanned at twice the resolution: read from the level at the model's scale, the same cells.
    fine, _, _ = slide_of(tmp_path / "fine.tiff", fields[:2], mpp=MPP / 2, upsample=2)
    count(open_slide(fine), job(detector), predictor(detector), tmp_path / "out")
    twice = pd.read_parquet(tmp_path / "out" / "fine.parquet")
    assert len(twice) == len(found)
    assert np.allclose(twice[["cx", "cy"]].to_numpy() / 2, found[["cx", "cy"]].to_numpy(), atol=1e-2)
    assert np.allclose(twice.cx_um, found.cx_um, atol=1e-2) and np.allclose(twice.score, found.score, atol=1e-6)


@pytest.mark.slow
def test_cuts_between_regions_report_each_cell_once(detector, fields, tmp_path):
    path, _, _ = slide_of(tmp_path / "two.tiff", fields[:2])
    whole = count(open_slide(path), job(detector, region=4096), predictor(detector), tmp_path / "one")
    cut = count(open_slide(path), job(detector, region=512), predictor(detector), tmp_path / "cut")
    assert whole["tissue_regions"] == 1 and cut["tissue_regions"] >= 4
    a, b = pd.read_parquet(tmp_path / "one" / "two.parquet"), pd.read_parquet(tmp_path / "cut" / "two.parquet")
    # The same cells, each once: regions differ only in the context of cells near a cut.
    assert abs(len(a) - len(b)) <= 0.1 * len(a)
    from scipy.spatial import cKDTree

    close = cKDTree(b[["cx", "cy"]]).query_pairs(1.0)  # two detections of one cell, one per region
    assert len(close) <= len(cKDTree(a[["cx", "cy"]]).query_pairs(1.0))


def test_background_is_skipped_and_the_tissue_area_is_right(fields, tmp_path):
    small = [f[:240, :320] for f in fields]  # a quarter of each field: no model runs here
    path, _, _ = slide_of(tmp_path / "sparse.tiff", small, margin=400, columns=2)
    read = []

    def run(pixels):
        read.append(pixels.shape)
        return nothing_found(pixels)

    summary = count(open_slide(path), Job("m", MPP, 256, 30, None), run, tmp_path / "out")
    assert summary["background_regions"] > 0 and len(read) == summary["tissue_regions"]
    assert summary["regions"] == summary["tissue_regions"] + summary["background_regions"]
    truth = 4 * 240 * 320 * (MPP / 1000) ** 2
    assert abs(summary["tissue_mm2"] - truth) <= 0.05 * truth, (summary["tissue_mm2"], truth)
    assert summary["detections"] == 0 and not (tmp_path / "out" / "sparse.partial").exists()


def test_memory_stays_flat_for_a_slide_four_times_larger(fields, tmp_path, monkeypatch):
    # The mask's and the thumbnail's levels are sized by these, not by the slide: scaled down with
    # the slides, so that both slides have a level that small.
    monkeypatch.setattr(slides, "MASK_SIDE", 256)
    monkeypatch.setattr(slides, "THUMB_SIDE", 256)

    def peak(path):
        tracemalloc.start()
        count(open_slide(path), Job("m", MPP, 256, 30, None), nothing_found, tmp_path / path.stem)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    small, image, _ = slide_of(tmp_path / "small.tiff", [f[:240, :320] for f in fields])
    large = write_slide(tmp_path / "large.tiff", np.tile(image, (2, 2, 1)), MPP)
    a, b = peak(small), peak(large)
    print(f"peak traced memory: {a / 1e6:.1f} MB for {image.shape[1]}x{image.shape[0]}, {b / 1e6:.1f} MB for 4x")
    assert b < 1.2 * a


@pytest.mark.slow
def test_outputs_read_back_with_geojson_and_parquet(detector, fields, tmp_path):
    import geojson

    path, _, _ = slide_of(tmp_path / "one.tiff", fields[:1])
    count(open_slide(path), job(detector), predictor(detector), tmp_path)
    table = pd.read_parquet(tmp_path / "one.parquet")
    doc = geojson.loads(gzip.decompress((tmp_path / "one.geojson.gz").read_bytes()).decode())
    assert doc.is_valid and len(doc["features"]) == len(table) > 0
    points = np.array([f["geometry"]["coordinates"] for f in doc["features"]])
    assert np.allclose(points, table[["cx", "cy"]].to_numpy(), atol=1e-3)
    assert {f["properties"]["objectType"] for f in doc["features"]} == {"detection"}
    summary = json.loads((tmp_path / "one.done.json").read_text())
    assert summary["counts"] == table["class"].value_counts().to_dict()
    assert (tmp_path / "one.thumbnail.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_slides_are_refused_in_one_line_and_write_nothing(fields, tmp_path):
    with pytest.raises(SlideError, match="no such slide"):
        open_slide(tmp_path / "absent.svs")
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(SlideError, match="neither OpenSlide nor tiffslide reads it"):
        open_slide(tmp_path / "notes.svs")
    bare = write_slide(tmp_path / "bare.tiff", fields[0], mpp=None)
    with pytest.raises(SlideError, match="records no resolution.*--mpp"):
        open_slide(bare)
    assert open_slide(bare, mpp=0.25).mpp == 0.25
    good, _, _ = slide_of(tmp_path / "cut.tiff", fields[:1])
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(SlideError, match="truncated.tiff"):
        count(open_slide(truncated), Job("m", MPP, 512, 60, None), nothing_found, tmp_path / "out")
    assert not list((tmp_path / "out").glob("truncated.*[!l]"))  # no output, at most the partial state
    # A slide with no tissue: said, and zero counted.
    blank = write_slide(tmp_path / "blank.tiff", np.full((600, 800, 3), 250, np.uint8), MPP)
    summary = count(open_slide(blank), Job("m", MPP, 512, 60, None), nothing_found, tmp_path / "out")
    assert summary["empty_tissue"] and summary["tissue_mm2"] == 0 and summary["detections"] == 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_job_killed_mid_slide_resumes_to_the_same_outputs(detector, in_store, fields, tmp_path):
    path, _, _ = slide_of(tmp_path / "two.tiff", fields[:2])
    args = ["slides", str(path), "--model", MODEL, "--region", "512", "--ray-address", "off"]
    count(open_slide(path), job(detector, region=512), predictor(detector), tmp_path / "straight")
    # atomic_write's calls: the job's stamp, then one region file each. Killed after the second region.
    killed = run_killed_at(
        "detection.slides.atomic_write", [*args, "--out", str(tmp_path / "k")], in_store["workdir"], nth=3
    )
    assert killed.returncode == KILLED
    partial = tmp_path / "k" / "two.partial"
    assert len(list(partial.glob("region-*.parquet"))) == 2 and not (tmp_path / "k" / "two.done.json").exists()
    resumed = run_cli(*args, "--out", str(tmp_path / "k"), cwd=in_store["workdir"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 done before" in resumed.stderr
    a, b = pd.read_parquet(tmp_path / "straight" / "two.parquet"), pd.read_parquet(tmp_path / "k" / "two.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not partial.exists()
    from mlflow.tracking import MlflowClient

    run_id = resumed.stdout.split("run ")[-1].split(":")[0]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["detections"] == len(a)


@pytest.mark.slow
@pytest.mark.subprocess
def test_three_slides_on_embedded_ray_match_one_by_one(detector, in_store, fields, tmp_path):
    paths = [slide_of(tmp_path / f"s{k}.tiff", fields[k : k + 1], margin=32)[0] for k in range(3)]
    for path in paths:
        count(open_slide(path), job(detector, region=1024), predictor(detector), tmp_path / "alone")
    ray = run_cli(
        "slides",
        *map(str, paths),
        "--model",
        MODEL,
        "--region",
        "1024",
        "--out",
        str(tmp_path / "ray"),
        cwd=in_store["workdir"],
        fresh=True,
    )  # fmt: skip  (Ray's embedded cluster ends with its process)
    assert ray.returncode == 0, ray.stderr[-3000:]
    for k in range(3):
        a = pd.read_parquet(tmp_path / "alone" / f"s{k}.parquet")
        b = pd.read_parquet(tmp_path / "ray" / f"s{k}.parquet")
        # Ray's workers run torch on one thread each: sums in another order, the last float bits differ.
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=1e-3)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    job_id = ray.stdout.split("run ")[-1].split(":")[0]
    children = client.search_runs([client.get_run(job_id).info.experiment_id], f"tags.mlflow.parentRunId = '{job_id}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == ["s0.tiff", "s1.tiff", "s2.tiff"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert client.get_run(job_id).data.params["ray"] == "auto"
