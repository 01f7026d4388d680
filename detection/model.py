"""The paper's torchvision Faster R-CNN (ResNet-FPN), built from ModelConfig alone.

Nothing downloads at import. Pretrained weights are fetched only when the config asks for them,
and a failed fetch says where torchvision looks (TORCH_HOME) and how to train without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.models import ResNet50_Weights, get_model_weights
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops

from .config import ModelConfig, is_registered
from .errors import DetectionError
from .postprocess import ExactRoIHeads


class WeightsError(DetectionError, RuntimeError):
    """Weights that cannot be fetched or do not fit the model; the message says where to get them."""


def _fetch(weights, what: str) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:
        home = os.environ.get("TORCH_HOME", str(Path.home() / ".cache" / "torch"))
        raise WeightsError(
            f"could not load the {what} weights ({weights.url}): {type(e).__name__}: {e}. "
            f"Download the file once on a machine with internet and put it in {home}/hub/checkpoints/ "
            f"(TORCH_HOME={home}), pass a local file with model.weights=/path/to/state_dict.pt, "
            f"or train from scratch with model.weights=none."
        ) from e


def build_model(cfg: ModelConfig, pretrained: bool = True, start: dict[str, torch.Tensor] | None = None) -> FasterRCNN:
    """Faster R-CNN with every setting of the paper taken from `cfg`.

    `pretrained=False` builds the same architecture without loading `cfg.weights`, for a model
    whose trained state_dict is loaded next. With model.weights=models:/..., `start` is that
    registered version's state_dict (train fetches it from the registry): fine-tuning starts there.
    """
    pretrained_backbone = cfg.weights != "none"
    # Pretrained weights keep their BatchNorm statistics frozen (as the paper's FrozenBatchNorm
    # shows); from scratch with batch size 1, plain BatchNorm is the only choice that learns them.
    norm = misc_nn_ops.FrozenBatchNorm2d if pretrained_backbone else torch.nn.BatchNorm2d
    backbone = resnet_fpn_backbone(
        backbone_name=cfg.backbone,
        weights=None,
        norm_layer=norm,
        trainable_layers=cfg.trainable_backbone_layers if pretrained_backbone else 5,
    )
    if pretrained and cfg.weights == "imagenet":
        weights = (
            get_model_weights(cfg.backbone).DEFAULT if cfg.backbone != "resnet50" else ResNet50_Weights.IMAGENET1K_V1
        )
        state = _fetch(weights, f"ImageNet {cfg.backbone}")
        missing, _ = backbone.body.load_state_dict(state, strict=False)
        if missing:
            raise WeightsError(
                f"the ImageNet {cfg.backbone} file lacks {missing[:3]}; delete it from TORCH_HOME and fetch it again"
            )
    pooled = cfg.roi_output_size
    box_roi_pool = MultiScaleRoIAlign(
        list(cfg.roi_featmap_names), output_size=pooled, sampling_ratio=cfg.roi_sampling_ratio
    )
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        box_roi_pool=box_roi_pool,
        box_head=TwoMLPHead(backbone.out_channels * pooled * pooled, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, cfg.num_classes),
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh,
    )
    # The same heads and state_dict, with post-processing that the replay reproduces exactly under
    # any autocast dtype and on any device (postprocess.py says why torchvision's does not).
    model.roi_heads.__class__ = ExactRoIHeads
    model.roi_heads.nms_class_agnostic = cfg.box_nms_class_agnostic
    if not pretrained or cfg.weights in ("imagenet", "none"):
        return model
    if is_registered(cfg.weights):
        if start is None:
            raise WeightsError(f"model.weights={cfg.weights}: a registered version's weights come from the registry")
        _load_parent(model, start, cfg.weights)
    elif cfg.weights == "coco":
        _load_matching(model, _fetch(FasterRCNN_ResNet50_FPN_Weights.COCO_V1, "COCO Faster R-CNN"))
    else:
        _load_file(model, Path(cfg.weights))
    return model


def _load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every tensor whose name and shape agree. The paper's 21x21 RoI pool and 2-class
    predictor differ from COCO's, so those layers keep their fresh initialisation."""
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


PREDICTOR = "roi_heads.box_predictor."


def _load_parent(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor of a registered version; the box predictor starts afresh when the class count
    differs. A parent of another architecture is refused: fine-tuning from a part of it is not."""
    own = model.state_dict()
    differ = [
        k for k, v in own.items() if not k.startswith(PREDICTOR) and (k not in state or state[k].shape != v.shape)
    ]
    if differ:
        raise WeightsError(
            f"model.weights={source}: {len(differ)} of the model's tensors differ from that version's "
            f"(first: {differ[0]}); fine-tune with the version's own model settings (its config.yaml)"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def _load_file(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"model.weights={path}: no such file; give a state_dict saved with torch.save, or use none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"model.weights={path}: not a loadable state_dict ({type(e).__name__}: {e})") from e
    state = state.get("model", state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"model.weights={path}: does not fit this model config ({e})") from e


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
