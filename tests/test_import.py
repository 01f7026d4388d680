"""Issue 25: a lab's own annotations (QuPath GeoJSON, COCO, CSV) become a dataset folder that
validate, train and evaluate read unchanged; every refusal writes nothing."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from detection.annotations import AnnotationError, ImportRequest, build, run_import
from detection.config import ConfigError, load
from detection.data import check_dataset, configured_for, layout_of, load_dataset
from detection.export import table, to_geojson
from tests.conftest import SAMPLE, SMOKE, need_shared, run_cli, train_tiny

MPP = 0.514


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three real BreCaHAD fields: two TIFFs as distributed and one re-saved as PNG (read only)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("scans")
    names = sorted(p.name for p in (need_shared(SAMPLE) / "images").glob("*.tif"))[:3]
    for name in names[:2]:
        (folder / name).symlink_to(SAMPLE / "images" / name)
    Image.fromarray(tifffile.imread(SAMPLE / "images" / names[2])).save(folder / f"{Path(names[2]).stem}.png")
    return folder


def feature(geometry: dict, name: str | None, kind: str = "annotation") -> dict:
    """A feature as QuPath 0.5/0.6 writes it (File > Export objects as GeoJSON): an id, the geometry,
    and properties with objectType and classification {name, color}."""
    props = {"objectType": kind} | ({"classification": {"name": name, "color": [200, 0, 0]}} if name else {})
    return {"type": "Feature", "id": "d9a0c3a4-1b1e-4c36-9f51-6ad2d1a8b1c2", "geometry": geometry, "properties": props}


def point(x, y):
    return {"type": "Point", "coordinates": [x, y]}


def square(x0, y0, side):
    ring = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def imported(tmp_path, src, fmt, images, out="dataset", **options):
    req = ImportRequest(src, fmt, images, tmp_path / out, **({"mpp": MPP} | options))
    return req, build(req)


def test_qupath_geojson_as_qupath_writes_it_imports_with_its_classes(tmp_path, images, store):
    first, second, third = sorted(p.stem for p in images.iterdir())
    exports = tmp_path / "exports"
    exports.mkdir()
    collection = [
        feature(point(100.5, 200.25), "Tumor"),
        feature(square(300, 400, 20), "Stroma", "detection"),  # a polygon: its centroid (310, 410)
        feature({"type": "MultiPoint", "coordinates": [[10, 20], [30, 40]]}, "Tumor"),
        feature(square(0, 0, 1000), None),  # the region drawn around the cells: unclassified, left out
        feature({"type": "MultiPolygon", "coordinates": [square(600, 600, 10)["coordinates"]]}, "Tumor", "cell"),
    ]
    (exports / f"{first}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": collection}))
    # One feature per line, as QuPath's newline-delimited export writes it.
    (exports / f"{second}.geojson").write_text(
        "\n".join(json.dumps(f) for f in (feature(point(5, 6), "Stroma"), feature(point(7, 8), "Tumor")))
    )
    req, ds = imported(tmp_path, exports, "qupath", images)
    assert ds.classes == ("Stroma", "Tumor") and ds.counts() == {"Stroma": 2, "Tumor": 5}
    assert ds.unannotated == [third] and ds.skipped == 1
    run_id, _ = run_import(req)
    out = req.out
    assert check_dataset(out) == []
    layout = layout_of(out)
    assert layout.classes == ("Stroma", "Tumor") and layout.mpp == MPP
    samples = {s.name: s for s in load_dataset(out)}
    tumour = [[100.5, 200.25], [10, 20], [30, 40], [605, 605]]
    assert np.abs(samples[first].points["Tumor"] - tumour).max() < 1e-9
    assert np.abs(samples[first].points["Stroma"] - [[310, 410]]).max() < 1e-9
    assert samples[third].points["Tumor"].shape == (0, 2)  # kept, with no cell
    assert samples[third].mpp() == pytest.approx(MPP)  # the resolution is in the written TIFF
    assert np.array_equal(samples[third].read_image(), tifffile.imread(SAMPLE / "images" / f"{third}.tif"))
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["counts"] == {"Stroma": 2, "Tumor": 5} and len(summary["sources"]) == 2

    import mlflow

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["cells/Tumor"] == 5
    assert run.data.params["import.classes"] == "Stroma,Tumor"


def test_the_projects_own_geojson_round_trips_its_coordinates(tmp_path, images, store):
    """predict's GeoJSON (export.to_geojson) of the real annotations imports back to the same points."""
    truth = {s.name: s for s in load_dataset(SAMPLE)}
    exports = tmp_path / "exports"
    exports.mkdir()
    written = {}
    for path in images.iterdir():
        pts = truth[path.stem].points["tumor"]
        found = table(
            np.concatenate([pts - 16, pts + 16], 1), np.full(len(pts), 0.9), np.ones(len(pts), int), ["tumor"]
        )
        doc = to_geojson(found, "models:/brecahad-faster-rcnn/1")
        (exports / f"{path.stem}.geojson").write_text(json.dumps(doc))
        written[path.stem] = np.array([f["geometry"]["coordinates"] for f in doc["features"]])
    req, _ = imported(tmp_path, exports, "qupath", images)
    run_import(req)
    for s in load_dataset(req.out):
        assert np.abs(s.points["tumor"] - written[s.name]).max() < 1e-9  # px
        assert np.abs(s.points["tumor"] * MPP - written[s.name] * MPP).max() < 1e-9  # um


def test_coco_keypoints_and_boxes_and_csv_points_import(tmp_path, images):
    from pycocotools.coco import COCO

    names = sorted(p for p in images.iterdir())
    coco = {
        "images": [{"id": k, "file_name": p.name, "width": 1360, "height": 1024} for k, p in enumerate(names)],
        "categories": [{"id": 1, "name": "tumor", "keypoints": ["centre"]}, {"id": 2, "name": "lymphocyte"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "keypoints": [50, 60, 2], "num_keypoints": 1},
            {"id": 2, "image_id": 0, "category_id": 2, "bbox": [100, 100, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "keypoints": [0, 0, 0], "bbox": [10, 10, 4, 4]},
        ],
    }
    path = tmp_path / "cells.json"
    path.write_text(json.dumps(coco))
    assert len(COCO(str(path)).getAnnIds()) == 3  # pycocotools reads the fixture
    _, ds = imported(tmp_path, path, "coco", images)
    first, second = names[0].stem, names[1].stem
    assert ds.points[first] == {"tumor": [(50.0, 60.0)], "lymphocyte": [(115.0, 110.0)]}
    assert ds.points[second] == {"tumor": [(12.0, 12.0)]}  # keypoint not visible: the box's centre

    rows = tmp_path / "cells.csv"
    rows.write_text(f"image,x,y,class\n{names[0].name},1.5,2.5,tumor\n{first},3,4,mitosis\n")
    _, ds = imported(tmp_path, rows, "csv", images, classes=("tumor", "mitosis"))
    assert ds.classes == ("tumor", "mitosis") and ds.points[first] == {"tumor": [(1.5, 2.5)], "mitosis": [(3.0, 4.0)]}


@pytest.mark.parametrize(
    ("content", "options", "says"),
    [
        ('{"type": "FeatureCollection", "features": [', {}, "not valid JSON"),
        ('{"type": "Topology"}', {}, "not GeoJSON"),
        ([feature(point(1400, 10), "tumor")], {}, "lies outside"),
        (
            [feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}, "tumor")],
            {},
            "Self-intersection",
        ),
        ([feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "tumor")], {}, "is not a cell"),
        ([feature(point(5, 5), "Stroma")], {"classes": ("tumor",)}, "outside the class map"),
        ([feature(point(5 + k, 5 + k), "tumor") for k in range(20)], {}, "--units um"),
        ([feature(point(5, 5), "tumor")], {"mpp": None}, "records no resolution; give --mpp"),
    ],
)
def test_bad_annotations_get_one_line_and_write_nothing(tmp_path, images, content, options, says):
    exports = tmp_path / "exports"
    exports.mkdir()
    first = sorted(p.stem for p in images.iterdir())[0]
    text = content if isinstance(content, str) else json.dumps({"type": "FeatureCollection", "features": content})
    (exports / f"{first}.geojson").write_text(text)
    with pytest.raises(AnnotationError, match=says) as refused:
        imported(tmp_path, exports, "qupath", images, **options)
    assert len(refused.value.problems) == 1 and "\n" not in str(refused.value)
    assert not (tmp_path / "dataset").exists()


def test_an_image_that_is_not_there_sizes_that_disagree_and_a_used_folder_are_refused(tmp_path, images):
    rows = tmp_path / "cells.csv"
    rows.write_text("image,x,y,class\nCase_999-01.tif,1,2,tumor\n")
    with pytest.raises(AnnotationError, match="'Case_999-01' is not in"):
        imported(tmp_path, rows, "csv", images)
    first = sorted(images.iterdir())[0]
    coco = {
        "images": [{"id": 0, "file_name": first.name, "width": 680, "height": 512}],
        "categories": [{"id": 1, "name": "tumor"}],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 4, 4]}],
    }
    (tmp_path / "cells.json").write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match="declared 680x512 px but"):
        imported(tmp_path, tmp_path / "cells.json", "coco", images)
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "keep.txt").write_text("mine")
    rows.write_text(f"image,x,y,class\n{first.name},1,2,tumor\n")
    with pytest.raises(AnnotationError, match="not empty"):
        imported(tmp_path, rows, "csv", images)
    assert (tmp_path / "dataset" / "keep.txt").read_text() == "mine"


def test_data_classes_all_takes_the_datasets_classes_and_a_missing_one_is_refused(tmp_path, images, store):
    rows = tmp_path / "cells.csv"
    first = sorted(images.iterdir())[0].name
    rows.write_text(f"image,x,y,class\n{first},100,100,Tumor\n{first},200,200,Stroma\n")
    req, _ = imported(tmp_path, rows, "csv", images, mpp=0.25)
    run_import(req)
    cfg = load(SMOKE, ["data.classes=[all]"])
    fitted = configured_for(cfg, req.out)
    assert fitted.data.classes == ("Stroma", "Tumor") and fitted.model.num_classes == 3 and fitted.data.mpp == 0.25
    with pytest.raises(ConfigError, match="'tumor' is not a class of .* \\(it has Stroma, Tumor\\)"):
        configured_for(load(SMOKE), req.out)
    with pytest.raises(ConfigError, match="'tumour' is not a class of .*; name some of those"):
        configured_for(load(SMOKE, ["data.classes=[tumour]"]), SAMPLE)  # a typo, named against BreCaHAD's
    # BreCaHAD itself: every one of its seven classes at once.
    assert configured_for(cfg, SAMPLE).data.classes == (
        "mitosis", "non_mitosis", "apoptosis", "tumor", "non_tumor", "lumen", "non_lumen"
    )  # fmt: skip


@pytest.mark.slow
def test_qupath_round_trip_fine_tunes_a_registered_version_that_records_its_parent(
    trained, trained_copy, synth_dir, tmp_path
):
    """predict --format geojson -> the user's corrections -> import -> fine-tune -> evaluate. In a
    copy of the trained store: the versions it registers must not move the shared store's challenger."""
    import mlflow
    from mlflow.tracking import MlflowClient

    env = {"MLFLOW_TRACKING_URI": trained_copy}
    work = tmp_path / "work"
    work.mkdir()
    scans = sorted((synth_dir / "images").glob("*.tif"))
    predicted = run_cli(
        "predict", *map(str, scans), "--model", trained["model"], "--out", str(tmp_path / "pred"),
        "--format", "geojson", cwd=work, env=env,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    # The corrections: keep the truth's tumour cells where the model missed them, reclassify some
    # detections as non_tumor, and drop every detection far from any annotated cell.
    truth = {s.name: s for s in load_dataset(synth_dir)}
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    edited = {}
    for scan in scans:
        doc = json.loads((tmp_path / "pred" / f"{scan.stem}.geojson").read_text())
        cells = truth[scan.stem].points
        kept = [f for f in doc["features"] if _near(f["geometry"]["coordinates"], cells["tumor"], 15)]
        kept += [feature(point(*map(float, xy)), "tumor") for xy in cells["tumor"][:5]]
        kept += [feature(point(*map(float, xy)), "non_tumor") for xy in cells["non_tumor"]]
        for f in kept[::4]:
            f["properties"]["classification"]["name"] = "non_tumor"
        (corrected / f"{scan.stem}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": kept}))
        edited[scan.stem] = {
            c: np.array([f["geometry"]["coordinates"] for f in kept if f["properties"]["classification"]["name"] == c])
            for c in ("non_tumor", "tumor")
        }
    out = tmp_path / "lab"
    imported_ = run_cli(
        "import", str(corrected), "--format", "qupath", "--images", str(synth_dir / "images"),
        "--out", str(out), "--mpp", str(MPP), cwd=work, env=env,
    )  # fmt: skip
    assert imported_.returncode == 0, imported_.stderr[-3000:]
    for s in load_dataset(out):
        for c, pts in edited[s.name].items():
            assert np.abs(s.points[c].reshape(-1, 2) - pts.reshape(-1, 2)).max(initial=0) < 1e-9

    parent = "models:/brecahad-faster-rcnn/1"
    tuned = train_tiny(out, f"train.epochs=1 data.classes=[all] model.weights={parent}", cwd=work, env=env)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    client = MlflowClient()  # trained_copy aimed this process at the copy
    child = max(client.search_model_versions("name='brecahad-faster-rcnn'"), key=lambda v: int(v.version))
    assert child.tags["parent_version"] == parent and f"Fine-tuned from {parent}." in child.description
    assert mlflow.get_run(child.run_id).data.tags["detection.parent_version"] == parent
    assert child.tags["classes"] == "non_tumor,tumor"

    judged = run_cli(
        "evaluate", "--model", f"models:/brecahad-faster-rcnn/{child.version}", "--data-dir", str(out),
        cwd=work, env=env,
    )  # fmt: skip
    assert judged.returncode == 0, judged.stderr[-3000:]
    run = client.search_runs(
        [mlflow.get_run(child.run_id).info.experiment_id], "tags.mlflow.runName LIKE 'evaluate%'", max_results=1
    )[0]
    for c in ("tumor", "non_tumor", "any_class"):
        assert np.isfinite(run.data.metrics[f"test/{c}/detection_rate"])

    # A postprocess study of the two-class version searches a threshold per class, and the version
    # it registers carries them.
    studied = run_cli(
        "tune", "--model", f"models:/brecahad-faster-rcnn/{child.version}", "--data-dir", str(out),
        "--study", "per-class", "--n-trials", "6", cwd=work, env=env,
    )  # fmt: skip
    assert studied.returncode == 0, studied.stderr[-3000:]
    tuned_version = client.get_model_version_by_alias("brecahad-faster-rcnn", "challenger")
    assert int(tuned_version.version) > int(child.version)
    carried = mlflow.pyfunc.load_model(f"models:/brecahad-faster-rcnn/{tuned_version.version}")
    thresholds = carried.unwrap_python_model().config.model.class_score_thresh
    assert len(thresholds) == 2 and all(0 <= t <= 1 for t in thresholds)


def _near(xy, cells: np.ndarray, radius: float) -> bool:
    return bool(len(cells)) and float(np.min(np.hypot(*(cells - np.asarray(xy)).T))) <= radius


def test_a_version_of_another_architecture_is_refused_as_a_start(tmp_path):
    import torch

    from detection.model import WeightsError, build_model

    cfg = load(SMOKE, ["model.weights=models:/brecahad-faster-rcnn@champion"])
    other = build_model(load(SMOKE, ["model.representation_size=128"]).model, pretrained=False)
    with pytest.raises(WeightsError, match="tensors differ from that version's"):
        build_model(cfg.model, start=other.state_dict())
    parent = build_model(load(SMOKE).model, pretrained=False)
    three = load(SMOKE, ["model.weights=models:/x/1", "data.classes=[a,b]", "model.num_classes=3"]).model
    child = build_model(three, start=parent.state_dict())  # a fresh predictor for three classes
    assert torch.equal(child.backbone.body.conv1.weight, parent.backbone.body.conv1.weight)
    assert child.roi_heads.box_predictor.cls_score.out_features == 3


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A pyramidal TIFF slide of two real fields on white, at 0.25 um/px, and the fields' origins."""
    pytest.importorskip("tiffslide", reason="the slides extra: pip install -e '.[slides]'")
    from detection.synth import mosaic, write_slide

    names = sorted(p.name for p in (need_shared(SAMPLE) / "images").glob("*.tif"))[:2]
    fields = [tifffile.imread(SAMPLE / "images" / n) for n in names]
    canvas, origins = mosaic(fields, 2, 200)
    folder = tmp_path_factory.mktemp("slides")
    return write_slide(folder / "scan.tiff", canvas, 0.25), fields, origins


def test_regions_of_a_whole_slide_import_as_images_with_their_cells(tmp_path, slide, store):
    path, fields, origins = slide
    (x1, y1), (x2, y2) = origins
    exports = tmp_path / "exports"
    exports.mkdir()
    features = [
        feature(square(x1, y1, 1000), None),  # the regions QuPath's user drew around the cells
        feature(square(x2, y2, 1000), None),
        feature(point(x1 + 100.5, y1 + 200.25), "tumor"),
        feature(point(x2 + 10, y2 + 20), "tumor"),
        feature(point(x2 + 30, y2 + 40), "lymphocyte"),
    ]
    (exports / "scan.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    req, ds = imported(tmp_path, exports, "qupath", path.parent, mpp=None)
    assert sorted(ds.images) == ["scan-r1", "scan-r2"] and ds.mpp == pytest.approx(0.25) and ds.skipped == 0
    run_import(req)
    samples = {s.name: s for s in load_dataset(req.out)}
    assert np.array_equal(samples["scan-r1"].read_image(), fields[0][:1000, :1000])
    assert np.abs(samples["scan-r1"].points["tumor"] - [[100.5, 200.25]]).max() < 1e-9
    assert np.abs(samples["scan-r2"].points["lymphocyte"] - [[30, 40]]).max() < 1e-9
    assert samples["scan-r2"].mpp() == pytest.approx(0.25)
    regions = json.loads((req.out / "dataset.json").read_text())["regions"]
    assert regions["scan-r2"]["box_xywh"] == [x2, y2, 1000, 1000]

    # Without a drawn region, the box around the slide's cells (64 px margin) is the one region.
    rows = tmp_path / "cells.csv"
    rows.write_text(f"image,x,y,class\nscan.tiff,{x1 + 100},{y1 + 100},tumor\nscan.tiff,{x1 + 300},{y1 + 200},tumor\n")
    _, ds = imported(tmp_path, rows, "csv", path.parent, "from-csv", mpp=None)
    assert ds.images["scan-r1"].box == (x1 + 36, y1 + 36, 328, 228)
    assert ds.points["scan-r1"] == {"tumor": [(64.0, 64.0), (264.0, 164.0)]}

    features.append(feature(point(50, 50), "tumor"))  # in the white margin, outside both regions
    (exports / "scan.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.raises(AnnotationError, match="lies outside every region of"):
        imported(tmp_path, exports, "qupath", path.parent, "refused", mpp=None)
    assert not (tmp_path / "refused").exists()
