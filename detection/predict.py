"""The registered model: an MLflow pyfunc holding the weights (a state_dict) and the resolved config.
It decodes and checks what it is sent and runs the version's pipeline (pipeline.detect); nothing in
it knows about evaluation.

A state_dict plus config loads on any machine, GPU or not, without pickling torchvision classes.
Input: a DataFrame whose `image` column holds, per row, an RGB uint8 array (H, W, 3) (nested
lists in JSON) or a base64-encoded TIFF or PNG file. Output: one row per detection with its image
index, box, score, label, class name and centre point, after the post-processing the version
carries. Bad input raises an MLflow INVALID_PARAMETER_VALUE error: HTTP 400 from the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import tifffile
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType

from . import config as config_mod
from . import tracking
from .classifier import build_classifier
from .errors import DetectionError
from .inference import Runtime
from .model import build_model
from .pipeline import detect
from .sampling import chw

MIN_SIDE = 32  # px: the smallest FPN anchor; a smaller image holds no cell the model could find
MAX_PIXELS = 64_000_000  # 8000 x 8000: about 700 tiles, minutes on a CPU; split larger slides first


class InputError(DetectionError, ValueError):
    """An image or request the model cannot read; the message names it."""


def decode_image(data: str | bytes) -> np.ndarray:
    """A base64 (or raw) TIFF or PNG file as an RGB uint8 array."""
    raw = data
    if isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image column holds a string that is not base64 ({e})") from None
    check_declared_size(raw)
    if raw[:8] == PNG_SIGNATURE:
        from torchvision.io import ImageReadMode, decode_png

        return (
            decode_png(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
            .permute(1, 2, 0)
            .numpy()
        )
    try:
        return tifffile.imread(io.BytesIO(raw))
    except Exception as e:
        raise InputError(f"image bytes are neither PNG nor a readable TIFF ({type(e).__name__}: {e})") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def declared_size(raw: bytes) -> tuple[int, int] | None:
    """(height, width) a PNG's IHDR or a TIFF's first series declares, read from the header alone;
    None when the bytes are neither (decoding then says what is wrong)."""
    if raw[:8] == PNG_SIGNATURE and len(raw) >= 24:
        return int.from_bytes(raw[20:24], "big"), int.from_bytes(raw[16:20], "big")
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            shape = tif.series[0].shape
    except Exception:  # not a TIFF, or a damaged one: decoding reports it
        return None
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None


def check_declared_size(raw: bytes) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS before a byte of it is decoded: a
    1.3 MB TIFF may declare 20000 x 20000 and take gigabytes to decode (a decompression bomb)."""
    size = declared_size(raw)
    if size and size[0] * size[1] > MAX_PIXELS:
        raise InputError(
            f"image declares {size[1]}x{size[0]} px, more than {MAX_PIXELS / 1e6:.0f} megapixels; "
            f"split the slide into fields first"
        )


def _as_array(value, i: int) -> np.ndarray:
    if isinstance(value, (str, bytes)):
        return decode_image(value)
    try:
        img = np.asarray(value)
    except ValueError as e:
        raise InputError(f"image {i}: not a rectangular array ({e})") from None
    # JSON carries pixels as plain integers: accept nested lists of integers within 0..255. An array
    # keeps its dtype, so a 16-bit image is refused however dark it is.
    if (
        not isinstance(value, np.ndarray)
        and img.dtype.kind in "iu"
        and img.size
        and img.min() >= 0
        and img.max() <= 255
    ):
        img = img.astype(np.uint8)
    return img


def as_images(model_input) -> list[np.ndarray]:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise InputError(
                f"input needs an 'image' column (RGB uint8 arrays or base64 TIFF/PNG), "
                f"got columns {list(model_input.columns)}"
            )
        images = [_as_array(v, i) for i, v in enumerate(model_input["image"])]
    elif isinstance(model_input, np.ndarray):
        images = [model_input] if model_input.ndim == 3 else list(model_input)
    else:
        raise InputError(
            f"unsupported input type {type(model_input).__name__}; send a DataFrame with an 'image' column"
        )
    if not images:
        raise InputError("no images in the request")
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
            raise InputError(f"image {i}: expected RGB uint8 pixels (H, W, 3), got {img.dtype} {img.shape}")
        if min(img.shape[:2]) < MIN_SIDE:
            raise InputError(
                f"image {i}: {img.shape[1]}x{img.shape[0]} px is smaller than one anchor "
                f"({MIN_SIDE} px a side); send the whole field"
            )
        if img.shape[0] * img.shape[1] > MAX_PIXELS:
            raise InputError(
                f"image {i}: {img.shape[1]}x{img.shape[0]} px is more than {MAX_PIXELS / 1e6:.0f} "
                f"megapixels; split the slide into fields first"
            )
    return images


def encode_png(image: np.ndarray) -> str:
    """An RGB uint8 image as base64 PNG, the compact way to send it to the server."""
    from torchvision.io import encode_png as _encode

    return base64.b64encode(_encode(chw(image)).numpy().tobytes()).decode()


def load_weights(config_path: str | Path, weights_path: str | Path) -> tuple[config_mod.Config, torch.nn.Module]:
    cfg = config_mod.from_dict(yaml.safe_load(Path(config_path).read_text()), source=str(config_path))
    model = build_model(cfg.model, pretrained=False)
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return cfg, model.eval()


def load_second_look(cfg: config_mod.Config, weights_path: str | Path | None) -> torch.nn.Module | None:
    """The version's classifier, or None; a config that asks for one without its weights is broken."""
    if cfg.second_look.weight == 0:
        return None
    if weights_path is None:
        raise ValueError(
            f"the config sets second_look.weight={cfg.second_look.weight} but the model holds no "
            f"second_look weights; register it with `python -m detection second-look`"
        )
    net = build_classifier()
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return net.eval()


class Detector(mlflow.pyfunc.PythonModel):
    """The pyfunc. It runs where $BRECAHAD_DEVICE / $BRECAHAD_PRECISION / $BRECAHAD_TILE_BATCH say,
    by default on CUDA (bf16 autocast, 9 tiles per pass) when present, else on the CPU in fp32."""

    def load_context(self, context) -> None:
        self.config, self.model = load_weights(context.artifacts["config"], context.artifacts["weights"])
        self.second_look = load_second_look(self.config, context.artifacts.get("second_look"))
        self.runtime = Runtime.choose()
        self.runtime.place(self.model)
        if self.second_look is not None:
            self.second_look.to(self.runtime.device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            images = as_images(model_input)
        except InputError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return detect(
            self.model, images, self.config, getattr(self, "runtime", None), getattr(self, "second_look", None)
        )


def signature() -> ModelSignature:
    """Any number of images of any size, each an array or a base64 file, in an `image` column."""
    outputs = [ColSpec(DataType.long, "image")] + [
        ColSpec(DataType.float, c) for c in ("x1", "y1", "x2", "y2", "score")
    ]
    outputs += [
        ColSpec(DataType.long, "label"),
        ColSpec(DataType.string, "class"),
        ColSpec(DataType.float, "cx"),
        ColSpec(DataType.float, "cy"),
    ]
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), "image")]), outputs=Schema(outputs))


def input_example() -> pd.DataFrame:
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    return pd.DataFrame({"image": [encode_png(image)]})


def log_detector(
    cfg: config_mod.Config,
    model: torch.nn.Module,
    second_look: torch.nn.Module | None = None,
    name: str = "model",
    step: int = 0,
    params: dict | None = None,
) -> str:
    """Log weights + config (+ the second look's weights) as the project's pyfunc in the active run,
    an MLflow LoggedModel called `name` at `step`, checked by loading it back; its models:/m-... URI."""
    with tempfile.TemporaryDirectory(prefix="brecahad-model-") as tmp:
        weights, config_path = Path(tmp) / "weights.pt", Path(tmp) / "config.yaml"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
        config_path.write_text(config_mod.dump(cfg))
        artifacts = {"weights": str(weights), "config": str(config_path)}
        if second_look is not None:
            torch.save({k: v.cpu() for k, v in second_look.state_dict().items()}, Path(tmp) / "second_look.pt")
            artifacts["second_look"] = str(Path(tmp) / "second_look.pt")
        return tracking.log_model(artifacts, input_example(), signature(), name, step, params).model_uri
