"""Mask R-CNN for cells with a Panoptic-FPN-style semantic head (background/nucleus/cytoplasm).

:func:`build_model` composes torchvision's :class:`~torchvision.models.detection.MaskRCNN`
from a typed :class:`MaskRCNNConfig`: a ResNet (depth 18/34/50, optionally cut after
``layer3``) with a feature pyramid, anchors sized for cells, light box/mask heads, no
input resizing (the caller rescales images so that nuclei have
:data:`~cellrna_pipeline.core.segmentation.base.CANONICAL_NUCLEUS_DIAMETER_PX` pixels),
and a semantic head on the FPN features plus a full-resolution image branch, trained
jointly with the detector. No pretrained weights are used (none can be downloaded): the
model trains from scratch on the synthetic generator. Any backbone that returns an
ordered dict of feature maps and has an ``out_channels`` attribute (a ViT/DINOv2 with a
simple feature pyramid, where weights are available offline) can be passed to
:func:`build_model` instead of the ResNet.

Tensors: images ``(C, H, W)`` float32 (``C = config.n_input_channels``: per stain of
``config.input_channels`` the slices ``z - k .. z + k`` with ``k = config.z_context``,
normalized to ~[0, 1], a missing stain all zeros); training targets per image
``boxes (N, 4)`` float xyxy pixels, ``labels (N,)`` int64 (1 = cell), ``masks (N, H, W)``
uint8, ``semantic (H, W)`` int64 in 0..2 (255 = ignore). Eval output per image:
``boxes (N, 4)``, ``scores (N,)``, ``labels (N,)``, ``masks (N, 1, M, M)`` mask
probabilities inside each box (not pasted; see
:func:`~cellrna_pipeline.core.segmentation.inference.paste_instances`), ``semantic``
``(3, H, W)`` logits.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cellrna_pipeline.core.config import StrictModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.segmentation.base import (
    CANONICAL_NUCLEUS_DIAMETER_PX,
    SEMANTIC_CLASSES,
)

IGNORE_INDEX = 255
MODEL_KIND = "cellrna-cell-maskrcnn"
KNOWN_CHANNELS = ("nucleus", "cytoplasm")


class MaskRCNNConfig(StrictModel):
    """Architecture of the cell Mask R-CNN (everything needed to rebuild it from weights).

    Attributes
    ----------
    backbone_depth : ResNet depth (18, 34 or 50).
    backbone_stages : use ResNet stages ``layer1..layer{n}`` (3: cut after layer3,
        stride 16; 4: the full ResNet).
    norm : ``"group"`` (GroupNorm, stable from scratch at small batches) or ``"batch"``.
    fpn_channels : channels of every feature-pyramid level.
    anchor_sizes_px : one anchor size per pyramid level (``backbone_stages + 1`` levels,
        the last a max-pooled level), in pixels at the canonical scale.
    aspect_ratios : anchor aspect ratios (height / width).
    input_channels : stains fed to the network, in order (each ``nucleus`` or
        ``cytoplasm``); a stain absent from an image is an all-zero channel.
    z_context : neighbouring z-slices given on each side of the predicted slice, per
        stain (0: plain 2D input; 1: slices z-1, z, z+1, so the network sees whether an
        object grows or ends in z). A 2D image repeats its one slice.
    input_size_px : training tile size and inference tile size (pixels). Images are never
        resized by the model (torchvision's default 800 px resize is disabled).
    canonical_nucleus_diameter_px : nucleus diameter the model was trained at; inputs
        are rescaled to it.
    box_head_dim, mask_head_channels, mask_head_layers : sizes of the light RoI heads.
    semantic_channels : channels of the semantic head.
    detections_per_image, box_score_threshold, box_nms_threshold, rpn_post_nms_test :
        detector settings at inference.
    """

    backbone_depth: Literal[18, 34, 50] = 18
    backbone_stages: Literal[3, 4] = 3
    norm: Literal["group", "batch"] = "group"
    fpn_channels: int = 128
    anchor_sizes_px: tuple[int, ...] = (8, 16, 32, 64)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    input_channels: tuple[str, ...] = KNOWN_CHANNELS
    z_context: int = Field(default=0, ge=0, le=3)
    input_size_px: int = 256
    canonical_nucleus_diameter_px: float = CANONICAL_NUCLEUS_DIAMETER_PX
    box_head_dim: int = 256
    mask_head_channels: int = 128
    mask_head_layers: int = 2
    semantic_channels: int = 64
    detections_per_image: int = 150
    box_score_threshold: float = 0.05
    box_nms_threshold: float = 0.5
    rpn_post_nms_test: int = 300
    box_batch_size_per_image: int = 128

    @model_validator(mode="after")
    def _check(self) -> MaskRCNNConfig:
        if len(self.anchor_sizes_px) != self.backbone_stages + 1:
            raise ValueError(
                f"anchor_sizes_px needs {self.backbone_stages + 1} sizes (one per pyramid "
                f"level), got {len(self.anchor_sizes_px)}"
            )
        unknown = [c for c in self.input_channels if c not in KNOWN_CHANNELS]
        if (
            unknown
            or not self.input_channels
            or len(set(self.input_channels)) != len(self.input_channels)
        ):
            raise ValueError(f"input_channels must be distinct names from {KNOWN_CHANNELS}")
        if self.input_size_px % 32 or self.input_size_px < 64:
            raise ValueError("input_size_px must be a multiple of 32 and >= 64")
        return self

    @property
    def n_input_channels(self) -> int:
        """Channels of the network input: ``len(input_channels) * (2 * z_context + 1)``."""
        return len(self.input_channels) * (2 * self.z_context + 1)


class _NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's batching/padding without its resize: callers fix the scale."""

    def resize(self, image, target=None):  # type: ignore[override]
        return image, target


def _norm_layer(kind: str):
    if kind == "batch":
        return nn.BatchNorm2d
    return lambda c: nn.GroupNorm(min(16, c // 4), c)


def _resnet_fpn(config: MaskRCNNConfig) -> nn.Module:
    from torchvision.models import resnet18, resnet34, resnet50
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    make = {18: resnet18, 34: resnet34, 50: resnet50}[config.backbone_depth]
    body = make(weights=None, norm_layer=_norm_layer(config.norm))
    body.conv1 = nn.Conv2d(config.n_input_channels, 64, 7, stride=2, padding=3, bias=False)
    expansion = 4 if config.backbone_depth == 50 else 1
    stages = range(1, config.backbone_stages + 1)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in stages},
        in_channels_list=[64 * 2 ** (i - 1) * expansion for i in stages],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


class SemanticHead(nn.Module):
    """Panoptic-FPN semantic branch plus a full-resolution image branch.

    Every pyramid level (strides 4, 8, 16, ...) is brought to stride 4 by 3x3 conv +
    GroupNorm + ReLU + 2x upsampling steps and summed; the sum is upsampled to the input
    size, concatenated with two 3x3 convs of the image itself (sharp borders), and
    classified per pixel into :data:`SEMANTIC_CLASSES`.
    """

    def __init__(
        self, in_channels: int, n_levels: int, channels: int, image_channels: int, n_classes: int
    ) -> None:
        super().__init__()
        self.n_levels = n_levels
        branches = []
        for level in range(n_levels):
            steps: list[nn.Module] = []
            for k in range(max(1, level)):
                steps += [
                    nn.Conv2d(
                        in_channels if k == 0 else channels, channels, 3, padding=1, bias=False
                    ),
                    nn.GroupNorm(min(16, channels // 4), channels),
                    nn.ReLU(inplace=True),
                ]
                if level > 0:
                    steps.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            branches.append(nn.Sequential(*steps))
        self.branches = nn.ModuleList(branches)
        fine = 16
        self.image_branch = nn.Sequential(
            nn.Conv2d(image_channels, fine, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(fine, fine, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.reduce = nn.Conv2d(channels, fine, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * fine, fine, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(fine, n_classes, 1),
        )

    def forward(
        self, features: OrderedDict[str, torch.Tensor], image: torch.Tensor
    ) -> torch.Tensor:
        levels = list(features.values())[: self.n_levels]
        base = levels[0].shape[-2:]
        x = None
        for branch, feat in zip(self.branches, levels, strict=True):
            y = branch(feat)
            if y.shape[-2:] != base:
                y = F.interpolate(y, size=base, mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        assert x is not None
        x = F.interpolate(
            self.reduce(x), size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.fuse(torch.cat([x, self.image_branch(image)], dim=1))


def _out_channels(backbone: nn.Module) -> int:
    value = getattr(backbone, "out_channels", None)
    if not isinstance(value, int):
        raise ValueError("a backbone needs an integer attribute out_channels")
    return value


class CellMaskRCNN(MaskRCNN):
    """torchvision Mask R-CNN + :class:`SemanticHead`, one forward for both.

    Training returns the detector losses plus ``loss_semantic`` (cross-entropy, ignore
    index 255); eval returns per image the raw detections (masks as ``(N, 1, M, M)``
    probabilities in their boxes) and ``semantic`` logits ``(3, H, W)``.
    """

    def __init__(self, backbone: nn.Module, config: MaskRCNNConfig, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        n_ch = config.n_input_channels
        self.transform = _NoResizeTransform(
            min_size=config.input_size_px,
            max_size=config.input_size_px,
            image_mean=[0.0] * n_ch,
            image_std=[1.0] * n_ch,
        )
        self.config = config
        self.semantic_head = SemanticHead(
            _out_channels(backbone),
            n_levels=config.backbone_stages,
            channels=config.semantic_channels,
            image_channels=n_ch,
            n_classes=len(SEMANTIC_CLASSES),
        )
        self.semantic_loss_weight = 1.0

    def forward(self, images, targets=None):  # type: ignore[override]
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        images_t, targets_t = self.transform(images, targets)
        features = self.backbone(images_t.tensors)
        proposals, proposal_losses = self.rpn(images_t, features, targets_t)
        detections, detector_losses = self.roi_heads(
            features, proposals, images_t.image_sizes, targets_t
        )
        semantic = self.semantic_head(features, images_t.tensors)
        if self.training:
            assert targets_t is not None
            sem_t = torch.full(
                (semantic.shape[0], *semantic.shape[-2:]),
                IGNORE_INDEX,
                dtype=torch.int64,
                device=semantic.device,
            )
            for i, t in enumerate(targets_t):
                h, w = t["semantic"].shape[-2:]
                sem_t[i, :h, :w] = t["semantic"]
            loss_sem = F.cross_entropy(semantic, sem_t, ignore_index=IGNORE_INDEX)
            return {
                **proposal_losses,
                **detector_losses,
                "loss_semantic": self.semantic_loss_weight * loss_sem,
            }
        for i, (h, w) in enumerate(images_t.image_sizes):
            detections[i]["semantic"] = semantic[i, :, :h, :w]
        return detections


def build_model(
    config: MaskRCNNConfig | None = None, *, backbone: nn.Module | None = None
) -> CellMaskRCNN:
    """Build the (untrained) cell Mask R-CNN.

    Parameters
    ----------
    config : architecture; defaults to :class:`MaskRCNNConfig` ``()`` (ResNet-18 cut after
        layer3, 128-channel FPN, anchors 8-64 px, ~6M parameters).
    backbone : replaces the ResNet-FPN: a module mapping ``(B, C, H, W)`` to an ordered dict
        of ``backbone_stages + 1`` feature maps (strides 4, 8, ...) with attribute
        ``out_channels``.

    Returns
    -------
    CellMaskRCNN with two classes (background, cell).
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    cfg = config or MaskRCNNConfig()
    body = backbone if backbone is not None else _resnet_fpn(cfg)
    ch = _out_channels(body)
    levels = [str(i) for i in range(cfg.backbone_stages)]
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes_px),
        aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes_px),
    )
    return CellMaskRCNN(
        body,
        cfg,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(ch, len(cfg.aspect_ratios)),
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=600,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(ch * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, 2),
        box_score_thresh=cfg.box_score_threshold,
        box_nms_thresh=cfg.box_nms_threshold,
        box_detections_per_img=cfg.detections_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(ch, [cfg.mask_head_channels] * cfg.mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, 2),
    )


def expand_z_context(
    state: dict[str, torch.Tensor], source: MaskRCNNConfig, target: MaskRCNNConfig
) -> dict[str, torch.Tensor]:
    """Weights of a model with ``source.z_context`` for one with ``target.z_context``.

    The layers that read the input image (the first backbone conv and the semantic head's
    image branch) get the old weights on each stain's centre slice and zeros on the added
    neighbouring slices, so the new model starts out computing exactly what the old one
    did and learns to use the z-context while fine-tuning. Other weights are unchanged.
    """
    if source.input_channels != target.input_channels:
        raise ValueError("input_channels differ; cannot map the input layers")
    k_old, k_new = source.z_context, target.z_context
    n_stains = len(source.input_channels)
    out = dict(state)
    for key, w in state.items():
        if w.ndim != 4 or w.shape[1] != source.n_input_channels or k_old == k_new:
            continue
        if not key.endswith(("body.conv1.weight", "image_branch.0.weight")):
            continue
        new = w.new_zeros((w.shape[0], target.n_input_channels, *w.shape[2:]))
        for c in range(n_stains):
            for d in range(-min(k_old, k_new), min(k_old, k_new) + 1):
                new[:, c * (2 * k_new + 1) + k_new + d] = w[:, c * (2 * k_old + 1) + k_old + d]
        out[key] = new
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- model folders: config.json + weights.pt (+ model_card.md, metrics.json) ----------


def save_model_folder(
    model: CellMaskRCNN,
    folder: str | Path,
    *,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    model_card: str | None = None,
    files: dict[str, str] | None = None,
    half: bool = True,
) -> Path:
    """Write a model folder (the format shipped in ``model_registry/`` and stored in MLflow).

    ``config.json``: ``{"kind", "model": MaskRCNNConfig, "training": {...}}``;
    ``weights.pt``: the state_dict (float16 when ``half``, to ship small; loaded back as
    float32); ``metrics.json``, ``model_card.md`` and other text ``files`` (name: text)
    when given. Written atomically.
    """
    from cellrna_pipeline.core.io import atomic_dir

    folder = Path(folder)
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_dir(folder, replace=True) as tmp:
        config = {
            "kind": MODEL_KIND,
            "format_version": 1,
            "model": json.loads(model.config.model_dump_json()),
            "training": training or {},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        torch.save(state, tmp / "weights.pt")
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if model_card is not None:
            (tmp / "model_card.md").write_text(model_card)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return folder


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder; :class:`InputError` if absent or not a cell model."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder} is not a model folder (no config.json)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc.msg})") from None
    if config.get("kind") != MODEL_KIND:
        raise InputError(f"{folder} holds a {config.get('kind')!r} model, not {MODEL_KIND!r}")
    return config


def load_model_folder(folder: str | Path, *, device: torch.device | None = None) -> CellMaskRCNN:
    """Rebuild the model of a folder written by :func:`save_model_folder`, in eval mode."""
    config = read_model_config(folder)
    model = build_model(MaskRCNNConfig(**config["model"]))
    try:
        state = torch.load(Path(folder) / "weights.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{folder}: weights.pt is missing") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    if device is not None:
        model.to(device)
    return model
