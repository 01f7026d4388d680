"""CUDA paths: skipped without a GPU, run by bench/device.sh where one is lent (with pytest, or as
`python tests/test_gpu.py` where pytest is missing). Random-weight models: no download."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detection import config  # noqa: E402
from detection.engine import autocast_dtype, train_one_epoch  # noqa: E402
from detection.inference import Runtime, detect_tiles  # noqa: E402
from detection.model import build_model  # noqa: E402
from detection.postprocess import PostProcess, keep, raw_outputs  # noqa: E402
from detection.sampling import Patch, collate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import pytest

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
except ImportError:  # the device image may lack pytest
    pytest = None


def _smoke():
    cfg = config.load(str(ROOT / "experiments" / "smoke.yaml"))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, pretrained=False)


def _image():
    return np.random.default_rng(0).integers(90, 250, (1024, 1360, 3), dtype=np.uint8)


def test_auto_runs_on_cuda_with_autocast_and_batched_tiles():
    rt = Runtime.choose()
    assert rt.device.type == "cuda" and rt.batch == 9 and rt.workers == 1
    assert rt.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def test_batched_cuda_tiles_keep_what_one_by_one_keeps():
    cfg, model = _smoke()
    image = _image()
    pp = PostProcess.of_config(cfg.model)
    kept = []
    for batch in (1, 9):
        rt = Runtime.choose("cuda", "fp32", batch)
        with raw_outputs(model):
            tiles = detect_tiles(rt.place(model), image, cfg.data.patch_size, 2 * cfg.data.box_size, rt)
        kept.append(tiles.boxes[keep(tiles, pp, cfg.match_radius_px)])
    a, b = kept
    assert abs(len(a) - len(b)) <= max(2, 0.02 * len(a))
    centres = lambda x: (x[:, :2] + x[:, 2:]) / 2  # noqa: E731
    near = np.linalg.norm(centres(a)[:, None] - centres(b)[None], axis=2).min(1) <= 1.0
    assert near.mean() >= 0.98


def test_cuda_matches_cpu_in_fp32():
    cfg, model = _smoke()
    image = _image()[:512, :680]
    out = []
    for rt in (Runtime.choose("cpu", "fp32"), Runtime.choose("cuda", "fp32", 1)):
        with raw_outputs(model):
            out.append(detect_tiles(rt.place(model), image, cfg.data.patch_size, 64, rt))
    assert abs(len(out[0].scores) - len(out[1].scores)) <= 0.01 * len(out[0].scores)
    assert np.allclose(np.sort(out[0].scores)[-50:], np.sort(out[1].scores)[-50:], atol=1e-3)


def test_the_model_under_cuda_autocast_keeps_what_the_cpu_replay_keeps():
    """Issue 20: under bf16 the replay of torchvision's heads kept other boxes; the model's own heads
    decide in float32 with NMS on the CPU, so a CUDA cache replays exactly, box for box."""
    from detection.inference import _run_tiles
    from detection.postprocess import apply, replay_tile

    cfg, model = _smoke()
    image = _image()[:512, :680]
    wrong = []
    for precision in ("bf16", "fp16"):
        rt = Runtime.choose("cuda", precision, 1)
        with raw_outputs(model):
            raw = detect_tiles(rt.place(model), image, cfg.data.patch_size, 64, rt)
        for pp in (PostProcess(t, u, k) for t in (0.0, 0.05, 0.3) for u in (0.3, 0.5, 0.8) for k in (50, 200)):
            apply(model, pp)
            _, nms_boxes, scores, labels = _run_tiles(model, [image], rt)[0]
            kept = replay_tile(raw.nms_boxes, raw.scores, raw.labels, pp)
            same = (
                np.array_equal(raw.nms_boxes[kept], nms_boxes)
                and np.array_equal(raw.scores[kept], scores)
                and np.array_equal(raw.labels[kept], labels)
            )
            if not same:
                wrong.append((precision, pp))
    assert wrong == []


def test_the_training_fast_path_steps_in_bf16_without_a_scaler():
    cfg, model = _smoke()
    device = torch.device("cuda")
    dtype = autocast_dtype(device, True)
    model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    rng = np.random.default_rng(0)
    pts = rng.uniform(20, 480, (30, 2)).astype(np.float32)
    patch = Patch(
        "p",
        (0, 0),
        rng.integers(0, 255, (512, 680, 3), dtype=np.uint8),
        pts,
        np.concatenate([pts - 16, pts + 16], 1),
        np.ones(30, np.int64),
    )
    losses = []
    loader = torch.utils.data.DataLoader([patch] * 4, batch_size=2, collate_fn=collate, pin_memory=True)
    assert train_one_epoch(model, opt, loader, device, scaler, dtype, 0, lambda s, v: losses.append(v["loss"])) == 2
    assert all(np.isfinite(losses)) and (dtype == torch.float16) == scaler.is_enabled()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to test")
        sys.exit(0)
    failed = 0
    for name, test in [(k, v) for k, v in dict(globals()).items() if k.startswith("test_")]:
        try:
            test()
            print(f"PASSED {name}")
        except Exception as e:  # report every test, then fail
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
