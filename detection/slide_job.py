"""`slides`: count tumour cells on whole slides with a registered version, one MLflow run per job
and a nested run per slide. Several slides (or a --ray-address) go to Ray, one task per slide
(`num_gpus=1` on a GPU worker): a lab's cluster, or Ray embedded on this machine. The workers log
their slide's run to the tracking server themselves."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from . import tracking
from .errors import DetectionError
from .slides import REGION, Job, Outputs, SlideError, count, open_slide, stem


@dataclass(frozen=True)
class SlidesRequest:
    slides: tuple[Path, ...]
    model: str
    out: Path
    mpp: float | None = None  # µm/px of the slides when they record none
    region: int = REGION
    device: str = ""
    ray_address: str = "auto"  # auto: Ray embedded here for several slides; off: one by one here
    num_cpus: int | None = None  # of embedded Ray; None: every core

    def check(self) -> None:
        """Every slide opened (format, resolution) before any model loads: a bad one costs a second."""
        if not self.slides:
            raise SlideError("no slide given: name one or more slide files")
        if self.region < 256:
            raise SlideError(f"--region {self.region} px is too small: a region holds tiles of the training patch")
        stems: dict[str, Path] = {}
        for path in self.slides:
            open_slide(path, self.mpp)
            key = stem(path).lower()
            if key in stems:
                raise SlideError(f"{stems[key]} and {path} would both write {self.out / stem(path)}.*: rename one")
            stems[key] = path

    @property
    def on_ray(self) -> bool:
        return self.ray_address != "off" and (len(self.slides) > 1 or self.ray_address != "auto")


def slides(req: SlidesRequest) -> tuple[str, list[dict]]:
    """Count every slide of the request; the job's run id and one summary per slide."""
    req.check()
    ref = tracking.resolve_model(req.model)
    req = replace(req, model=ref.pinned, out=req.out.resolve(), slides=tuple(p.resolve() for p in req.slides))
    req.out.mkdir(parents=True, exist_ok=True)
    with tracking.run("slides", name=f"slides v{ref.version}") as tr:
        tr.log_params(
            {
                "model_version": ref.pinned,  # `mlflow run` logs `model` as given (an alias)
                "slide_count": len(req.slides),
                "mpp": req.mpp if req.mpp is not None else "recorded",
                "region_px": req.region,
                "device": req.device or os.environ.get("BRECAHAD_DEVICE", "auto"),
                "ray": req.ray_address if req.on_ray else "off",
            }
        )
        start = time.monotonic()
        if req.on_ray:
            summaries = _on_ray(req, tr.run_id)
        else:  # one model for every slide
            detector = load(req)
            summaries = [count_one(p, req, tr.run_id, detector) for p in req.slides]
        elapsed = time.monotonic() - start
        tr.log_metrics(job_metrics(summaries, elapsed), step=0)
        table = pd.DataFrame([{k: v for k, v in s.items() if not isinstance(v, dict | list)} for s in summaries])
        tr.client.log_table(tr.run_id, table, "slides.json")
    return tr.run_id, summaries


def job_metrics(summaries: list[dict], elapsed: float) -> dict[str, float]:
    tissue = sum(s["tissue_mm2"] for s in summaries)
    detections = sum(s["detections"] for s in summaries)
    megapixels = sum(s["size"][0] * s["size"][1] for s in summaries) / 1e6
    return {
        "slides": len(summaries),
        "tiles": sum(s["tissue_regions"] for s in summaries),
        "background_tiles": sum(s["background_regions"] for s in summaries),
        "tissue_mm2": tissue,
        "detections": detections,
        "detections_per_mm2": detections / tissue if tissue else 0.0,
        "megapixels_per_s": megapixels / elapsed if elapsed > 0 else 0.0,
        "tissue_megapixels_per_s": sum(tissue_megapixels(s) for s in summaries) / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
    }


def tissue_megapixels(s: dict) -> float:
    """The slide's tissue in level-0 megapixels: what the model had to look at."""
    return s["tissue_mm2"] / (s["mpp"] / 1000) ** 2 / 1e6


def load(req: SlidesRequest):
    """The version's pyfunc on the request's device."""
    if req.device:
        os.environ["BRECAHAD_DEVICE"] = req.device  # read by the pyfunc when it loads
    return tracking.load_model(tracking.resolve_model(req.model))


def count_one(path: Path, req: SlidesRequest, parent: str, detector=None) -> dict:
    """One slide, in this process or a Ray worker (which loads the version itself): its nested
    run, its regions, its outputs."""
    detector = detector or load(req)
    slide = open_slide(path, req.mpp)
    job = Job.of(req.model, detector.config.data, req.region, req.mpp)

    def run_region(pixels):
        return detector.predict(None, pd.DataFrame({"image": [pixels]}))

    # On a GPU, MLflow's system metrics record its use beside the slide's figures (the gpu extra).
    on_gpu = detector.runtime.device.type == "cuda"
    with tracking.run("slides", parent=parent, name=path.name, system_metrics=on_gpu) as tr:
        tr.log_params({"slide": str(path), "slide_mpp": slide.mpp, "reader": slide.reader, "model_mpp": job.model_mpp})
        tr.set_tags({"slide": path.name, "model": req.model})
        start = time.monotonic()
        summary = count(slide, job, run_region, req.out)
        runtime = detector.runtime.describe()
        summary = summary | {"seconds": time.monotonic() - start, "device": runtime["device"]}
        tr.log_metrics(slide_metrics(summary), step=0)
        for path_out in Outputs(req.out, stem(path)).paths().values():
            tr.client.log_artifact(tr.run_id, str(path_out), "slide")
    if summary["empty_tissue"]:
        print(f"{path}: no tissue found; 0 detections logged", file=sys.stderr)
    return summary


def slide_metrics(s: dict) -> dict[str, float]:
    metrics = {
        "tiles": s["tissue_regions"],
        "background_tiles": s["background_regions"],
        "tissue_mm2": s["tissue_mm2"],
        "detections": s["detections"],
        "seconds": s["seconds"],
        "megapixels_per_s": s["size"][0] * s["size"][1] / 1e6 / s["seconds"] if s["seconds"] > 0 else 0.0,
        "tissue_megapixels_per_s": tissue_megapixels(s) / s["seconds"] if s["seconds"] > 0 else 0.0,
    }
    metrics |= {f"count/{k}": v for k, v in s["counts"].items()}
    metrics |= {f"per_mm2/{k}": v for k, v in s["per_mm2"].items()}
    return metrics


class ClusterError(DetectionError, RuntimeError):
    """Ray could not be reached or started; the message says where."""


def _on_ray(req: SlidesRequest, parent: str) -> list[dict]:
    """One Ray task per slide. The workers talk to the same tracking store as this process."""
    try:
        import ray
    except ImportError:
        raise ClusterError("several slides run on Ray: pip install -e '.[slides]'") from None
    uri = absolute_uri(tracking.mlflow.get_tracking_uri())
    env = {"MLFLOW_TRACKING_URI": uri} | {k: v for k, v in os.environ.items() if k.startswith("BRECAHAD_")}
    address = None if req.ray_address == "auto" else req.ray_address
    try:
        ray.init(address=address, num_cpus=req.num_cpus if address is None else None,
                 runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=True)  # fmt: skip
    except Exception as e:
        raise ClusterError(f"Ray at {address or 'this machine'} could not start: {type(e).__name__}: {e}") from None
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_gpus=gpus, max_retries=2)(count_one)
        return ray.get([task.remote(p, req, parent) for p in req.slides])
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), DetectionError) else None
        if cause is not None:
            raise cause from None
        raise
    finally:
        ray.shutdown()


def absolute_uri(uri: str) -> str:
    """A sqlite URI relative to this folder made absolute: Ray's workers start elsewhere."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
