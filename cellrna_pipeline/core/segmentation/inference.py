"""3D cell segmentation by slicing: 2D instance inference per z-slice, tiled with overlap,
instances joined across z, semantic map by argmax.

The 2D predictor is any function ``predict(images) -> list[SlicePrediction]`` on
``(C, H, W)`` float32 images at the model's scale; :func:`maskrcnn_predictor` wraps the
cell Mask R-CNN. Around it:

- **Scale.** Slices are rescaled laterally so that nuclei have the model's canonical
  diameter (from a hint or :func:`~cellrna_pipeline.core.segmentation.base.estimate_diameter_px`);
  masks are pasted back at the input resolution from their box probabilities (no
  blocky nearest-neighbour upsampling).
- **Tiles without seams.** A slice larger than a tile is cut into overlapping tiles; an
  instance is kept only from the tile whose core (the tile minus half the overlap on
  inner sides; cores partition the slice) holds its box centre, so an object no wider
  than the overlap is always predicted whole, once. Semantic logits are taken from cores.
- **Overlaps in a slice** are resolved by score (Panoptic-FPN merging): an instance
  whose unclaimed part is under ``overlap_fraction`` of its mask is dropped, and each
  kept instance keeps its largest connected piece.
- **Across z**, instances of neighbouring slices are matched one-to-one by the Hungarian
  algorithm on IoU (accepted when IoU >= ``min_iou`` or the smaller one lies mostly in
  the other). Chains never jump over a slice, so an empty slice simply ends them, and a
  final pass splits any id into its 6-connected pieces: one id never covers two
  disconnected objects. The anisotropy (z step / lateral pixel) sets the minimum 3D
  object size in voxels from a physical fraction of a nucleus volume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.config import StrictModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.segmentation.base import (
    CELL_TO_NUCLEUS_DIAMETER,
    SEMANTIC_NUCLEUS,
    CellSegmentation,
    assemble,
    normalize_percentile,
    split_disconnected,
    z_context_stack,
)

if TYPE_CHECKING:
    import torch

    from cellrna_pipeline.core.segmentation.model import CellMaskRCNN


@dataclass
class Instance2D:
    """One 2D instance: score, box origin (pixels) and mask probabilities in the box."""

    score: float
    y0: int
    x0: int
    prob: np.ndarray  # (h, w) float32 in [0, 1]


@dataclass
class SlicePrediction:
    """Predicted instances of one 2D image and, optionally, semantic logits ``(K, H, W)``."""

    instances: list[Instance2D] = field(default_factory=list)
    semantic_logits: np.ndarray | None = None


Predictor = Callable[[Sequence[np.ndarray]], list[SlicePrediction]]


class InferenceConfig(StrictModel):
    """Settings of :func:`segment_volume` (sizes at the model's canonical scale).

    Attributes
    ----------
    tile_px, overlap_px : tile size and overlap; objects up to ``overlap_px`` wide are
        never cut by a tile border.
    batch_size : slices/tiles per forward pass.
    score_threshold : minimum detection score.
    mask_threshold : mask probability threshold.
    overlap_fraction : drop an instance whose unclaimed part is less than this fraction of
        its mask (duplicates).
    min_area_fraction : drop 2D pieces under this fraction of a nucleus disk.
    min_volume_fraction : drop 3D objects under this fraction of a nucleus sphere.
    min_iou, min_containment : z-linking acceptance (IoU, or intersection / smaller area).
    empty_slice_margin : slices without foreground (Otsu of the volume) are not predicted,
        except this many next to foreground slices.
    refine_with_semantic, refine_reach_fraction : snap instances to the semantic
        foreground, growing at most this fraction of the nucleus diameter.
    merge_fragments : merge 3D cells without a nucleus into their largest neighbour (both
        stains given).
    assembly : how 2D instances become 3D objects: ``"link"`` (Hungarian linking of
        neighbouring slices, then the area-dip split and the fragment merge below) or
        ``"watershed"`` (:func:`watershed_slices`, more robust to noisy 2D instances);
        ``"auto"``: watershed for nucleus-only volumes, linking otherwise.
    seed_depth_fraction : seed depth of the watershed assembly (fraction of a diameter).
    split_area_ratio : cut a 3D object where its area per slice dips under this fraction
        of the peaks on both sides (two objects stacked in z; 0 disables).
    fragment_fraction : merge 3D objects under this fraction of the typical object volume
        into the object they touch most in z (cut-off tips; 0 disables).
    end_slice_fraction : trim end slices of a 3D object dimmer than this fraction of its
        median slice (0 disables).
    min_contrast, contrast_radius_fraction : drop objects whose mean normalized stain
        (the cell stain, else the nucleus stain; 0-1 between the volume's 1st and 99.8th
        percentiles) is less than ``min_contrast`` above that of the background around
        them, within ``contrast_radius_fraction`` of a diameter (:func:`object_contrast`):
        out-of-focus light and background texture, which a 2D model sees as dim nuclei
        (0 disables). 0.1 is the 1st percentile of true nuclei on the generator's
        development volumes, and the best value there (``docs/benchmarks/cells.md``).
    nucleus_snap_px : with both stains, move each nucleus border to the nucleus stain's
        half-way level between that nucleus and its cytoplasm, within this many pixels of
        the semantic head's border (:func:`snap_nuclei_to_stain`; the head works at a
        quarter of the model scale and paints nuclei about 8 % too wide; 0 disables).
    max_scaled_px : refuse (InputError) when rescaling to the model scale would make a
        slice larger than this (a wrong size estimate).
    """

    tile_px: int = 256
    overlap_px: int = 96
    batch_size: int = 4
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_fraction: float = 0.5
    min_area_fraction: float = 0.05
    min_volume_fraction: float = 0.05
    min_iou: float = 0.3
    min_containment: float = 0.7
    empty_slice_margin: int = 1
    refine_with_semantic: bool = True
    refine_reach_fraction: float = 0.5
    merge_fragments: bool = True
    assembly: Literal["auto", "link", "watershed"] = "auto"
    seed_depth_fraction: float = 0.05
    split_area_ratio: float = 0.6
    fragment_fraction: float = 0.1
    end_slice_fraction: float = 0.6
    min_contrast: float = 0.1
    contrast_radius_fraction: float = 0.25
    nucleus_snap_px: float = 2.0
    max_scaled_px: int = 4096


# --- tiling -----------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _core_bounds(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Cores partition ``[0, size)``: borders at the middle of each overlap."""
    ends = [min(s + tile, size) for s in starts]
    cuts = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(len(starts) - 1)] + [size]
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def predict_tiled(
    images: Sequence[np.ndarray],
    predict: Predictor,
    *,
    tile_px: int = 256,
    overlap_px: int = 96,
    batch_size: int = 4,
) -> list[SlicePrediction]:
    """Run ``predict`` on overlapping tiles of each image and merge without seams.

    Parameters
    ----------
    images : ``(C, H, W)`` float32 images (any sizes).
    predict : the 2D predictor (on tiles of at most ``tile_px``).
    tile_px, overlap_px : tile size and overlap (pixels).
    batch_size : tiles per call of ``predict``.

    Returns
    -------
    One :class:`SlicePrediction` per image, in image coordinates.
    """
    if overlap_px >= tile_px:
        raise ValueError("overlap_px must be smaller than tile_px")
    jobs: list[tuple[int, int, int, tuple[int, int], tuple[int, int]]] = []
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        ys, xs = _tile_starts(h, tile_px, overlap_px), _tile_starts(w, tile_px, overlap_px)
        ycore, xcore = _core_bounds(ys, tile_px, h), _core_bounds(xs, tile_px, w)
        for y0, yc in zip(ys, ycore, strict=True):
            for x0, xc in zip(xs, xcore, strict=True):
                jobs.append((i, y0, x0, yc, xc))
    out = [SlicePrediction() for _ in images]
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        tiles = [images[i][:, y0 : y0 + tile_px, x0 : x0 + tile_px] for i, y0, x0, _, _ in chunk]
        for (i, y0, x0, yc, xc), pred in zip(chunk, predict(tiles), strict=True):
            target = out[i]
            for inst in pred.instances:
                cy = y0 + inst.y0 + inst.prob.shape[0] / 2.0
                cx = x0 + inst.x0 + inst.prob.shape[1] / 2.0
                if yc[0] <= cy < yc[1] and xc[0] <= cx < xc[1]:
                    target.instances.append(
                        Instance2D(inst.score, y0 + inst.y0, x0 + inst.x0, inst.prob)
                    )
            if pred.semantic_logits is not None:
                if target.semantic_logits is None:
                    h, w = images[i].shape[-2:]
                    target.semantic_logits = np.zeros(
                        (pred.semantic_logits.shape[0], h, w), np.float32
                    )
                target.semantic_logits[:, yc[0] : yc[1], xc[0] : xc[1]] = pred.semantic_logits[
                    :, yc[0] - y0 : yc[1] - y0, xc[0] - x0 : xc[1] - x0
                ]
    return out


# --- one slice: instances -> label image ------------------------------------------------


def paste_instances(
    instances: Sequence[Instance2D],
    shape: tuple[int, int],
    *,
    scale: float = 1.0,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_fraction: float = 0.5,
    min_area: int = 1,
) -> np.ndarray:
    """Paint instances into one label image, highest score first.

    Parameters
    ----------
    instances : in coordinates at the model scale.
    shape : output ``(H, W)`` at the input resolution.
    scale : model pixels per output pixel (instances are mapped by ``1 / scale``; their
        probabilities are resampled bilinearly).
    score_threshold, mask_threshold, overlap_fraction, min_area : see
        :class:`InferenceConfig` (``min_area`` in output pixels).

    Returns
    -------
    ``(H, W)`` int32 labels 1..n in order of decreasing score.
    """
    from skimage.transform import resize

    labels = np.zeros(shape, dtype=np.int32)
    k = 0
    for inst in sorted(instances, key=lambda i: -i.score):
        if inst.score < score_threshold:
            break
        ph, pw = inst.prob.shape
        y0, x0 = inst.y0 / scale, inst.x0 / scale
        y1, x1 = (inst.y0 + ph) / scale, (inst.x0 + pw) / scale
        Y0, X0 = max(0, math.floor(y0)), max(0, math.floor(x0))
        Y1, X1 = min(shape[0], math.ceil(y1)), min(shape[1], math.ceil(x1))
        if Y1 <= Y0 or X1 <= X0:
            continue
        if scale == 1.0:
            prob = inst.prob[Y0 - inst.y0 : Y1 - inst.y0, X0 - inst.x0 : X1 - inst.x0]
        else:
            full = resize(inst.prob, (max(1, round(y1 - y0)), max(1, round(x1 - x0))), order=1)
            oy, ox = Y0 - math.floor(y0), X0 - math.floor(x0)
            prob = np.zeros((Y1 - Y0, X1 - X0), np.float32)
            part = full[oy : oy + Y1 - Y0, ox : ox + X1 - X0]
            prob[: part.shape[0], : part.shape[1]] = part
        mask = prob >= mask_threshold
        area = int(mask.sum())
        if area < min_area:
            continue
        region = labels[Y0:Y1, X0:X1]
        free = mask & (region == 0)
        if free.sum() < overlap_fraction * area:
            continue
        pieces, n = ndi.label(free)
        if n > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            free = pieces == int(sizes.argmax())
        if free.sum() < min_area:
            continue
        k += 1
        region[free] = k
    return labels


# --- across z ---------------------------------------------------------------------------


def stitch_slices(
    labels_zyx: np.ndarray, *, min_iou: float = 0.3, min_containment: float = 0.7
) -> np.ndarray:
    """Join per-slice 2D labels into 3D objects.

    Parameters
    ----------
    labels_zyx : ``(z, y, x)`` integer labels, ids independent per slice (0 background).
    min_iou, min_containment : a Hungarian match (maximising IoU) between slices ``z`` and
        ``z + 1`` links the two objects when their IoU is at least ``min_iou`` or the
        intersection covers at least ``min_containment`` of the smaller one.

    Returns
    -------
    ``(z, y, x)`` uint32 3D ids 1..n; each id is one 6-connected object (no link skips a
    slice, and a final pass splits any disconnected id).
    """
    from scipy.optimize import linear_sum_assignment

    from cellrna_pipeline.core.segmentation.metrics import iou_matrix

    n_z = labels_zyx.shape[0]
    out = np.zeros(labels_zyx.shape, dtype=np.uint32)
    next_id = 1
    prev_map: dict[int, int] = {}  # 2D id in slice z-1 -> 3D id
    for z in range(n_z):
        cur = labels_zyx[z]
        ids = np.unique(cur)
        ids = ids[ids != 0]
        mapping: dict[int, int] = {}
        if len(ids) and prev_map:
            iou, a_ids, b_ids = iou_matrix(labels_zyx[z - 1], cur)
            if iou.size:
                rows, cols = linear_sum_assignment(-iou)
                a_area = np.array([np.count_nonzero(labels_zyx[z - 1] == a) for a in a_ids])
                b_area = np.array([np.count_nonzero(cur == b) for b in b_ids])
                for r, c in zip(rows, cols, strict=True):
                    if iou[r, c] <= 0:
                        continue
                    inter = iou[r, c] * (a_area[r] + b_area[c]) / (1 + iou[r, c])
                    contained = inter / max(1, min(a_area[r], b_area[c]))
                    if iou[r, c] >= min_iou or contained >= min_containment:
                        prev = prev_map.get(int(a_ids[r]))
                        if prev is not None:
                            mapping[int(b_ids[c])] = prev
        for b in ids:
            if int(b) not in mapping:
                mapping[int(b)] = next_id
                next_id += 1
        if len(ids):
            lut = np.zeros(int(ids.max()) + 1, dtype=np.uint32)
            for b, v in mapping.items():
                lut[b] = v
            out[z] = lut[cur]
        prev_map = mapping
    return split_disconnected(out)


# --- the Mask R-CNN predictor -----------------------------------------------------------


def maskrcnn_predictor(
    model: CellMaskRCNN, *, device: torch.device | None = None, min_score: float = 0.0
) -> Predictor:
    """Wrap the cell Mask R-CNN as a :data:`Predictor` (eval mode, ``torch.no_grad``).

    Box masks ``(M, M)`` are pasted into their (1-pixel expanded) boxes at model scale;
    detections scoring under ``min_score`` are dropped first (they cost the pasting).
    """
    import torch
    import torch.nn.functional as F

    from cellrna_pipeline.core.device import select_device

    dev = device or select_device()
    model.eval().to(dev)
    # Detections under min_score would be dropped anyway: not running the mask head on
    # them is most of the inference time.
    model.roi_heads.score_thresh = max(model.config.box_score_threshold, min_score)

    def predict(images: Sequence[np.ndarray]) -> list[SlicePrediction]:
        batch = [
            torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)).to(dev) for im in images
        ]
        with torch.no_grad():
            outputs = model(batch)
        preds = []
        for im, out in zip(images, outputs, strict=True):
            h, w = im.shape[-2:]
            insts = []
            boxes = out["boxes"].cpu().numpy()
            scores = out["scores"].cpu().numpy()
            masks = out["masks"][:, 0]
            m = masks.shape[-1]
            for box, score, mask in zip(boxes, scores, masks, strict=True):
                if score < min_score:
                    continue
                # As torchvision's paste: the M x M grid spans the box expanded by M+2 / M.
                x0, y0, x1, y1 = box
                pad = (x1 - x0) / m, (y1 - y0) / m
                x0, x1 = x0 - pad[0], x1 + pad[0]
                y0, y1 = y0 - pad[1], y1 + pad[1]
                X0, Y0 = max(0, math.floor(x0)), max(0, math.floor(y0))
                X1, Y1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
                if X1 <= X0 or Y1 <= Y0:
                    continue
                padded = F.pad(mask[None, None], (1, 1, 1, 1))
                # sample the padded grid at pixel centres of [Y0, Y1) x [X0, X1)
                ys = (torch.arange(Y0, Y1, device=dev) + 0.5 - y0) / (y1 - y0) * 2 - 1
                xs = (torch.arange(X0, X1, device=dev) + 0.5 - x0) / (x1 - x0) * 2 - 1
                gy, gx = torch.meshgrid(ys, xs, indexing="ij")
                grid = torch.stack([gx, gy], dim=-1)[None].float()
                prob = F.grid_sample(padded, grid, mode="bilinear", align_corners=False)[0, 0]
                insts.append(
                    Instance2D(float(score), Y0, X0, prob.cpu().numpy().astype(np.float32))
                )
            sem = out["semantic"].cpu().numpy().astype(np.float32)
            preds.append(SlicePrediction(insts, sem))
        return preds

    return predict


# --- the volume -------------------------------------------------------------------------


def _rescale_slices(volume_czyx: np.ndarray, scale: float) -> np.ndarray:
    """Lateral rescale of every slice by ``scale`` (bilinear, antialiased when shrinking)."""
    if abs(scale - 1.0) < 1e-3:
        return volume_czyx
    import torch
    import torch.nn.functional as F

    h, w = volume_czyx.shape[-2:]
    size = (max(8, round(h * scale)), max(8, round(w * scale)))
    t = torch.from_numpy(np.ascontiguousarray(volume_czyx.transpose(1, 0, 2, 3)))
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    return out.numpy().transpose(1, 0, 2, 3)


def model_scale(diameter_px: float, *, canonical_px: float, nucleus_given: bool) -> float:
    """Model pixels per input pixel so that nuclei get ``canonical_px`` (the diameter
    measures cells when only a cell stain is given)."""
    nucleus_d = diameter_px if nucleus_given else diameter_px / CELL_TO_NUCLEUS_DIAMETER
    return float(canonical_px / nucleus_d)


def segment_volume(
    nucleus: np.ndarray | None,
    cytoplasm: np.ndarray | None,
    predict: Predictor,
    *,
    diameter_px: float,
    anisotropy: float = 1.0,
    canonical_px: float,
    channels: Sequence[str] = ("nucleus", "cytoplasm"),
    z_context: int = 0,
    config: InferenceConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> CellSegmentation:
    """Segment a ``(z, y, x)`` volume (or a 2D image as one slice) with a 2D predictor.

    Parameters
    ----------
    nucleus, cytoplasm : ``(z, y, x)`` float32 stains (either may be ``None``), validated.
    predict : the 2D predictor (e.g. :func:`maskrcnn_predictor`).
    diameter_px : lateral nucleus diameter in input pixels (cell diameter when there is no
        nucleus stain).
    anisotropy : z step / lateral pixel size (1 when unknown).
    canonical_px : nucleus diameter the predictor was trained at.
    channels : input channel order of the predictor.
    z_context : neighbouring slices per side the predictor takes with each slice (per
        channel; the volume's end slices are repeated beyond its ends).
    config : :class:`InferenceConfig`.

    Returns
    -------
    CellSegmentation at the input resolution; without a cell stain each cell is its
    nucleus (the model then segments nuclei as the instances).
    """
    cfg = config or InferenceConfig()
    start = time.perf_counter()
    ref = nucleus if nucleus is not None else cytoplasm
    if ref is None:
        raise ValueError("segment_volume needs a nucleus or a cell stain")
    n_z, h, w = ref.shape
    stains = {"nucleus": nucleus, "cytoplasm": cytoplasm}
    norm = np.stack(
        [
            np.zeros(ref.shape, np.float32) if (s := stains[c]) is None else normalize_percentile(s)
            for c in channels
        ]
    )
    scale = model_scale(diameter_px, canonical_px=canonical_px, nucleus_given=nucleus is not None)
    if max(h, w) * scale > cfg.max_scaled_px:
        raise InputError(
            f"object diameter {diameter_px:.1f} px would upscale the image {scale:.1f}x to "
            f"{round(max(h, w) * scale)} px; the size estimate looks wrong: give a diameter hint"
        )
    scaled = _rescale_slices(norm, scale)
    todo = _slices_with_signal(norm, margin=cfg.empty_slice_margin) if n_z > 1 else [0]
    nucleus_area = math.pi * (diameter_px if nucleus is not None else diameter_px / 2) ** 2 / 4
    min_area = max(1, int(cfg.min_area_fraction * nucleus_area))
    labels2d = np.zeros((n_z, h, w), dtype=np.int32)
    nucleus_mask = np.zeros((n_z, h, w), dtype=bool)
    step = max(1, cfg.batch_size)
    for b in range(0, len(todo), step):
        zs = todo[b : b + step]
        preds = predict_tiled(
            [z_context_stack(scaled, z, z_context) for z in zs],
            predict,
            tile_px=cfg.tile_px,
            overlap_px=cfg.overlap_px,
            batch_size=cfg.batch_size,
        )
        for z, pred in zip(zs, preds, strict=True):
            labels = paste_instances(
                pred.instances,
                (h, w),
                scale=scale,
                score_threshold=cfg.score_threshold,
                mask_threshold=cfg.mask_threshold,
                overlap_fraction=cfg.overlap_fraction,
                min_area=min_area,
            )
            if pred.semantic_logits is not None:
                semantic = _semantic_argmax(pred.semantic_logits, (h, w))
                nucleus_mask[z] = semantic == SEMANTIC_NUCLEUS
                if cfg.refine_with_semantic:
                    reach = cfg.refine_reach_fraction * diameter_px
                    labels = refine_with_foreground(labels, semantic > 0, reach_px=reach)
            labels2d[z] = labels
        if progress is not None:
            progress(f"slices {min(b + step, len(todo))}/{len(todo)}")
    assembly = cfg.assembly
    if assembly == "auto":
        assembly = "watershed" if nucleus is not None and cytoplasm is None else "link"
    if assembly == "watershed" and n_z > 1:
        cells = watershed_slices(
            labels2d, diameter_px=diameter_px, seed_depth_fraction=cfg.seed_depth_fraction
        )
    else:
        cells = stitch_slices(labels2d, min_iou=cfg.min_iou, min_containment=cfg.min_containment)
        if n_z > 2:
            cells = split_at_area_minima(cells, ratio=cfg.split_area_ratio)
            cells = merge_z_fragments(split_disconnected(cells), fraction=cfg.fragment_fraction)
    sphere = (math.pi / 6 * diameter_px**3 / anisotropy if n_z > 1 else nucleus_area) * (
        1 if nucleus is not None else 1 / CELL_TO_NUCLEUS_DIAMETER**3
    )
    # the stain that defines the objects
    stain = norm[list(channels).index("cytoplasm" if cytoplasm is not None else "nucleus")]
    if n_z > 1 and cfg.end_slice_fraction > 0:
        # the stain blurred past a cell's flat bottom looks like cell in one 2D slice
        cells = trim_dim_end_slices(cells, stain, fraction=cfg.end_slice_fraction)
    n_dim = 0
    if cfg.min_contrast > 0:  # out-of-focus light and background texture
        contrast = object_contrast(
            cells, stain, radius_px=cfg.contrast_radius_fraction * diameter_px,
            anisotropy=anisotropy,
        )  # fmt: skip
        dim = np.flatnonzero(contrast < cfg.min_contrast)
        n_dim = len(dim)
        cells = np.where(np.isin(cells, dim), 0, cells).astype(cells.dtype)
    if nucleus is not None and cytoplasm is not None and cfg.merge_fragments:
        # a piece of a cell split off in a few slices has no nucleus of its own
        cells = merge_cells_without_nucleus(
            cells, nucleus_mask, min_nucleus_voxels=max(1, int(cfg.min_volume_fraction * sphere))
        )
    if nucleus is not None and cytoplasm is not None and cfg.nucleus_snap_px > 0:
        nucleus_mask = snap_nuclei_to_stain(
            cells, nucleus_mask, norm[list(channels).index("nucleus")],
            reach_px=cfg.nucleus_snap_px,
        )  # fmt: skip
    info = {
        "diameter_px": round(float(diameter_px), 2),
        "scale": round(scale, 4),
        "anisotropy": round(float(anisotropy), 3),
        "slices_predicted": len(todo),
        "dim_objects_dropped": n_dim,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if nucleus is not None and cytoplasm is None:
        mask = cells > 0  # nucleus-only image: the instances are the nuclei
    elif nucleus is None and cytoplasm is not None:
        mask = nucleus_mask
    else:
        mask = nucleus_mask
    return assemble(
        cells, mask, min_cell_size=max(1, int(cfg.min_volume_fraction * sphere)), info=info
    )


def _slices_with_signal(norm_czyx: np.ndarray, *, margin: int = 1) -> list[int]:
    """z indices worth predicting: slices holding foreground of the volume (Otsu on the
    smoothed maximum over channels, > 0.1 % of the slice), plus ``margin`` slices around."""
    from skimage.filters import threshold_otsu

    strongest = ndi.gaussian_filter(norm_czyx.max(axis=0), sigma=(0, 2, 2))
    fg = strongest > threshold_otsu(strongest)
    has = fg.mean(axis=(1, 2)) > 1e-3
    if margin > 0:
        has = ndi.binary_dilation(has, iterations=margin)
    return [int(z) for z in np.nonzero(has)[0]]


def refine_with_foreground(
    labels: np.ndarray, foreground: np.ndarray, *, reach_px: float
) -> np.ndarray:
    """Snap 2D instances to the semantic foreground (Panoptic-style merge of things and stuff).

    Each instance grows into foreground pixels within ``reach_px`` (nearest instance wins)
    and loses its pixels outside the foreground; each keeps its largest piece. The sharper
    full-resolution semantic border replaces the 28 x 28 mask border; the instances still
    decide where touching cells split.
    """
    from skimage.segmentation import expand_labels

    if not labels.any():
        return labels
    grown = expand_labels(labels, distance=max(1.0, reach_px))
    grown[~foreground] = 0
    from cellrna_pipeline.core.segmentation.base import largest_piece_per_id

    return largest_piece_per_id(grown[np.newaxis])[0]


def snap_nuclei_to_stain(
    cells: np.ndarray,
    nucleus_mask: np.ndarray,
    stain: np.ndarray,
    *,
    reach_px: float = 2.0,
    level: float = 0.5,
    min_step: float = 0.05,
) -> np.ndarray:
    """Move each cell's nucleus border to the nucleus stain's edge, at full resolution.

    In cell ``k``, with ``N`` its predicted nucleus and ``C`` the rest of the cell, the
    nucleus becomes the voxels of the cell within ``reach_px`` (lateral pixels) of ``N``
    whose stain (smoothed by 1 px laterally) is above ``c + level * (n - c)``: ``n`` the
    median over ``N`` less its outer pixel ring, ``c`` the median over ``C``. ``level`` 0.5
    is the half-way (half-maximum) edge. A cell whose step ``n - c`` is under
    ``min_step``, or without cytoplasm or nucleus, keeps ``N``.

    Parameters
    ----------
    cells : ``(z, y, x)`` cell ids.
    nucleus_mask : ``(z, y, x)`` bool, the predicted nuclei (semantic head).
    stain : ``(z, y, x)`` nucleus stain normalized to 0-1 (background ~0).

    Returns
    -------
    ``(z, y, x)`` bool nucleus mask, inside the cells.
    """
    out = np.zeros(nucleus_mask.shape, bool)
    smooth = ndi.gaussian_filter(stain.astype(np.float32, copy=False), (0, 1, 1))
    plane = np.ones((1, 3, 3), bool)
    reach = max(1, round(reach_px))
    for k, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        cell = cells[box] == k
        nuc = nucleus_mask[box] & cell
        rest = cell & ~nuc
        if not nuc.any() or not rest.any():
            out[box] |= nuc
            continue
        core = ndi.binary_erosion(nuc, structure=plane)
        values = smooth[box]
        n = float(np.median(values[core if core.any() else nuc]))
        c = float(np.median(values[rest]))
        if n - c < min_step:
            out[box] |= nuc
            continue
        near = ndi.binary_dilation(nuc, structure=plane, iterations=reach)
        out[box] |= cell & near & (values > c + level * (n - c))
    return out


def trim_dim_end_slices(
    cells: np.ndarray, stain: np.ndarray, *, fraction: float = 0.4
) -> np.ndarray:
    """Remove a 3D object's first/last z-slices while their mean stain is under ``fraction``
    of the object's median slice mean (out-of-focus light above or below the object).

    Parameters
    ----------
    cells : ``(z, y, x)`` ids.
    stain : ``(z, y, x)`` normalized stain that defines the objects (background ~0).
    """
    out = cells.copy()
    for obj, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None or box[0].stop - box[0].start < 3:
            continue
        mask = cells[box] == obj
        sums = (stain[box] * mask).sum(axis=(1, 2))
        areas = mask.sum(axis=(1, 2))
        means = np.where(areas > 0, sums / np.maximum(areas, 1), 0.0)
        ref = float(np.median(means[areas > 0]))
        if ref <= 0:
            continue
        z0, z1 = 0, len(means) - 1
        while z0 < z1 and means[z0] < fraction * ref:
            z0 += 1
        while z1 > z0 and means[z1] < fraction * ref:
            z1 -= 1
        region = out[box]
        for k in (*range(0, z0), *range(z1 + 1, len(means))):
            region[k][mask[k]] = 0
    return out


def object_contrast(
    labels: np.ndarray, stain: np.ndarray, *, radius_px: float, anisotropy: float = 1.0
) -> np.ndarray:
    """Mean ``stain`` inside each object minus the mean over the background around it.

    The background around object ``k`` is the unlabelled voxels within ``radius_px`` of
    it whose nearest object is ``k`` (a Voronoi shell from one Euclidean distance
    transform, voxels ``anisotropy`` pixels apart in z).

    Parameters
    ----------
    labels : ``(z, y, x)`` or ``(y, x)`` ids, 0 background.
    stain : normalized stain of the same shape.
    radius_px : shell width in lateral pixels.
    anisotropy : z step / pixel size.

    Returns
    -------
    ``(labels.max() + 1,)`` float64 indexed by id (index 0 and absent ids NaN); ``inf``
    for an object with no background around it (it keeps any threshold).
    """
    n = int(labels.max())
    out = np.full(n + 1, np.nan)
    if n == 0:
        return out
    background = labels == 0
    if not background.any():
        out[1:] = np.inf
        return out
    sampling = (anisotropy, 1.0, 1.0)[-labels.ndim :]
    dist, nearest = ndi.distance_transform_edt(background, sampling=sampling, return_indices=True)
    shell = np.where(background & (dist <= radius_px), labels[tuple(nearest)], 0).ravel()
    values = stain.ravel().astype(np.float64)
    size = np.bincount(labels.ravel(), minlength=n + 1)
    inside = np.bincount(labels.ravel(), weights=values, minlength=n + 1) / np.maximum(size, 1)
    shell_size = np.bincount(shell, minlength=n + 1)
    around = np.bincount(shell, weights=values, minlength=n + 1) / np.maximum(shell_size, 1)
    present = size > 0
    present[0] = False
    out[present] = np.where(shell_size > 0, inside - around, np.inf)[present]
    return out


def merge_cells_without_nucleus(
    cells: np.ndarray, nucleus_mask: np.ndarray, *, min_nucleus_voxels: int
) -> np.ndarray:
    """Merge each 3D cell holding fewer than ``min_nucleus_voxels`` nucleus voxels into the
    neighbour (with a nucleus) it shares the largest face with; isolated ones are kept.

    Parameters
    ----------
    cells : ``(z, y, x)`` ids.
    nucleus_mask : ``(z, y, x)`` bool.
    """
    n = int(cells.max())
    if n == 0:
        return cells
    nuc = np.bincount(cells[nucleus_mask].ravel(), minlength=n + 1)
    orphan = nuc < min_nucleus_voxels
    orphan[0] = False
    return merge_into_neighbours(cells, orphan, axes=tuple(range(cells.ndim)))


def merge_into_neighbours(
    labels: np.ndarray, movable: np.ndarray, *, axes: tuple[int, ...]
) -> np.ndarray:
    """Give every id with ``movable[id]`` to the non-movable neighbour it shares the most
    faces with along ``axes``; ids without such a neighbour are kept.

    Parameters
    ----------
    labels : integer ids, any dimension.
    movable : ``(labels.max() + 1,)`` bool, indexed by id.
    axes : the axes along which faces count (``(0,)``: only z contacts of a ``zyx`` volume).
    """
    n = int(labels.max())
    if n == 0 or not movable.any():
        return labels
    pairs = []
    for axis in axes:
        a = np.moveaxis(labels, axis, 0)[:-1].ravel()
        b = np.moveaxis(labels, axis, 0)[1:].ravel()
        touch = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([a[touch], b[touch]], axis=1))
    both = np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)
    both = np.concatenate([both, both[:, ::-1]])
    both = both[movable[both[:, 0]] & ~movable[both[:, 1]]]
    lut = np.arange(n + 1, dtype=labels.dtype)
    if len(both):
        keys, counts = np.unique(both, axis=0, return_counts=True)
        order = np.lexsort((-counts, keys[:, 0]))
        keys = keys[order]
        first = np.unique(keys[:, 0], return_index=True)[1]
        lut[keys[first, 0]] = keys[first, 1]
    return lut[labels]


def watershed_slices(
    labels_zyx: np.ndarray,
    *,
    diameter_px: float,
    seed_depth_fraction: float = 0.05,
    z_smoothing: float = 0.7,
) -> np.ndarray:
    """Join per-slice 2D instances into 3D objects by a seeded 3D watershed.

    The alternative to linking (:func:`stitch_slices`) when the 2D instances are noisy:
    every pixel gets its distance to the border of its own 2D instance (0 on borders
    between instances), smoothed along z so that the slices vote together; seeds are the
    maxima standing ``seed_depth_fraction * diameter_px`` above their surroundings
    (h-maxima), and the union of the 2D instances is flooded from them. An object ending
    where another begins above it leaves a waist of small cross-sections, hence a
    saddle, between their seeds; a slice where the 2D model merged or split two objects
    is outvoted by its neighbours.

    Parameters
    ----------
    labels_zyx : ``(z, y, x)`` per-slice 2D ids (independent per slice, 0 background).
    diameter_px : lateral object diameter (pixels).
    seed_depth_fraction : seed depth as a fraction of the diameter.
    z_smoothing : Gaussian sigma along z (slices) of the distance map.

    Returns
    -------
    ``(z, y, x)`` uint32 ids, each one 6-connected object.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from cellrna_pipeline.core.segmentation.base import split_disconnected

    foreground = labels_zyx > 0
    if not foreground.any():
        return np.zeros(labels_zyx.shape, np.uint32)
    dist = np.zeros(labels_zyx.shape, np.float32)
    for z in range(labels_zyx.shape[0]):
        lab = labels_zyx[z]
        if not lab.any():
            continue
        border = np.zeros(lab.shape, bool)
        for axis in (0, 1):
            diff = np.diff(lab, axis=axis) != 0
            lo = (slice(None, -1), slice(None)) if axis == 0 else (slice(None), slice(None, -1))
            hi = (slice(1, None), slice(None)) if axis == 0 else (slice(None), slice(1, None))
            border[lo] |= diff
            border[hi] |= diff
        dist[z] = ndi.distance_transform_edt((lab > 0) & ~border)
    sigma_z = z_smoothing if labels_zyx.shape[0] > 1 else 0.0
    dist = ndi.gaussian_filter(dist, (sigma_z, 0.5, 0.5))
    peaks = h_maxima(dist, seed_depth_fraction * diameter_px).astype(bool) & foreground
    markers, _ = ndi.label(peaks, structure=np.ones((3, 3, 3)))
    return split_disconnected(watershed(-dist, markers, mask=foreground))


def split_at_area_minima(labels: np.ndarray, *, ratio: float = 0.6) -> np.ndarray:
    """Split 3D objects where two objects stacked in z were linked into one.

    A single convex object's area per z-slice rises and falls once; two objects joined
    end to end (one ending where the next begins, above it) show a dip. An object is cut
    at its deepest slice ``k`` whose area is under ``ratio`` times the smaller of the
    largest areas before and after it, and both parts are examined again. Slice ``k`` goes
    to the side whose neighbouring slice overlaps it more.

    Parameters
    ----------
    labels : ``(z, y, x)`` ids.
    ratio : dip depth needed to cut (0 disables).

    Returns
    -------
    ``(z, y, x)`` uint32 ids (new ids after the existing ones).
    """
    out = labels.astype(np.uint32, copy=True)
    if ratio <= 0 or labels.shape[0] < 3:
        return out
    next_id = int(out.max()) + 1
    for obj, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None or box[0].stop - box[0].start < 3:
            continue
        mask = labels[box] == obj
        region = out[box]
        todo = [(0, mask.shape[0])]
        first = True
        while todo:
            z0, z1 = todo.pop()
            part = mask[z0:z1]
            cut = _deepest_dip(part.sum(axis=(1, 2)).astype(np.float64), ratio)
            if cut is None:
                if not first:
                    region[z0:z1][part] = next_id
                    next_id += 1
                first = False
                continue
            below = np.count_nonzero(part[cut] & part[cut - 1])
            above = np.count_nonzero(part[cut] & part[cut + 1])
            k = cut if above >= below else cut + 1
            # the first piece found keeps the old id, so an unsplit object is unchanged
            todo += [(z0 + k, z1), (z0, z0 + k)]
    return out


def _deepest_dip(areas: np.ndarray, ratio: float) -> int | None:
    """Index ``k`` (not first or last) of the deepest area dip under ``ratio``, or None."""
    n = len(areas)
    if n < 3:
        return None
    before = np.maximum.accumulate(areas)
    after = np.maximum.accumulate(areas[::-1])[::-1]
    k = np.arange(1, n - 1)
    depth = areas[k] / np.maximum(np.minimum(before[k - 1], after[k + 1]), 1e-9)
    best = int(np.argmin(depth))
    return int(k[best]) if depth[best] < ratio else None


def merge_z_fragments(labels: np.ndarray, *, fraction: float = 0.2) -> np.ndarray:
    """Merge small 3D objects into the object they touch most in z.

    Tips of an object cut off by a wrong z link (and other pieces split off along z) are
    small: an object under ``fraction`` of the typical object volume (that of the object
    holding the median foreground voxel, so many fragments do not lower it), not touching
    the first or last slice (objects cut by the stack's ends are small for a reason), joins
    the larger object it shares the most z-faces with; lateral contacts do not count.

    Parameters
    ----------
    labels : ``(z, y, x)`` ids.
    fraction : of the typical object volume (0 disables).
    """
    n = int(labels.max())
    if n == 0 or fraction <= 0 or labels.shape[0] < 3:
        return labels
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    ordered = np.sort(sizes[1:])
    if ordered[-1] == 0:
        return labels
    typical = float(ordered[np.searchsorted(np.cumsum(ordered), ordered.sum() / 2.0)])
    small = sizes < fraction * typical
    small[0] = False
    small[np.unique(labels[0])] = False
    small[np.unique(labels[-1])] = False
    return merge_into_neighbours(labels, small, axes=(0,))


def _semantic_argmax(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upsample ``(K, h, w)`` logits bilinearly to ``shape`` and take the argmax."""
    if logits.shape[-2:] != shape:
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(logits))[None]
        logits = F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0].numpy()
    return logits.argmax(axis=0).astype(np.uint8)
