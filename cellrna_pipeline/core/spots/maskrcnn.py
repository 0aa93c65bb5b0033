"""A tiny-object Mask R-CNN for RNA spots (torchvision), trained from scratch on the generator.

Model: a ResNet-18 cut after ``layer2`` (stride 8), a 64-channel FPN whose finest level has
stride 4, one square anchor per level of 4, 8 and 16 px, RoIAlign on the two finest levels,
light box and mask heads, GroupNorm (small batches), and torchvision's transform without
its resize (it would blow 256 px slices up to 800 px). Each slice is normalized to noise
sigmas and upsampled so that a spot's lateral sigma becomes ``upsample`` px (2 by default:
a diffraction-limited spot then spans about 8 px, the size of the finest anchors).

3-D by slicing: 2-D detections per z-slice, linked across neighbouring slices when their
centres are within 1.5 px, one spot per linked group (centre = score-weighted mean).

Public API: :class:`SpotMaskRCNNConfig` (the builder config, saved as ``config.json``),
:class:`SpotTrainConfig`, :func:`build_spot_model`, :func:`train_spot_model`,
:func:`load_spot_model`, :func:`save_spot_model`, :func:`detect_spots_maskrcnn`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from cellrna_pipeline.core.config import (
    StrictModel,
    read_model_folder_config,
    write_model_folder,
)
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import shipped_models_dir
from cellrna_pipeline.core.spots.config import DEFAULT_SPOT_RADIUS_NM, psf_sigma_vox
from cellrna_pipeline.core.spots.detect import DETECTION_SCHEMA, SpotDetection, as_zyx_array
from cellrna_pipeline.core.types import VoxelSize

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_MODEL_DIR",
    "MODEL_KIND",
    "SpotMaskRCNNConfig",
    "SpotModel",
    "SpotTrainConfig",
    "SpotTrainResult",
    "build_spot_model",
    "detect_spots_maskrcnn",
    "load_spot_model",
    "save_spot_model",
    "train_spot_model",
]

MODEL_KIND = "cellrna-rna-maskrcnn"
DEFAULT_MODEL_DIR = shipped_models_dir() / "rna-maskrcnn"
"""The shipped champion: ``$CELLRNA_MODEL_REGISTRY/rna-maskrcnn`` or the repository's."""
_NORM_SCALE = 10.0  # slices are (I - median) / (noise sigma * 10): a spot of SNR 10 -> ~1
_LINK_PX = 2.0  # detections in neighbouring slices closer than this are one spot
_SAME_SLICE_PX = 2.0  # ... and in one slice, the weaker of two this close is dropped


class SpotMaskRCNNConfig(StrictModel):
    """How the network is built (saved as the model folder's ``config.json``)."""

    kind: str = MODEL_KIND
    fpn_channels: int = 64
    anchor_sizes_px: tuple[int, int, int] = (4, 8, 16)
    trained_sigma_px: float = 1.0  # lateral spot sigma of the training data, in its pixels
    upsample: float = 2.0  # input scale factor applied after matching trained_sigma_px
    box_head_dim: int = 256
    mask_head_channels: int = 64
    detections_per_image: int = 500
    score_threshold: float = 0.5
    nms_threshold: float = 0.3


class SpotTrainConfig(StrictModel):
    """Training settings (``cellrna train spots`` passes ``seed`` and ``steps``)."""

    seed: int = 0
    steps: int = 900
    batch_size: int = 4
    crop_px: int = 96
    learning_rate: float = 5e-4
    train_volumes: int = 10
    volume_shape_zyx: tuple[int, int, int] = (32, 256, 256)
    snr_range: tuple[float, float] = (1.5, 15.0)
    spots_per_cell_range: tuple[float, float] = (5.0, 300.0)
    validation_snr: tuple[float, ...] = (3.0, 8.0)
    validation_crop_yx: int = 128
    score_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    out_dir: str | None = None
    model: SpotMaskRCNNConfig = SpotMaskRCNNConfig()


@dataclass
class SpotModel:
    """A loaded network with its builder config."""

    net: Any
    config: SpotMaskRCNNConfig
    device: Any = None


@dataclass
class SpotTrainResult:
    """What :func:`train_spot_model` returns; unpacks as ``(model, metrics)``."""

    model: SpotModel
    metrics: dict[str, float]
    folder: Path
    history: list[dict[str, float]] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.metrics))


# --------------------------------------------------------------------------- model


def build_spot_model(config: SpotMaskRCNNConfig | None = None) -> Any:
    """A torchvision ``MaskRCNN`` for spots (1 input channel, classes background/spot).

    Input: list of ``(1, H, W)`` float tensors (normalized slices, already upsampled).
    Output in eval mode: per image ``boxes (N, 4)`` xyxy px, ``scores (N,)``,
    ``masks (N, 1, H, W)`` probabilities.
    """
    from torch import nn
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    cfg = config or SpotMaskRCNNConfig()

    def gn(c: int) -> nn.Module:
        return nn.GroupNorm(min(8, c // 4), c)

    body = resnet18(weights=None, norm_layer=gn)
    body.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1"},
        in_channels_list=[64, 128],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(tuple((a,) for a in cfg.anchor_sizes_px), ((1.0,),) * 3)
    c = cfg.fpn_channels
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    model = MaskRCNN(
        backbone,
        num_classes=None,
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, 2),
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 49, cfg.box_head_dim),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [cfg.mask_head_channels] * 2, 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, 2),
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=2000,
        rpn_post_nms_top_n_test=1000,
        box_detections_per_img=cfg.detections_per_image,
        box_score_thresh=0.05,
        box_nms_thresh=cfg.nms_threshold,
        box_batch_size_per_image=256,
    )

    class _NoResize(GeneralizedRCNNTransform):
        def resize(self, image, target=None):  # type: ignore[override]
            return image, target

    model.transform = _NoResize(min_size=64, max_size=4096, image_mean=[0.0], image_std=[1.0])
    return model


def save_spot_model(
    model: SpotModel,
    folder: str | Path,
    *,
    metrics: dict[str, Any],
    training: dict[str, Any],
    card: str,
) -> Path:
    """Write ``config.json``, ``weights.pt`` (float16 state_dict), ``metrics.json``,
    ``model_card.md`` into ``folder`` (atomically: a temporary sibling renamed)."""
    state = {
        k: (v.half() if v.is_floating_point() else v) for k, v in model.net.state_dict().items()
    }
    return write_model_folder(
        folder, state, model.config, metrics=metrics, training=training, card=card
    )


def load_spot_model(model_dir: str | Path, *, device: Any = None) -> SpotModel:
    """Load a model folder (``config.json`` + ``weights.pt``) for inference (eval mode)."""
    import torch

    from cellrna_pipeline.core.device import select_device

    folder = Path(model_dir)
    config = read_model_folder_config(folder, SpotMaskRCNNConfig, MODEL_KIND, "spot Mask R-CNN")
    dev = device or select_device()
    net = build_spot_model(config)
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.to(dev).eval()
    return SpotModel(net=net, config=config, device=dev)


# --------------------------------------------------------------------------- data


def normalize_slice(img: np.ndarray) -> np.ndarray:
    """``(I - median) / (1.4826 MAD * 10)`` as float32 (a 2-D slice in noise units)."""
    a = np.asarray(img, dtype=np.float32)
    med = float(np.median(a))
    mad = float(np.median(np.abs(a - med))) * 1.4826
    return ((a - med) / (max(mad, 1e-6) * _NORM_SCALE)).astype(np.float32)


def _training_volumes(
    cfg: SpotTrainConfig, rng: np.random.Generator, n: int, seed0: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    from cellrna_pipeline.core.synth import SynthConfig, synthesize

    out = []
    for i in range(n):
        snr = float(np.exp(rng.uniform(*np.log(cfg.snr_range))))
        spc = float(np.exp(rng.uniform(*np.log(cfg.spots_per_cell_range))))
        acq = synthesize(
            SynthConfig(
                seed=seed0 + i,
                timepoints=1,
                shape_zyx=cfg.volume_shape_zyx,
                snr=snr,
                spots_per_cell=spc,
                cluster_probability=float(rng.uniform(0, 1)),
            )
        )
        assert acq.image is not None
        out.append((acq.image[0, 2], acq.spots[0, 0]))
    return out


def _sample_batch(
    volumes: list[tuple[np.ndarray, np.ndarray]], cfg: SpotTrainConfig, rng: np.random.Generator
) -> tuple[list[Any], list[dict[str, Any]]]:
    import torch
    import torch.nn.functional as F

    up = cfg.model.upsample
    images, targets = [], []
    for _ in range(cfg.batch_size):
        img, lab = volumes[int(rng.integers(len(volumes)))]
        # slices with spots are drawn 4x as often as empty ones
        has = (lab.reshape(lab.shape[0], -1) > 0).any(axis=1)
        w = np.where(has, 4.0, 1.0)
        z = int(rng.choice(len(w), p=w / w.sum()))
        c = cfg.crop_px
        y0 = int(rng.integers(0, img.shape[1] - c + 1))
        x0 = int(rng.integers(0, img.shape[2] - c + 1))
        im = normalize_slice(img[z])[y0 : y0 + c, x0 : x0 + c]
        lb = lab[z, y0 : y0 + c, x0 : x0 + c]
        k = int(rng.integers(4))
        im, lb = np.rot90(im, k), np.rot90(lb, k)
        if rng.random() < 0.5:
            im, lb = im[:, ::-1], lb[:, ::-1]
        im = im * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        if rng.random() < 0.3:
            im = im + rng.normal(0, rng.uniform(0.02, 0.08), im.shape).astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32))[None, None]
        t = F.interpolate(t, scale_factor=up, mode="bilinear", align_corners=False)[0]
        ids = np.unique(lb)
        ids = ids[ids > 0]
        masks = np.stack([lb == i for i in ids]) if len(ids) else np.zeros((0, c, c), bool)
        mt = torch.from_numpy(masks.astype(np.uint8))
        if len(ids):
            mt = F.interpolate(mt[None].float(), scale_factor=up, mode="nearest")[0].to(torch.uint8)
        else:
            mt = torch.zeros((0, t.shape[1], t.shape[2]), dtype=torch.uint8)
        boxes = []
        for m in mt:
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append(
                [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            )
        images.append(t)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.ones(len(boxes), dtype=torch.int64),
                "masks": mt,
            }
        )
    return images, targets


# --------------------------------------------------------------------------- inference


def detect_spots_maskrcnn(
    image: Any,
    *,
    model: SpotModel,
    voxel_size: VoxelSize,
    spot_radius_nm: tuple[float, float, float] | None = None,
    score_threshold: float | None = None,
    batch_slices: int = 4,
    progress: Callable[[str], None] | None = None,
) -> SpotDetection:
    """Spots of a ``(z, y, x)`` or ``(y, x)`` image with the Mask R-CNN, per slice then
    linked across z. Returns the same table as the classical detector (``intensity`` =
    value above the slice median at the spot's voxel; ``score`` = the best slice score;
    ``size_voxels`` = mask pixels summed over its slices)."""
    import torch
    import torch.nn.functional as F

    vol, is_2d = as_zyx_array(image)
    shape = tuple(int(s) for s in vol.shape)
    radius = spot_radius_nm or DEFAULT_SPOT_RADIUS_NM
    sigma = psf_sigma_vox(voxel_size, radius, is_2d=is_2d or shape[0] == 1)
    cfg = model.config
    thr = cfg.score_threshold if score_threshold is None else score_threshold
    scale_y = cfg.upsample * cfg.trained_sigma_px / sigma[1]
    scale_x = cfg.upsample * cfg.trained_sigma_px / sigma[2]
    dets: list[tuple[int, float, float, float, int, float]] = []  # z, y, x, score, size, value
    with torch.no_grad():
        for z0 in range(0, shape[0], batch_slices):
            zs = range(z0, min(z0 + batch_slices, shape[0]))
            slices = [np.asarray(vol[z], dtype=np.float32) for z in zs]
            if any(not np.isfinite(s).all() for s in slices):
                raise InputError("image contains NaN or inf values")
            batch = []
            for s in slices:
                t = torch.from_numpy(normalize_slice(s))[None, None]
                t = F.interpolate(
                    t, scale_factor=(scale_y, scale_x), mode="bilinear", align_corners=False
                )
                batch.append(t[0].to(model.device))
            outs = model.net(batch)
            for z, s, out in zip(zs, slices, outs, strict=True):
                keep = out["scores"] >= thr
                if not bool(keep.any()):
                    continue
                masks = out["masks"][keep, 0].cpu().numpy()
                scores = out["scores"][keep].cpu().numpy()
                med = float(np.median(s))
                ys = np.arange(masks.shape[1], dtype=np.float64)[:, None]
                xs = np.arange(masks.shape[2], dtype=np.float64)[None, :]
                kept: list[tuple[float, float]] = []
                for m, sc in zip(masks, scores, strict=True):  # scores come sorted, best first
                    w = np.where(m >= 0.5, m, 0.0)
                    tot = float(w.sum())
                    if tot <= 0:
                        continue
                    # pixel centres: input pixel i covers [i, i+1) / scale in the slice
                    yc = ((w * ys).sum() / tot + 0.5) / scale_y - 0.5
                    xc = ((w * xs).sum() / tot + 0.5) / scale_x - 0.5
                    if any((yc - ky) ** 2 + (xc - kx) ** 2 < _SAME_SLICE_PX**2 for ky, kx in kept):
                        continue
                    kept.append((yc, xc))
                    yi = int(np.clip(round(yc), 0, shape[1] - 1))
                    xi = int(np.clip(round(xc), 0, shape[2] - 1))
                    size = max(1, round(float((m >= 0.5).sum()) / (scale_y * scale_x)))
                    dets.append((z, yc, xc, float(sc), size, float(s[yi, xi]) - med))
            if progress and z0 % 16 == 0:
                progress(f"Mask R-CNN slices {z0}-{zs[-1]}: {len(dets)} detections")
    table = _link_across_z(dets, is_2d=is_2d or shape[0] == 1)
    return SpotDetection(table, float("nan"), float("nan"), float("nan"), 0, sigma)


def _link_across_z(
    dets: list[tuple[int, float, float, float, int, float]], *, is_2d: bool
) -> pl.DataFrame:
    if not dets:
        return pl.DataFrame(schema=DETECTION_SCHEMA)
    arr = np.asarray(dets, dtype=np.float64)
    order = np.argsort(-arr[:, 3], kind="stable")
    group = -np.ones(len(arr), dtype=np.int64)
    groups: list[list[int]] = []
    from scipy.spatial import cKDTree

    by_z: dict[int, tuple[np.ndarray, Any]] = {}
    for z in np.unique(arr[:, 0]).astype(int):
        idx = np.flatnonzero(arr[:, 0] == z)
        by_z[z] = (idx, cKDTree(arr[idx, 1:3]))
    for i in order:
        if group[i] >= 0:
            continue
        g = [int(i)]
        group[i] = len(groups)
        # grow up and down the stack from the strongest detection, one slice at a time
        for step in (1, -1):
            cur = int(i)
            while True:
                z = int(arr[cur, 0]) + step
                if z not in by_z or is_2d:
                    break
                idx, tree = by_z[z]
                cand = [int(idx[j]) for j in tree.query_ball_point(arr[cur, 1:3], _LINK_PX)]
                cand = [c for c in cand if group[c] < 0]
                if not cand:
                    break
                best = max(cand, key=lambda c: arr[c, 3])
                group[best] = len(groups)
                g.append(best)
                cur = best
        groups.append(g)
    rows = []
    for g in groups:
        a = arr[g]
        w = a[:, 3]
        rows.append(
            (
                float((w * a[:, 0]).sum() / w.sum()),
                float((w * a[:, 1]).sum() / w.sum()),
                float((w * a[:, 2]).sum() / w.sum()),
                float(a[np.argmax(a[:, 3]), 5]),
                float(a[:, 3].max()),
                int(a[:, 4].sum()),
            )
        )
    rows.sort()
    r = np.asarray(rows)
    return pl.DataFrame(
        {
            "spot_id": np.arange(1, len(r) + 1, dtype=np.uint32),
            "z": r[:, 0],
            "y": r[:, 1],
            "x": r[:, 2],
            "intensity": r[:, 3],
            "score": r[:, 4],
            "size_voxels": r[:, 5].astype(np.uint32),
        },
        schema=DETECTION_SCHEMA,
    )


# --------------------------------------------------------------------------- training


def _validate(model: SpotModel, cfg: SpotTrainConfig) -> dict[str, float]:
    """F1 on held-out stacks; sets ``model.config.score_threshold`` to the best of
    ``score_thresholds`` (mean F1 over the validation SNRs)."""
    from cellrna_pipeline.core.spots.metrics import match_spots
    from cellrna_pipeline.core.synth import SynthConfig, synthesize

    runs = []
    for j, snr in enumerate(cfg.validation_snr):
        acq = synthesize(
            SynthConfig(
                seed=cfg.seed + 50_000 + j, timepoints=1, snr=snr, shape_zyx=cfg.volume_shape_zyx
            )
        )
        assert acq.image is not None
        c = min(cfg.validation_crop_yx, acq.image.shape[-1], acq.image.shape[-2])
        res = detect_spots_maskrcnn(
            acq.image[0, 2][:, :c, :c],
            model=model,
            voxel_size=acq.voxel_size,
            score_threshold=min(cfg.score_thresholds),
        )
        tab = acq.spot_table
        # true spots whose centre rounds into the crop
        inside = (tab["y"] < c - 0.5) & (tab["x"] < c - 0.5)
        true = tab.filter(inside).select(["z", "y", "x"]).to_numpy()
        runs.append((snr, res.table, true))
    best: tuple[float, float] = (-1.0, cfg.model.score_threshold)
    for thr in cfg.score_thresholds:
        f1 = [
            match_spots(t.filter(t["score"] >= thr).select(["z", "y", "x"]).to_numpy(), true).f1
            for _, t, true in runs
        ]
        best = max(best, (float(np.mean(f1)), thr))
    thr = best[1]
    model.config = model.config.model_copy(update={"score_threshold": thr})
    metrics: dict[str, float] = {"score_threshold": thr}
    f1s = []
    for snr, t, true in runs:
        m = match_spots(t.filter(t["score"] >= thr).select(["z", "y", "x"]).to_numpy(), true)
        key = f"snr{snr:g}"
        metrics[f"precision_{key}"] = round(m.precision, 4)
        metrics[f"recall_{key}"] = round(m.recall, 4)
        metrics[f"f1_{key}"] = round(m.f1, 4)
        f1s.append(m.f1)
    metrics["f1_mean"] = round(float(np.mean(f1s)), 4)
    return metrics


def train_spot_model(
    config: SpotTrainConfig | dict[str, Any] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> SpotTrainResult:
    """Train the spot Mask R-CNN from scratch on generator volumes and save a model folder.

    Data: ``train_volumes`` synthetic 32 x 256 x 256 stacks (SNR log-uniform in
    ``snr_range``, spots per cell log-uniform in ``spots_per_cell_range``, cluster
    probability uniform 0-1); batches of random ``crop_px`` crops of slices (rotations,
    flips, contrast x0.8-1.25, extra noise). AdamW with warm-up and cosine decay.
    Validation: F1 (3 px) on held-out stacks at ``validation_snr``.

    Returns
    -------
    SpotTrainResult (unpacks as ``(model, metrics)``; ``.folder`` is the saved model
    folder: ``out_dir`` or a new temporary folder).
    """
    import torch

    from cellrna_pipeline.core.device import select_device

    cfg = config if isinstance(config, SpotTrainConfig) else SpotTrainConfig(**(config or {}))
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.crop_px < 32 or cfg.train_volumes < 1:
        raise InputError("steps, batch_size and train_volumes must be >= 1, crop_px >= 32")
    if min(cfg.volume_shape_zyx[1:]) < cfg.crop_px:
        raise InputError(
            f"volume_shape_zyx {list(cfg.volume_shape_zyx)} is smaller than crop_px {cfg.crop_px}"
        )
    say = progress or (lambda _msg: None)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = select_device()
    start = time.perf_counter()
    say(f"synthesizing {cfg.train_volumes} training stacks")
    volumes = _training_volumes(cfg, rng, cfg.train_volumes, seed0=cfg.seed * 1000 + 1)
    net = build_spot_model(cfg.model).to(dev)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    warmup = min(50, cfg.steps // 10 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict[str, float]] = []
    for step in range(1, cfg.steps + 1):
        images, targets = _sample_batch(volumes, cfg, rng)
        images = [i.to(dev) for i in images]
        targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
        losses = net(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            rec = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
            history.append(rec)
            say(
                f"step {step}/{cfg.steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)"
            )
    net.eval()
    model = SpotModel(net=net, config=cfg.model, device=dev)
    say("validating on held-out stacks (and choosing the score threshold)")
    metrics = _validate(model, cfg)
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in net.parameters())
    folder = (
        Path(cfg.out_dir)
        if cfg.out_dir
        else Path(tempfile.mkdtemp(prefix="cellrna-rna-maskrcnn-")) / "rna-maskrcnn"
    )
    training = {
        **cfg.model_dump(),
        "seconds": round(seconds, 1),
        "parameters": n_params,
        "device": str(dev),
    }
    card = _model_card(cfg, metrics, seconds, n_params, str(dev))
    save_spot_model(model, folder, metrics=metrics, training=training, card=card)
    say(f"saved {folder} (F1 mean {metrics['f1_mean']:.3f}, {seconds / 60:.1f} min)")
    return SpotTrainResult(model=model, metrics=metrics, folder=folder, history=history)


def _model_card(
    cfg: SpotTrainConfig, metrics: dict[str, float], seconds: float, n_params: int, device: str
) -> str:
    lines = [
        "# cellrna-rna-maskrcnn: tiny-object Mask R-CNN for RNA spots",
        "",
        "Built by `cellrna_pipeline.core.spots.maskrcnn.build_spot_model(config.json)`; "
        "weights are a float16 `state_dict` (`weights.pt`).",
        "",
        "## Data",
        f"- {cfg.train_volumes} synthetic 32 x 256 x 256 stacks from `core/synth` (voxel 600 x 150 x 150 nm, "
        f"PSF sigma 350/150/150 nm), SNR log-uniform in {list(cfg.snr_range)}, spots per cell log-uniform "
        f"in {list(cfg.spots_per_cell_range)}, cluster probability uniform 0-1; generator seeds "
        f"{cfg.seed * 1000 + 1}..{cfg.seed * 1000 + cfg.train_volumes}.",
        f"- Batches of {cfg.batch_size} random {cfg.crop_px} px slice crops, upsampled x{cfg.model.upsample:g}; "
        "augmentation: 90-degree rotations, flips, contrast x0.8-1.25, extra Gaussian noise (30 %).",
        "- Targets: the generator's spot labels in each slice (one instance per spot and slice).",
        "",
        "## Training",
        f"- seed {cfg.seed}, {cfg.steps} steps, AdamW lr {cfg.learning_rate:g} (warm-up, cosine), "
        f"{n_params / 1e6:.2f} M parameters, {seconds / 60:.1f} min on {device}.",
        f"- Reproduce: `cellrna train spots --steps {cfg.steps} --seed {cfg.seed}`.",
        "",
        f"## Metrics (held-out generator stacks, seeds {cfg.seed + 50000}+, first {cfg.validation_crop_yx} x "
        f"{cfg.validation_crop_yx} px of each; F1 by one-to-one matching within 3 px; the score threshold "
        "is the best of a grid on these stacks)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in metrics.items()],
        "",
        "Compared with the classical detector in `docs/benchmarks/spots.md`.",
        "",
    ]
    return "\n".join(lines)
