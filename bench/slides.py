"""Whole slides: what the slide path costs beyond the model, peak memory against slide size, and
Ray against one by one. Slides are mosaics of the real fields of ../shared/data (pyramidal TIFFs,
resolution tags set, white margins), counted by an untrained smoke-shaped model (or the paper's on
a GPU), registered in a temporary sqlite store.

    python bench/slides.py [--fields 4] [--config experiments/smoke.yaml] [--device cpu] [--skip-ray]

Prints one JSON line per figure:
- overhead: megapixels/s of tissue through `count` (read ahead, mask, write) against the same
  regions' pixels fed straight to the version's pipeline in the same run;
- memory: peak RSS of `count` in a fresh process, for a slide and one 4x (and 16x) its area;
- ray: three slides through `slides` one by one in this process, then as Ray tasks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "brecahad-sample"


def fields(n: int) -> list[np.ndarray]:
    from detection.data import load_dataset

    return [s.read_image() for s in load_dataset(SAMPLE)[:n]]


def register(folder: Path, config: str, device: str) -> str:
    """An untrained model of `config` registered in a sqlite store in `folder`; its URI."""
    import mlflow

    from detection import config as config_mod
    from detection import tracking
    from detection.model import build_model
    from detection.predict import log_detector

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    cfg = config_mod.load(config)
    torch_model = build_model(cfg.model, pretrained=False)
    mlflow.set_experiment("bench-slides")
    with mlflow.start_run(run_name="bench model"):
        uri = log_detector(cfg, torch_model)
    version = tracking.register(uri, "bench-slides", "challenger", {"bench": "slides"})
    return f"models:/bench-slides/{version}"


def overhead(model_uri: str, slide_path: Path, out: Path) -> dict:
    import pandas as pd

    from detection import slides, tracking

    detector = tracking.load_model(tracking.resolve_model(model_uri))
    slide = slides.open_slide(slide_path)
    job = slides.Job.of(model_uri, detector.config.data)

    def run(pixels):
        return detector.predict(None, pd.DataFrame({"image": [pixels]}))

    # The same regions' pixels, read beforehand, straight into the pipeline; the model warmed up
    # first, so neither pass pays for its first call.
    mask = slides.tissue_mask(slide)
    scale = job.model_mpp / slide.mpp
    regions = [r for r in slides.plan(slide, mask, scale, job.region, job.overlap) if r.tissue >= slides.MIN_TISSUE]
    pixels = [slides.read_region(slide, r, scale) for r in regions]
    run(pixels[0][:512, :512])
    start = time.perf_counter()
    for p in pixels:
        run(p)
    model_only = time.perf_counter() - start
    start = time.perf_counter()
    summary = slides.count(slide, job, run, out)
    whole = time.perf_counter() - start
    tissue_mp = sum(p.shape[0] * p.shape[1] for p in pixels) / 1e6
    return {
        "figure": "overhead",
        "slide_px": list(slide.size),
        "tissue_regions": summary["tissue_regions"],
        "background_regions": summary["background_regions"],
        "tissue_megapixels": round(tissue_mp, 2),
        "slide_path_s": round(whole, 2),
        "model_only_s": round(model_only, 2),
        "slide_path_mp_per_s": round(tissue_mp / whole, 3),
        "model_only_mp_per_s": round(tissue_mp / model_only, 3),
        "overhead_fraction": round((whole - model_only) / whole, 4),
        "runtime": detector.runtime.describe(),
    }


PEAK = """
import resource, sys, pandas as pd
from detection import slides, tracking
detector = tracking.load_model(tracking.resolve_model(sys.argv[1]))
slide = slides.open_slide(sys.argv[2])
job = slides.Job.of(sys.argv[1], detector.config.data)
slides.count(slide, job, lambda p: detector.predict(None, pd.DataFrame({"image": [p]})), sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(model_uri: str, slide_path: Path, out: Path, env: dict) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PEAK, model_uri, str(slide_path), str(out)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return int(done.stdout.split()[-1]) / 1024  # MB (ru_maxrss is in KiB on Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=4, help="real fields in the base slide")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "smoke.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--margin", type=int, default=600, help="white px around and between fields")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    import os

    os.environ["BRECAHAD_DEVICE"] = args.device
    from detection.synth import mosaic, write_slide

    folder = Path(tempfile.mkdtemp(prefix="bench-slides-"))
    model_uri = register(folder, args.config, args.device)
    env = dict(os.environ) | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    base, _ = mosaic(fields(args.fields), 2, args.margin)
    slide = write_slide(folder / "base.tiff", base, 0.514, levels=5)
    print(json.dumps(overhead(model_uri, slide, folder / "overhead")), flush=True)

    if not args.skip_memory:
        for k in (1, 2):  # 1x and 4x the area; the 4x slide is the base tiled 2 x 2
            path = write_slide(folder / f"x{k * k}.tiff", np.tile(base, (k, k, 1)), 0.514, levels=5)
            mb = peak_rss(model_uri, path, folder / f"memory-{k}", env)
            size = [base.shape[1] * k, base.shape[0] * k]
            row = {"figure": "memory", "area": k * k, "slide_px": size, "peak_rss_mb": round(mb, 1)}
            print(json.dumps(row), flush=True)

    if not args.skip_ray:
        from detection.slide_job import SlidesRequest, slides

        paths = tuple(write_slide(folder / f"r{k}.tiff", f, 0.514) for k, f in enumerate(fields(3)))
        timings = {}
        for mode in ("off", "auto"):
            start = time.perf_counter()
            slides(SlidesRequest(paths, model_uri, folder / f"ray-{mode}", ray_address=mode))
            timings[mode] = round(time.perf_counter() - start, 2)
        print(json.dumps({"figure": "ray", "slides": 3, "one_by_one_s": timings["off"], "ray_s": timings["auto"],
                          "cpus": os.cpu_count()}), flush=True)  # fmt: skip
    print(json.dumps({"figure": "peak_rss_of_this_process_mb",
                      "mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
