"""Train the paper's detector as one tracked MLflow run that ends in a registered model.

prepare (config, data, split, model: everything that can fail fast, before a run exists)
-> fit (epochs of train_one_epoch + validate; a local checkpoint after each, uploaded every
   `train.checkpoint_every` epochs; the epoch's model as an MLflow LoggedModel every
   `train.model_every` epochs and after the last, its validation metrics linked to it)
-> finish (the last epoch's LoggedModel registered with its alias, and its model card).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import torch
import yaml
from mlflow.exceptions import MlflowException

from . import config as config_mod
from . import figures, model_card, tracking
from .config import Config
from .data import Sample, configured_for, content_digest, load_dataset
from .engine import LOSS_NAMES, PRECISION_NAMES, Validation, autocast_dtype, pick_device, train_one_epoch, validate
from .errors import DetectionError
from .model import build_model, parameter_count
from .predict import log_detector
from .progress import Bar
from .sampling import EpochOrder, TrainPatches, collate, validation_patches
from .split import SPLITS, Split, SplitError, make_split

CHECKPOINT_DIR = "checkpoints"
OVERLAYS_PER_EPOCH = 4


@dataclass
class Prepared:
    cfg: Config
    data_dir: Path
    samples: dict[str, list[Sample]]  # by split
    split: Split
    digest: str
    model: torch.nn.Module
    parent: tracking.ModelRef | None = None  # the registered version fine-tuning started from

    def dataset(self, split: str) -> tuple[str, str]:
        """(name, digest) of a split's images, as the run's dataset inputs record them."""
        return f"brecahad-{split}", content_digest(self.samples[split], self.split.sha256)


def prepare(cfg: Config, data_dir: Path, recorded: Split | None = None) -> Prepared:
    """Validate the data, split it (or reuse a recorded split) and build the model."""
    samples = load_dataset(data_dir)
    cfg = configured_for(cfg, data_dir)
    prints = {s.name: s.fingerprint() for s in samples}
    hashes = {name: pixels for name, (pixels, _) in prints.items()}
    split = recorded or make_split(samples, cfg.data.split, hashes, {name: t for name, (_, t) in prints.items()})
    if recorded:
        now = hashes if recorded.hash_kind == "pixels" else {s.name: s.sha256() for s in samples}
        changed = [n for s in SPLITS for n in recorded.names(s) if now.get(n) != recorded.sha256.get(n)]
        if changed:
            raise SplitError(
                f"{data_dir}: images of the recorded split are missing or changed: {', '.join(changed[:5])}"
            )
    by_name = {s.name: s for s in samples}
    parts = {s: [by_name[n] for n in split.names(s)] for s in SPLITS}
    torch.manual_seed(cfg.train.seed)
    parent, start = parent_version(cfg)
    model = build_model(cfg.model, start=start)
    return Prepared(cfg, data_dir, parts, split, content_digest(samples, hashes), model, parent)


def parent_version(cfg: Config) -> tuple[tracking.ModelRef | None, dict | None]:
    """The registered version model.weights names (fine-tuning) and its state_dict, or (None, None).
    A parent trained at another scale than these images is said: its cells would look another size."""
    if not config_mod.is_registered(cfg.model.weights):
        return None, None
    ref = tracking.resolve_model(cfg.model.weights)
    detector = tracking.load_model(ref)
    if abs(detector.config.data.mpp - cfg.data.mpp) > 0.1 * cfg.data.mpp:
        print(
            f"warning: {ref.pinned} was trained at {detector.config.data.mpp} um/px and these images are "
            f"{cfg.data.mpp} um/px; import them rescaled to its scale for the best start",
            file=sys.stderr,
        )
    return ref, detector.model.state_dict()


def _index(prep: Prepared) -> pd.DataFrame:
    rows = []
    for split in SPLITS:
        for s in prep.samples[split]:
            rows.append(
                {"name": s.name, "case": s.case, "split": split, "sha256": prep.split.sha256[s.name]}
                | {f"n_{c}": len(s.points[c]) for c in prep.cfg.data.classes}
            )
    return pd.DataFrame(rows)


def log_setup(tr: tracking.Tracker, prep: Prepared) -> None:
    cfg = prep.cfg
    tr.log_params(cfg.flat())
    tr.client.log_text(tr.run_id, config_mod.dump(cfg), "config.yaml")
    tr.client.log_text(tr.run_id, prep.split.to_json(), "split.json")
    tr.set_tags(
        {
            "split_hash": prep.split.digest,
            "config": cfg.name,
            "data_digest": prep.digest,
            "parameters": parameter_count(prep.model),
        }
        | ({"parent_version": prep.parent.pinned} if prep.parent else {})
    )
    index = _index(prep)
    for split, context in (("train", "training"), ("val", "validation"), ("test", "testing")):
        part = index[index.split == split].reset_index(drop=True)
        name, digest = prep.dataset(split)
        tr.log_dataset(part, str(prep.data_dir), digest, name, context)


def _optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def local_checkpoints(run_id: str) -> Path:
    """Where a run's latest checkpoint lives on this machine ($BRECAHAD_CHECKPOINTS, else the user cache)."""
    root = os.environ.get("BRECAHAD_CHECKPOINTS") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "brecahad", "checkpoints"
    )
    return Path(root) / run_id


class Checkpoints:
    """The latest checkpoint on local disk after every epoch, uploaded every `every` epochs and after
    the last one: a paper.yaml checkpoint is ~1.7 GB, and an upload per GPU epoch would dominate.

    The state is copied to host memory and written in a background thread while the next epoch
    trains; training waits only for that copy and for the previous local write, never for an upload:
    an upload still under way when the next is due is skipped (`train/checkpoint_uploads_skipped`),
    and one to a server that stopped answering cannot stall the local checkpoint. Uploads alternate
    between two slots and `latest.json` names the one last written in full, so a process killed
    while uploading leaves the other; locally the file is replaced atomically. A finished run keeps
    one slot, its last.
    """

    def __init__(self, tr: tracking.Tracker, every: int, epochs: int):
        self.tr, self.every, self.epochs = tr, every, epochs
        self.dir = local_checkpoints(tr.run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.uploader = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self.local: tuple[int, Future] | None = None
        self.upload: tuple[int, Future] | None = None
        self.abandon_uploads = False  # set when the server is gone: nothing waits for it
        self.skipped = 0

    def save(self, state: dict) -> None:
        start = time.perf_counter()
        self._finish(self.local, "train/checkpoint_seconds")
        snapshot = _on_host(state)  # training goes on changing the tensors in place
        epoch, last = state["epoch"], state["epoch"] + 1 == self.epochs
        due = (epoch + 1) % self.every == 0 or last
        if due and self.upload and not self.upload[1].done() and not last:
            self.skipped, due = self.skipped + 1, False
            self.tr.log_metrics({"train/checkpoint_uploads_skipped": self.skipped}, epoch)
        slot = self.dir / f"slot-{epoch % 2}.pt" if due else None
        self.local = epoch, self.writer.submit(self._write, snapshot, slot)
        if slot is not None:
            self._finish(self.upload, "train/checkpoint_upload_seconds")
            self.upload = epoch, self.uploader.submit(self._upload, self.local[1], slot, state)
        self.tr.log_metrics({"train/checkpoint_wait_seconds": time.perf_counter() - start}, epoch)

    def _finish(self, pending: tuple[int, Future] | None, metric: str) -> None:
        """Wait for a write or upload under way (raising its error) and log how long it took."""
        if pending:
            epoch, future = pending
            self.tr.log_metrics({metric: future.result()}, epoch)

    def close(self) -> None:
        try:
            self._finish(self.local, "train/checkpoint_seconds")
            if not self.abandon_uploads:
                self._finish(self.upload, "train/checkpoint_upload_seconds")
        finally:
            self.writer.shutdown()
            self.uploader.shutdown(wait=not self.abandon_uploads)

    def _write(self, state: dict, slot: Path | None) -> float:
        start = time.perf_counter()
        torch.save(state, self.dir / "latest.pt.tmp")
        os.replace(self.dir / "latest.pt.tmp", self.dir / "latest.pt")
        _write_json(self.dir / "latest.json", {"epoch": state["epoch"], "step": state["step"]})
        if slot is not None:  # the upload takes this file's name: no second copy, and no later write changes it
            slot.unlink(missing_ok=True)
            os.link(self.dir / "latest.pt", slot)
        return time.perf_counter() - start

    def _upload(self, written: Future, slot: Path, state: dict) -> float:
        written.result()
        start = time.perf_counter()
        try:
            self.tr.client.log_artifact(self.tr.run_id, slot, CHECKPOINT_DIR)
        finally:
            slot.unlink()
        self.tr.client.log_text(
            self.tr.run_id,
            json.dumps({"epoch": state["epoch"], "step": state["step"], "file": slot.name}),
            f"{CHECKPOINT_DIR}/latest.json",
        )
        return time.perf_counter() - start


def _on_host(state):
    return torch.utils._pytree.tree_map(
        lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v, state
    )


def discard_local(run_id: str) -> None:
    shutil.rmtree(local_checkpoints(run_id), ignore_errors=True)


def _write_json(path: Path, value: dict) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(value))
    os.replace(path.with_suffix(".tmp"), path)


def latest_checkpoint(run_id: str, dst: Path) -> tuple[Path, str] | None:
    """The newest complete checkpoint of a run, local or uploaded, and where it came from; None if
    the run was interrupted in its first epoch."""
    local = local_checkpoints(run_id)
    local_epoch = json.loads((local / "latest.json").read_text())["epoch"] if (local / "latest.json").is_file() else -1
    uploaded = tracking.download_if_present(run_id, f"{CHECKPOINT_DIR}/latest.json", dst)
    uploaded_epoch = json.loads(uploaded.read_text())["epoch"] if uploaded else -1
    if local_epoch < 0 and uploaded_epoch < 0:
        return None
    if local_epoch >= uploaded_epoch:
        return local / "latest.pt", f"local epoch {local_epoch + 1}"
    name = json.loads(uploaded.read_text())["file"]
    return (
        tracking.download_if_present(run_id, f"{CHECKPOINT_DIR}/{name}", dst),
        f"uploaded epoch {uploaded_epoch + 1}",
    )


class CheckpointError(DetectionError, ValueError):
    """A checkpoint that is not what training writes; it is not loaded."""


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint's tensors and numbers, and nothing that runs: `weights_only` refuses any other
    object, so a file planted in a run's artifacts cannot run code as whoever resumes the run."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: the checkpoint holds objects other than tensors and numbers, which training never "
            f"writes, so it was not loaded ({str(e).splitlines()[0]}); delete it, or start a new run"
        ) from None


def fit(
    tr: tracking.Tracker,
    prep: Prepared,
    resume_from: Path | None,
    on_epoch: Callable[[int, Validation], None] | None = None,
    lease: tracking.Lease | None = None,
) -> torch.nn.Module:
    """Train for the remaining epochs; `on_epoch(epoch, validation)` may stop early by raising.
    Training stops, at the step it is in, when the tracking server stops answering (its checkpoint
    kept locally, the message saying how to resume) or when the run's lease is lost."""
    cfg, model = prep.cfg, prep.model
    device = pick_device(cfg.train.device)
    dtype = autocast_dtype(device, cfg.train.amp)
    if device.type == "cuda":  # every patch has the same size: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    model.to(device, memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.train.lr_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    tr.set_tags({"device": str(device), "precision": PRECISION_NAMES[dtype]})
    start_epoch, step = 0, 0
    if resume_from:
        state = load_checkpoint(resume_from, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    # Models a killed process logged for epochs this run trains again belong to weights it discards.
    tracking.delete_logged_models(tr.run_id, [epoch_model_name(e) for e in range(start_epoch, cfg.train.epochs)])
    train_set = TrainPatches(prep.samples["train"], cfg.data, cfg.train.seed)
    order = EpochOrder(len(train_set), cfg.train.seed)
    # On a CPU a patch costs ~1 ms against seconds per step: worker processes would only take cores.
    auto = min(4, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    workers = cfg.train.workers if cfg.train.workers >= 0 else auto
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.train.batch_size,
        sampler=order,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    val_set = validation_patches(prep.samples["val"], cfg.data, cfg.train.seed, cfg.data.val_patches)
    per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    checkpoints = Checkpoints(tr, cfg.train.checkpoint_every, cfg.train.epochs)
    remaining = (cfg.train.epochs - start_epoch) * (per_epoch + len(val_set))
    # Closing waits for the last write: a failed epoch still leaves the previous checkpoint complete.
    with (
        Bar(remaining, "train", every=max(1, per_epoch // 4)) as bar,
        contextlib.closing(checkpoints),
        tracking.ServerWatch() as watch,
        _stopping_when_lost(tr, watch, checkpoints),
    ):
        for epoch in range(start_epoch, cfg.train.epochs):
            bar.describe(f"epoch {epoch + 1}/{cfg.train.epochs}")
            order.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]

            def on_step(s: int, losses: dict[str, float], epoch=epoch) -> None:
                _alive(tr, watch, lease, checkpoints, epoch, s)
                tr.log_metrics({"train/loss": losses["loss"]} | {f"train/{k}": losses[k] for k in LOSS_NAMES}, s)
                bar.advance(loss=losses["loss"])

            step = train_one_epoch(model, optimizer, loader, device, scaler, dtype, step, on_step)
            scheduler.step()
            val = validate(
                model,
                val_set,
                device,
                dtype,
                cfg.match_radius_px,
                cfg.model.num_classes,
                on_patch=lambda: bar.advance(phase="val"),
            )
            _alive(tr, watch, lease, checkpoints, epoch, step)
            bar.note(
                f"epoch {epoch + 1}/{cfg.train.epochs}: val loss {val.loss:.3f}, detection rate "
                f"{val.counts.detection_rate:.3f}, FDR {val.counts.false_discovery_rate:.3f} "
                f"({len(val_set)} val patches)"
            )
            model_id = log_epoch_model(prep, model, epoch, step) if epoch_model_due(cfg, epoch) else None
            tr.log_metrics(
                {
                    "val/loss": val.loss,
                    "val/detection_rate": val.counts.detection_rate,
                    "val/fdr": val.counts.false_discovery_rate,
                    "val/f1": val.counts.f1,
                },
                epoch,
                model_id,
                prep.dataset("val"),
            )
            tr.log_metrics({"lr": lr}, epoch)
            if (epoch + 1) % cfg.train.figure_every == 0 or epoch + 1 == cfg.train.epochs:
                log_figures(tr, val_set, val.detections, epoch, per_epoch)
            checkpoints.save(
                {
                    "epoch": epoch,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                }
            )
            if on_epoch:
                on_epoch(epoch, val)
    return model


def epoch_model_name(epoch: int) -> str:
    return f"epoch-{epoch + 1}"


def epoch_model_due(cfg: Config, epoch: int) -> bool:
    return (epoch + 1) % cfg.train.model_every == 0 or epoch + 1 == cfg.train.epochs


def log_epoch_model(prep: Prepared, model: torch.nn.Module, epoch: int, step: int | None) -> str:
    """The epoch's weights as an MLflow LoggedModel `epoch-N` (step = epoch) in the active run;
    its id, to link the epoch's validation metrics to. `mlflow.search_logged_models` then ranks
    a run's epochs by them; the last one is what `finish` registers."""
    uri = log_detector(
        prep.cfg,
        model,
        name=epoch_model_name(epoch),
        step=epoch,
        params={"epoch": epoch + 1, "config": prep.cfg.name, "split_hash": prep.split.digest}
        | ({"step": step} if step is not None else {}),
    )
    return uri.removeprefix("models:/")


def final_model(tr: tracking.Tracker, prep: Prepared, model: torch.nn.Module) -> str:
    """The URI of the last epoch's LoggedModel; logged now if this run has none (a resumed run
    killed after its last epoch, before the model was written)."""
    last = prep.cfg.train.epochs - 1
    return tracking.logged_model(tr.run_id, epoch_model_name(last)) or (
        "models:/" + log_epoch_model(prep, model, last, None)
    )


def _server_lost(tr: tracking.Tracker, checkpoints: Checkpoints, where: str = "") -> tracking.TrackingLost:
    saved = checkpoints.dir / "latest.json"
    kept = (
        f"the checkpoint of epoch {json.loads(saved.read_text())['epoch'] + 1} is kept in {checkpoints.dir}"
        if saved.exists()
        else "no epoch had finished, so the run starts over"
    )
    return tracking.TrackingLost(
        f"the tracking server {mlflow.get_tracking_uri()} stopped answering{where}; {kept}. "
        f"When it answers again, resume with: python -m detection train --resume {tr.run_id}"
    )


def _alive(tr, watch: tracking.ServerWatch, lease, checkpoints: Checkpoints, epoch: int, step: int) -> None:
    """Stop at this step if the server is gone or another process may now hold the run."""
    if watch.down.is_set():
        checkpoints.abandon_uploads = True
        raise _server_lost(tr, checkpoints, f" during epoch {epoch + 1} (step {step})")
    if lease is not None and lease.lost.is_set():
        raise tracking.TrackingError(
            f"run {tr.run_id} lost its lease (its heartbeat went unanswered): another process may resume it, "
            f"so this one stops"
        )


@contextlib.contextmanager
def _stopping_when_lost(tr, watch: tracking.ServerWatch, checkpoints: Checkpoints):
    """A request that failed because the server is gone is the server's loss, not a bug: such a
    failure may come before the watch's verdict, so it is given the watch's grace to decide."""
    try:
        yield
    except (MlflowException, OSError) as e:
        if not (watch.remote and watch.down.wait(watch.grace + 2 * watch.every)):
            raise
        checkpoints.abandon_uploads = True
        raise _server_lost(tr, checkpoints) from e


def log_figures(tr: tracking.Tracker, val_set, detections, epoch: int, per_epoch: int) -> None:
    curve = figures.loss_curve(
        tracking.metric_history(tr.run_id, "train/loss"), tracking.metric_history(tr.run_id, "val/loss"), per_epoch
    )
    tr.client.log_figure(tr.run_id, curve, "loss_curve.png")
    figures.close(curve)
    for k, (patch, det) in enumerate(zip(val_set[:OVERLAYS_PER_EPOCH], detections)):
        fig = figures.overlay(patch.image, patch.boxes, det["boxes"], det["scores"], f"{patch.name} at {patch.origin}")
        tr.log_image(fig, f"val_overlay_{k}_{patch.name}", step=epoch + 1)  # one slider per patch
        figures.close(fig)


def finish(tr: tracking.Tracker, prep: Prepared, model: torch.nn.Module) -> int:
    """Log the trained model, then register it with the configured alias. A run that already
    registered a version (killed between registration and alias, then resumed) keeps that one."""
    cfg, name = prep.cfg, prep.cfg.tracking.registered_model
    earlier = tracking.versions_of_run(name, tr.run_id)
    if earlier:
        version = earlier[-1][1]
        tracking.client().set_registered_model_alias(name, cfg.tracking.alias, str(version))
    else:
        version = tracking.register(
            final_model(tr, prep, model),
            name,
            cfg.tracking.alias,
            {"split_hash": prep.split.digest, "config": cfg.name, "classes": ",".join(cfg.data.classes)}
            | ({"parent_version": prep.parent.pinned} if prep.parent else {}),
        )
    tr.set_tags({"registered_model": cfg.tracking.registered_model, "registered_version": version})
    model_card.publish(name, version)
    return version


def refuse_finished(run_id: str) -> None:
    """A finished run has nothing to resume; resuming it would register the same model again."""
    run = tracking.get_run(run_id)
    if run.info.status != "FINISHED":
        return
    versions = tracking.versions_of_run(None, run_id)
    carried = "; it registered " + ", ".join(f"{n} version {v}" for n, v in versions) if versions else ""
    raise tracking.TrackingError(
        f"run {run_id} already finished{carried}. Nothing to resume: start a new run "
        f"(leave out --resume), or promote or evaluate that version"
    )


def recorded_run(run_id: str) -> tuple[Config, Split]:
    """The config and split a run recorded, to resume it with exactly those."""
    try:
        config_text = tracking.read_artifact_text(run_id, "config.yaml")
        split_text = tracking.read_artifact_text(run_id, "split.json")
    except tracking.TrackingError as e:
        raise tracking.TrackingError(f"{e}; it cannot be resumed") from None
    return (
        config_mod.from_dict(yaml.safe_load(config_text), f"run {run_id} config.yaml"),
        Split.from_dict(yaml.safe_load(split_text)),
    )


def train(cfg: Config | None, data_dir: Path, resume: str | None = None) -> tuple[str, int]:
    """The whole job; returns the run id and the registered version. `cfg` is ignored on resume:
    a resumed run continues with the config and split it recorded."""
    if cfg is not None and cfg.second_look.weight > 0:
        raise config_mod.ConfigError(
            f"second_look.weight={cfg.second_look.weight}: a second look is fitted to a trained "
            f"detector's own detections; train with 0, then run `python -m detection "
            f"second-look` on the registered version"
        )
    tracking.check_reachable()
    tracking.bound_requests()
    with contextlib.ExitStack() as held:
        recorded = None
        if resume:
            lease = held.enter_context(claim(resume))  # before anything of the run is touched
            refuse_finished(resume)
            cfg, recorded = recorded_run(resume)
        prep = prepare(cfg, data_dir, recorded)
        with tracking.run(
            cfg.tracking.experiment, resume, cfg.tracking.system_metrics, name=None if resume else f"train {cfg.name}"
        ) as tr:
            if not resume:
                lease = held.enter_context(claim(tr.run_id))
                log_setup(tr, prep)
            tidy_checkpoints(tr.run_id)
            with tempfile.TemporaryDirectory(prefix="brecahad-resume-") as tmp:
                # A run interrupted in its first epoch has no checkpoint yet and starts over.
                found = latest_checkpoint(resume, Path(tmp)) if resume else None
                if found:
                    tr.set_tags({"resumed_from": found[1]})
                model = fit(tr, prep, found and found[0], lease=lease)
            version = finish(tr, prep, model)
            tidy_checkpoints(tr.run_id, keep=f"slot-{(cfg.train.epochs - 1) % 2}.pt")
    discard_local(tr.run_id)  # the run finished; its checkpoint is uploaded
    return tr.run_id, version


def claim(run_id: str) -> tracking.Lease:
    """The run's lease, held while this process trains it: a second process resuming the same run
    is refused, not run beside it (two resumes at once registered twice and logged steps twice)."""
    try:
        return tracking.Lease(f"run:{run_id}").acquire(wait=0)
    except tracking.LeaseHeld as e:
        raise tracking.TrackingError(
            f"run {run_id} is being trained by another process ({e}); wait for it to end, or stop it, then resume"
        ) from None


def tidy_checkpoints(run_id: str, keep: str | None = None) -> None:
    """Remove what a kill mid-upload leaves in the run (a half-written checkpoint) and, with `keep`,
    every checkpoint slot but that one: a finished run needs its last checkpoint only."""
    tracking.remove_partial_uploads(run_id, CHECKPOINT_DIR)
    if keep:
        names = [Path(a.path).name for a in tracking.client().list_artifacts(run_id, CHECKPOINT_DIR)]
        others = [n for n in names if n.startswith("slot-") and n != keep]
        tracking.delete_artifacts(run_id, [f"{CHECKPOINT_DIR}/{n}" for n in others])


def train_nested(
    cfg: Config,
    data_dir: Path,
    split: Split,
    parent: str,
    name: str,
    on_epoch: Callable[[int, Validation], None] | None = None,
) -> tuple[str, str, torch.nn.Module]:
    """A nested run (a tuning trial, a cross-validation fold) that trains on a given split and logs
    its model unregistered. Returns the run id, the logged model's URI and the trained model."""
    prep = prepare(cfg, data_dir, split)
    with tracking.run(cfg.tracking.experiment, parent=parent, name=name) as tr:
        log_setup(tr, prep)
        try:
            model = fit(tr, prep, None, on_epoch)
        finally:  # a trial is re-run from scratch, never resumed
            discard_local(tr.run_id)
        model_uri = final_model(tr, prep, model)
        tidy_checkpoints(tr.run_id, keep=f"slot-{(cfg.train.epochs - 1) % 2}.pt")
        return tr.run_id, model_uri, model


def reregister(uri: str) -> tuple[str, int]:
    """Log a version an earlier release registered as a pickled object again, from the project's
    code, reading only its config (YAML) and weights (state_dicts): its pickle never loads. The new
    version's run carries the source run's split, so it is judged on the same held-out images."""
    from .predict import load_second_look, load_weights

    ref = tracking.resolve_model(uri)
    with tempfile.TemporaryDirectory(prefix="brecahad-reregister-") as tmp:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.pinned, dst_path=tmp)) / "artifacts"
        if not (path / "config.yaml").is_file() or not (path / "weights.pt").is_file():
            raise tracking.TrackingError(
                f"{ref.pinned} holds no config.yaml and weights.pt among its artifacts: it is not a version "
                f"of this project"
            )
        cfg, model = load_weights(path / "config.yaml", path / "weights.pt")
        second = path / "second_look.pt"
        second_look = load_second_look(cfg, second if second.is_file() else None)
    source = tracking.client().get_model_version(ref.name, str(ref.version))
    with tracking.run(cfg.tracking.experiment, name=f"reregister v{ref.version}") as tr:
        if ref.run_id:
            with contextlib.suppress(tracking.TrackingError):
                tr.client.log_text(tr.run_id, tracking.read_artifact_text(ref.run_id, "split.json"), "split.json")
        tr.client.log_text(tr.run_id, config_mod.dump(cfg), "config.yaml")
        tr.set_tags({"reregistered_from": ref.pinned})
        model_uri = log_detector(cfg, model, second_look)
        version = tracking.register(
            model_uri,
            ref.name,
            cfg.tracking.alias,
            {k: v for k, v in source.tags.items() if not k.startswith("promotion.")}
            | {"reregistered_from": ref.version},
        )
        tr.set_tags({"registered_version": version})
        model_card.publish(ref.name, version)
        return tr.run_id, version
