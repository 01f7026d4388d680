import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, misc

from detection import config
from detection.config import ConfigError
from detection.model import WeightsError, build_model, parameter_count
from tests.conftest import ROOT

EXPERIMENTS = ROOT / "experiments"


def test_paper_yaml_states_every_value_of_the_paper():
    cfg = config.load(EXPERIMENTS / "paper.yaml")
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.backbone, m.weights, m.num_classes) == ("resnet50", "imagenet", 2)
    assert m.image_mean == (0.75141764, 0.6385864, 0.8118883)
    assert m.image_std == (0.00398171, 0.00440513, 0.00163838)
    assert (m.min_size, m.max_size) == (1024, 1360)
    assert (m.rpn_fg_iou_thresh, m.rpn_bg_iou_thresh, m.box_fg_iou_thresh, m.box_bg_iou_thresh) == (0.9, 0.1, 0.9, 0.1)
    assert (m.rpn_nms_thresh, m.box_nms_thresh, m.box_detections_per_img) == (0.8, 0.8, 200)
    assert (m.roi_featmap_names, m.roi_output_size, m.roi_sampling_ratio) == (("0", "1"), 21, 2)
    assert (t.epochs, t.batch_size, t.lr, t.lr_decay, t.weight_decay, t.amp) == (100, 1, 2e-5, 0.98, 5e-4, True)
    assert (d.patch_size, d.hflip, d.val_patches, d.classes) == ((512, 680), True, 5, ("tumor",))


def test_built_paper_model_matches_every_paper_value():
    # The pretrained weights cannot be downloaded here; the architecture is the same without them.
    cfg = config.load(EXPERIMENTS / "paper.yaml")
    model = build_model(cfg.model, pretrained=False)
    t, rpn, roi = model.transform, model.rpn, model.roi_heads
    assert t.image_mean == list(cfg.model.image_mean) and t.image_std == list(cfg.model.image_std)
    assert (t.min_size, t.max_size) == ((1024,), 1360)
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.9, 0.1)
    assert (roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold) == (0.9, 0.1)
    assert rpn.nms_thresh == 0.8 and roi.nms_thresh == 0.8
    assert roi.detections_per_img == 200 and roi.score_thresh == 0.05
    assert isinstance(roi.box_roi_pool, MultiScaleRoIAlign)
    assert roi.box_roi_pool.featmap_names == ["0", "1"]
    assert roi.box_roi_pool.output_size == (21, 21) and roi.box_roi_pool.sampling_ratio == 2
    assert roi.box_head.fc6.in_features == 112896
    assert roi.box_predictor.cls_score.out_features == 2
    assert isinstance(model.backbone.body.bn1, misc.FrozenBatchNorm2d)
    assert parameter_count(model) == pytest.approx(144.1e6, rel=0.01)


def test_smoke_inherits_paper_and_stays_small():
    paper, smoke = config.load(EXPERIMENTS / "paper.yaml"), config.load(EXPERIMENTS / "smoke.yaml")
    assert smoke.model.backbone == "resnet18" and smoke.model.weights == "none"
    assert smoke.data == paper.data and smoke.eval == paper.eval and smoke.tracking == paper.tracking
    model = build_model(smoke.model)
    assert parameter_count(model) < 20e6


def test_paper_norm_keeps_the_paper_but_its_statistics():
    paper, norm = config.load(EXPERIMENTS / "paper.yaml"), config.load(EXPERIMENTS / "paper-norm.yaml")
    assert norm.model.image_std[0] > 30 * paper.model.image_std[0]
    assert (
        norm.replace(
            "model.image_mean=" + str(list(paper.model.image_mean)).replace(" ", ""),
            "model.image_std=" + str(list(paper.model.image_std)).replace(" ", ""),
        ).to_dict()
        == paper.replace("name=paper-norm").to_dict()
    )


def test_overrides_are_parsed_as_yaml():
    cfg = config.load(EXPERIMENTS / "smoke.yaml", ["train.epochs=1 data.patch_size=[256,340]", "train.lr=0.001"])
    assert cfg.train.epochs == 1 and cfg.data.patch_size == (256, 340) and cfg.train.lr == 0.001
    assert cfg.flat()["data.split.mode"] == "case"


@pytest.mark.parametrize(
    "override, words",
    [
        # Issue 22: an override's typo was blamed on the config file ("experiments/smoke.yaml: unknown key").
        ("train.epoch=1", ["unknown key train.epoch in the overrides (not in ", "epochs"]),
        ("trian.epochs=1", ["unknown key trian in the overrides", "train, version"]),
        ("train.epochs=many", ["train.epochs must be int", "'many'"]),
        ("train.epochs=0", ["train.epochs=0 must be > 0"]),
        ("model.num_classes=3", ["model.num_classes=3", "len(data.classes)+1 = 2"]),
        # A class name is the dataset's to check (tests/test_import.py); [all] stands alone.
        ("data.classes=[all,tumor]", ["[all] stands alone"]),
        ("model.rpn_bg_iou_thresh=0.95", ["rpn_bg_iou_thresh=0.95 must be <= rpn_fg_iou_thresh=0.7"]),
        ("model.box_nms_thresh=1.5", ["box_nms_thresh=1.5 must be in [0, 1]"]),
        ("train.optimizer=lamb", ["train.optimizer='lamb'"]),
        ("epochs", ["not of the form section.key=value"]),
        # Issue 21: non-finite numbers and degenerate sizes passed the check.
        ("train.lr=.inf", ["train.lr must be a finite number, got inf"]),
        ("train.weight_decay=.inf", ["train.weight_decay must be a finite number"]),
        ("model.image_mean=[.nan,0,0]", ["model.image_mean must be a finite number, got nan"]),
        ("eval.match_radius_um=.inf", ["eval.match_radius_um must be a finite number"]),
        ("data.patch_size=[1,1]", ["data.patch_size=[1, 1] must be at least twice data.box_size (64 px)"]),
        ("tracking.experiment=''", ["tracking.experiment must not be empty"]),
    ],
)
def test_bad_values_are_named_with_the_fix(override, words):
    with pytest.raises(ConfigError) as e:
        config.load(EXPERIMENTS / "smoke.yaml", [override])
    for w in words:
        assert w in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        config.load(tmp_path / "loop.yaml")


def test_missing_pretrained_weights_fail_with_the_fix(tmp_path, monkeypatch):
    # No network here, and a dead proxy makes that certain elsewhere: the fetch must fail clearly.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    cfg = config.load(EXPERIMENTS / "smoke.yaml", ["model.weights=imagenet"])
    with pytest.raises(WeightsError) as e:
        build_model(cfg.model)
    assert str(tmp_path) in str(e.value) and "TORCH_HOME" in str(e.value) and "model.weights=none" in str(e.value)


def test_local_weights_file(tmp_path):
    cfg = config.load(EXPERIMENTS / "smoke.yaml")
    source = build_model(cfg.model)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_model(cfg.replace(f"model.weights={tmp_path / 'w.pt'}").model)
    assert torch.equal(loaded.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)
    with pytest.raises(WeightsError, match="no such file"):
        build_model(cfg.replace(f"model.weights={tmp_path / 'missing.pt'}").model)


@pytest.fixture
def saved_today() -> dict:
    """What train logs as config.yaml with today's code: a version-2 config."""
    import yaml

    return yaml.safe_load(config.dump(config.load(EXPERIMENTS / "smoke.yaml", ["tracking.system_metrics=false"])))


@pytest.fixture
def renamed_release(saved_today, monkeypatch):
    """A later release that renamed tracking.system_metrics to tracking.log_system_metrics: config
    version 3, with the upgrade step from version 2 after today's steps."""
    import dataclasses

    fields = [
        ("log_system_metrics" if f.name == "system_metrics" else f.name, f.type, dataclasses.field(default=f.default))
        for f in dataclasses.fields(config.TrackingConfig)
    ]
    renamed = dataclasses.make_dataclass("TrackingConfig", fields, frozen=True)
    renamed.__module__ = config.__name__  # its string annotations resolve in detection.config
    monkeypatch.setattr(config, "TrackingConfig", renamed)
    monkeypatch.setattr(config, "CONFIG_VERSION", 3)
    monkeypatch.setattr(
        config,
        "UPGRADES",
        config.UPGRADES | {2: lambda t: config.rename_key(t, "tracking.system_metrics", "tracking.log_system_metrics")},
    )


def _as_version_1(tree: dict) -> dict:
    """A config as release 1 wrote it: the match radius in pixels (16 px), no data.mpp."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    tree["eval"].pop("match_radius_um")
    tree["eval"]["match_radius"] = 16.0
    tree["data"].pop("mpp")
    return tree


@pytest.mark.parametrize("saved_as", ["version 2", "version 1", "before versions"])
def test_a_registered_config_loads_after_a_key_is_renamed(saved_as, saved_today, renamed_release):
    saved = dict(saved_today)
    assert saved.pop("version") == 2
    if saved_as == "version 2":
        saved["version"] = 2
    else:
        saved = _as_version_1(saved) | ({"version": 1} if saved_as == "version 1" else {})
    cfg = config.from_dict(saved, "run 0123 config.yaml")  # as predict.load_weights reads a registered model
    assert cfg.version == 3 and cfg.tracking.log_system_metrics is False
    assert cfg.model == config.from_dict(saved_today | {"tracking": {}}).model
    assert "system_metrics:" not in config.dump(cfg).replace("log_system_metrics:", "")


def test_a_version_1_radius_in_pixels_keeps_its_pixels(saved_today):
    """Release 1 matched within eval.match_radius px; release 2 reads micrometres (issue 20)."""
    old = config.from_dict(_as_version_1(dict(saved_today)) | {"version": 1})
    assert old.eval.match_radius_um == pytest.approx(16 * 0.514) and old.match_radius_px == pytest.approx(16.0)
    assert config.from_dict(saved_today).match_radius_px == pytest.approx(7.5 / 0.514)


def test_without_its_upgrade_step_a_renamed_key_would_not_load(saved_today, renamed_release, monkeypatch):
    monkeypatch.setattr(config, "UPGRADES", config.UPGRADES | {2: lambda t: t})
    with pytest.raises(ConfigError, match="unknown key tracking.system_metrics"):
        config.from_dict(saved_today)


def test_a_config_from_a_newer_release_is_named():
    saved = config.load(EXPERIMENTS / "smoke.yaml").to_dict() | {"version": 7}
    with pytest.raises(ConfigError, match=r"run x: version=7 .* \(1 to 2\); a newer release .* upgrade the package"):
        config.from_dict(saved, "run x")
    with pytest.raises(ConfigError, match=r"version='2' .* a config version is a whole number from 1"):
        config.from_dict(saved | {"version": "2"}, "run x")


def test_rename_key_moves_a_value_between_sections_and_leaves_the_input_alone():
    tree = {"eval": {"match_radius": 12.0, "tta_views": ["h"]}, "name": "x"}
    moved = config.rename_key(tree, "eval.match_radius", "matching.radius")
    assert moved == {"eval": {"tta_views": ["h"]}, "matching": {"radius": 12.0}, "name": "x"}
    assert tree["eval"]["match_radius"] == 12.0
    assert config.rename_key(tree, "eval.absent", "eval.other") == tree
