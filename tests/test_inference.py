"""Inference runtimes: batched and threaded tiles give the one-by-one detections; the device and
precision options are honoured; the training loader draws the same patches with any worker count.
A randomly initialised smoke model on a real image: raw outputs hold ~1000 boxes per tile."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from detection import config
from detection.data import load_dataset
from detection.inference import Runtime, detect_tiles
from detection.model import build_model
from detection.postprocess import PostProcess, keep, raw_outputs
from detection.sampling import EpochOrder, TrainPatches, collate
from tests.conftest import ROOT

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke():
    cfg = config.load(str(ROOT / "experiments" / "smoke.yaml"))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, pretrained=False).eval()


@pytest.fixture(scope="module")
def image(synth_dir):
    return load_dataset(synth_dir)[0].read_image()[:700, :1000]  # 2x2 tiles of 512x680


def _tiles(model, image, cfg, rt):
    with raw_outputs(model):
        return detect_tiles(rt.place(model), image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)


def _same(a, b, atol=1e-4):
    assert np.array_equal(a.origin, b.origin) and np.array_equal(a.tile, b.tile)
    assert np.allclose(a.boxes, b.boxes, atol=atol) and np.allclose(a.scores, b.scores, atol=atol)
    assert np.array_equal(a.labels, b.labels)


def test_batched_and_threaded_tiles_equal_one_by_one(smoke, image):
    cfg, model = smoke
    one = _tiles(model, image, cfg, Runtime(CPU, None, batch=1, workers=1))
    assert len(one.origin) == 4 and len(one.scores) > 1000
    _same(one, _tiles(model, image, cfg, Runtime(CPU, None, batch=4, workers=1)))
    _same(one, _tiles(model, image, cfg, Runtime(CPU, None, batch=1, workers=2)))
    pp = PostProcess.of_config(cfg.model)
    kept = keep(one, pp, cfg.match_radius_px)
    assert np.array_equal(kept, keep(_tiles(model, image, cfg, Runtime(CPU, None, 2, 2)), pp, cfg.match_radius_px))


@pytest.mark.slow
def test_cpu_bf16_finds_about_as_many_cells(in_store, synth_dir):
    """bf16 is an option on a CPU, not the default: it moves every feature a little. This tiny model
    keeps ~800 near-tied boxes per image, so which of two near-duplicates NMS keeps, and so which
    cell greedy matching gives to whom, churns (a third of the kept boxes move, with torchvision's
    heads as with ours); what the option promises is as many detections and about as many cells."""
    import mlflow

    from detection.data import targets
    from detection.matching import box_centres, greedy_match
    from detection.pipeline import detect

    detector = mlflow.pyfunc.load_model(in_store["model"]).unwrap_python_model()
    cfg, model = detector.config, detector.model
    found, kept = {"fp32": 0, "bf16": 0}, {"fp32": 0, "bf16": 0}
    for sample in load_dataset(synth_dir)[:3]:
        cells, _ = targets(sample, cfg.data.classes)
        for precision in found:
            table = detect(model, [sample.read_image()], cfg, Runtime.choose("cpu", precision))
            boxes = table[["x1", "y1", "x2", "y2"]].to_numpy()
            hit = greedy_match(box_centres(boxes), table["score"].to_numpy(), cells, cfg.match_radius_px)
            found[precision] += int((hit >= 0).sum())
            kept[precision] += len(table)
    print(f"cells matched: {found}; kept: {kept}")
    assert abs(kept["bf16"] - kept["fp32"]) <= 0.02 * kept["fp32"]
    assert abs(found["bf16"] - found["fp32"]) <= max(3, 0.1 * found["fp32"])
    assert Runtime.choose("cpu").dtype is None  # fp32 stays the CPU default


def test_the_device_and_precision_options_are_honoured(monkeypatch):
    monkeypatch.setenv("BRECAHAD_DEVICE", "cpu")
    monkeypatch.setenv("BRECAHAD_PRECISION", "bf16")
    rt = Runtime.choose()
    assert rt.describe() == {"device": "cpu", "precision": "bf16", "tile_batch": 1, "tile_workers": rt.workers}
    assert Runtime.choose("cpu", "fp32").dtype is None  # arguments win over the environment
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        Runtime.choose("cpu", "fp16")
    with pytest.raises(ValueError, match="not one of"):
        Runtime.choose("cpu", "int8")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA, which is not available"):
            Runtime.choose("cuda")


def test_the_loader_draws_the_same_patches_with_any_worker_count(synth_dir):
    cfg = config.load(str(ROOT / "experiments" / "smoke.yaml"))
    samples = load_dataset(synth_dir)
    data = TrainPatches(samples, cfg.data, seed=3)

    def epoch(workers, e):
        order = EpochOrder(len(data), seed=3)
        order.set_epoch(e)
        loader = torch.utils.data.DataLoader(
            data, batch_size=2, sampler=order, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0
        )
        return [
            (img.sum().item(), t["boxes"].sum().item()) for images, targets in loader for img, t in zip(images, targets)
        ]

    assert epoch(0, 1) == epoch(2, 1) != epoch(0, 2)
    drawn = [data[(1, i)] for i in range(len(data))]  # epoch 1's patch of each image
    expected = [(img.sum().item(), t["boxes"].sum().item()) for img, t in (p.uint8_tensors() for p in drawn)]
    assert sorted(epoch(0, 1)) == sorted(expected)  # every image once per epoch, in the sampler's order


@pytest.mark.subprocess
def test_device_script_says_no_cuda_and_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: bench/device.sh would run the full GPU benchmark")
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "device.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHON=sys.executable),  # the tests' own python, not whatever python3 is on PATH
    )
    assert result.returncode == 0 and "no CUDA device" in result.stdout
