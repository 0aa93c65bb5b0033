"""Training of the cell Mask R-CNN: synthetic datasets, COCO round trip, augmentation,
validation, checkpoints, and DDP (``torchrun``), in plain torch.

Data: every training slice comes from :func:`~cellrna_pipeline.core.synth.synthesize`
with randomized cell, stain and optics parameters (seeded), rescaled so that nuclei have
the model's canonical diameter as measured by the same size estimate used at inference.
A dataset can be exported to and imported from COCO (pycocotools RLE masks; category 1
``cell``, category 2 ``nucleus`` with the id of its cell), images as ``.npy`` files.

Augmentation per sample: log-uniform scale (0.7-1.45), 90-degree rotations, flips, small
arbitrary rotations, random crop/pad to the tile, per-channel gain/offset/gamma, blur and
Gaussian noise, and channel modes: both stains; nucleus stain only (the cell channel is
zeroed and the targets become the nuclei, so one model also segments nucleus-only
images); cell stain only.

Progress and metrics go through callbacks (:class:`TrainCallback`); MLflow logging is a
callback of the integrations layer, not part of this module.

Distributed: run ``torchrun --nproc_per_node N -m cellrna_pipeline.core.segmentation.train
--out DIR [--steps S]``; each rank draws its own batches, gradients are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, nccl on CUDA), rank 0
validates and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from scipy import ndimage as ndi

from cellrna_pipeline.core.config import StrictModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.segmentation.base import (
    SEMANTIC_CYTOPLASM,
    SEMANTIC_NUCLEUS,
    estimate_diameter_px,
    normalize_percentile,
    z_context_stack,
)
from cellrna_pipeline.core.segmentation.model import (
    CellMaskRCNN,
    MaskRCNNConfig,
    build_model,
    count_parameters,
    expand_z_context,
    load_model_folder,
    read_model_config,
    save_model_folder,
)

# --- configs ---------------------------------------------------------------------------


class DatasetConfig(StrictModel):
    """A synthetic slice dataset: ``n_volumes`` randomized acquisitions from ``seed``.

    Attributes
    ----------
    n_volumes : volumes to synthesize (one timepoint each).
    seed : base seed; volume ``i`` uses generator seed ``seed * 1000 + i`` and its own
        random parameters.
    shape_zyx : volume shape in voxels (cell volumes; dense-nuclei volumes draw their own).
    empty_slices_per_volume : slices without cells kept per volume (to learn "nothing").
    n_nuclei_volumes : dense-nuclei volumes added (nucleus-only, touching nuclei packed in
        3D: :func:`~cellrna_pipeline.core.synth.nuclei.synthesize_nuclei` with broad random
        settings); volume ``i`` uses generator seed ``seed * 1000 + i`` of that generator.
    nuclei_slices_per_volume : at most this many z-slices (evenly spaced among those with
        nuclei) kept per dense-nuclei volume.
    nuclei_axial_blur_max : the dense-nuclei volumes' axial PSF sigma is drawn up to this
        fraction of the nucleus' axial semi-axis (from 0.1): large values make each slice
        show the out-of-focus halo of the nuclei above and below.
    nuclei_layer_probability : share of the dense-nuclei volumes whose nuclei fill only a
        layer (30-70 % of the depth, the volume made deeper to match), so that slices
        above and below hold only out-of-focus light; their haze (0.5-2, over 1-2.5 radii)
        reaches 2-6x further along z. Up to ``empty_slices_per_volume`` of those
        nucleus-free slices are kept as samples ("no nucleus here"). 0: the earlier
        distribution, draw for draw.
    """

    n_volumes: int = Field(default=48, ge=0)
    seed: int = Field(default=0, ge=0)
    shape_zyx: tuple[int, int, int] = (32, 256, 256)
    empty_slices_per_volume: int = Field(default=2, ge=0)
    n_nuclei_volumes: int = Field(default=0, ge=0)
    nuclei_slices_per_volume: int = Field(default=16, ge=1)
    nuclei_axial_blur_max: float = Field(default=0.8, gt=0.1, le=3.0)
    nuclei_layer_probability: float = Field(default=0.0, ge=0.0, le=1.0)


class AugmentConfig(StrictModel):
    """Augmentation probabilities and ranges (see the module docstring)."""

    scale_range: tuple[float, float] = (0.7, 1.45)
    rotate_probability: float = 0.3
    nucleus_only_probability: float = 0.25
    cell_only_probability: float = 0.1
    gain_range: tuple[float, float] = (0.6, 1.4)
    gamma_range: tuple[float, float] = (0.7, 1.4)
    offset_std: float = 0.05
    blur_probability: float = 0.3
    blur_sigma_max_px: float = 1.5
    noise_std_max: float = 0.08
    context_dropout_probability: float = 0.1


class TrainConfig(StrictModel):
    """Everything that defines a training run (recorded with the model).

    The defaults are the recipe of the shipped champion's starting weights
    (``model_registry/cell-maskrcnn/init_recipe.json``: z-context 2, from scratch, 6500
    steps, cell volumes and dense-nuclei volumes with out-of-focus layers; a test keeps the
    two equal), so ``cellrna train cells`` and the ``cell_segmentation_model`` asset train
    them again by default; the champion is those weights fine-tuned 3000 steps on new
    volumes (the folder's own recipe, ``--recipe model_registry/cell-maskrcnn --init``).
    ``init_from``: a model folder whose weights start the run (fine-tuning; its weights
    must fit ``model``, whose training-only settings such as the tile size may differ,
    and a different ``z_context`` is widened by :func:`expand_z_context`); ``None``
    trains from scratch.
    """

    seed: int = 0
    steps: int = Field(default=6500, ge=1)
    batch_size: int = Field(default=2, ge=1)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip_norm: float = 10.0
    validate_every: int = 3250
    checkpoint_every: int = 250
    val_slices: int = 48
    model: MaskRCNNConfig = MaskRCNNConfig(
        z_context=2, input_size_px=160, box_batch_size_per_image=128
    )
    data: DatasetConfig = DatasetConfig(
        n_volumes=64,
        seed=2,
        empty_slices_per_volume=3,
        n_nuclei_volumes=112,
        nuclei_slices_per_volume=16,
        nuclei_axial_blur_max=1.2,
        nuclei_layer_probability=0.4,
    )
    val_data: DatasetConfig = DatasetConfig(n_volumes=4, seed=500, n_nuclei_volumes=4)
    augment: AugmentConfig = AugmentConfig()
    init_from: str | None = None


# --- samples ---------------------------------------------------------------------------


@dataclass
class TrainSample:
    """One 2D training slice at the canonical scale.

    Attributes
    ----------
    image : ``(2, H, W)`` float32, channels nucleus, cytoplasm (normalized).
    cells : ``(H, W)`` int32 cell ids.
    nuclei : ``(H, W)`` int32 nucleus ids (= the cell's id).
    source : where it came from (volume seed, z).
    kind : ``"cells"`` (both stains, nuclei inside cells) or ``"nuclei"`` (nucleus stain
        only, the cytoplasm channel is zeros and ``cells == nuclei``).
    """

    image: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray
    source: str = ""
    kind: Literal["cells", "nuclei"] = "cells"


def _random_synth_config(rng: np.random.Generator, seed: int, shape_zyx: tuple[int, int, int]):
    from cellrna_pipeline.core.synth import SynthConfig

    lateral = float(rng.uniform(0.11, 0.2))
    return SynthConfig(
        seed=seed,
        timepoints=1,
        shape_zyx=shape_zyx,
        voxel_size_um=(float(rng.uniform(0.3, 1.0)), lateral, lateral),
        n_cells=int(rng.integers(5, 20)),
        cell_radius_um=float(rng.uniform(4.5, 8.0)),
        cell_radius_cv=float(rng.uniform(0.05, 0.2)),
        cell_z_aspect=float(rng.uniform(0.4, 0.8)),
        cell_irregularity=float(rng.uniform(0.03, 0.2)),
        nucleus_fraction=float(rng.uniform(0.38, 0.72)),
        spots_per_cell=5.0,
        cluster_probability=0.0,
        snr=float(rng.uniform(3.0, 10.0)),
        background_photons=float(rng.uniform(40.0, 200.0)),
        illumination_falloff=float(rng.uniform(0.0, 0.4)),
        nucleus_stain_photons=float(rng.uniform(150.0, 800.0)),
        cytoplasm_stain_photons=float(rng.uniform(50.0, 250.0)),
        membrane_contrast=float(rng.uniform(0.2, 1.6)),
        texture_contrast=float(rng.uniform(0.1, 0.45)),
        calibration_images=False,
    )


def _random_nuclei_config(
    rng: np.random.Generator,
    seed: int,
    axial_blur_max: float = 0.8,
    layer_probability: float = 0.0,
):
    """Broad random settings of the dense-nuclei generator (nucleus-only, touching nuclei).

    Sizes are drawn in pixels (nucleus diameter 8-48 px, log-uniform; anisotropy 1-4)
    and the field holds 6-12 nucleus diameters laterally and 3-6 axially; blur, haze,
    contrast, noise, texture and shapes vary widely.
    """
    from cellrna_pipeline.core.synth.nuclei import NucleiConfig

    lateral_um = 0.2
    d_px = float(np.exp(rng.uniform(np.log(8.0), np.log(48.0))))
    anisotropy = float(rng.uniform(1.0, 4.0))
    z_aspect = float(rng.uniform(0.6, 1.2))
    side = int(np.clip(round(d_px * rng.uniform(6.0, 12.0)), 64, 256))
    n_z = int(np.clip(round(d_px * z_aspect / anisotropy * rng.uniform(3.0, 6.0)), 12, 64))
    radius_um = d_px * lateral_um / 2.0
    psf_lateral_nm = 1000.0 * lateral_um * float(rng.uniform(0.3, max(0.4, 0.12 * d_px)))
    psf_axial_nm = 1000.0 * radius_um * z_aspect * float(rng.uniform(0.1, axial_blur_max))
    config = NucleiConfig(
        seed=seed,
        shape_zyx=(n_z, side, side),
        voxel_size_um=(anisotropy * lateral_um, lateral_um, lateral_um),
        nucleus_radius_um=radius_um,
        nucleus_radius_cv=float(rng.uniform(0.05, 0.3)),
        z_aspect=z_aspect,
        elongation_max=float(rng.uniform(1.0, 1.8)),
        irregularity=float(rng.uniform(0.0, 0.2)),
        volume_fraction=float(rng.uniform(0.1, 0.45)),
        contact=float(rng.uniform(0.75, 0.98)),
        clustering=float(rng.uniform(0.0, 1.0)),
        psf_sigma_nm=(max(psf_axial_nm, 50.0), psf_lateral_nm, psf_lateral_nm),
        nucleus_photons=float(np.exp(rng.uniform(np.log(30.0), np.log(1000.0)))),
        brightness_cv=float(rng.uniform(0.05, 0.5)),
        texture_contrast=float(rng.uniform(0.0, 0.4)),
        nucleolus_contrast=float(rng.uniform(0.0, 0.5)),
        haze=float(rng.uniform(0.0, 1.0)),
        haze_sigma_radii=float(rng.uniform(1.0, 4.0)),
        background_photons=float(np.exp(rng.uniform(np.log(10.0), np.log(400.0)))),
        illumination_falloff=float(rng.uniform(0.0, 0.5)),
        camera_offset_adu=float(rng.uniform(0.0, 500.0)),
        camera_gain_adu_per_e=float(rng.uniform(1.0, 4.0)),
        read_noise_e=float(rng.uniform(1.0, 10.0)),
    )
    # drawn after the rest, only when enabled: the earlier volumes stay bit-identical
    if layer_probability > 0 and rng.random() < layer_probability:
        fraction = float(rng.uniform(0.3, 0.7))
        layer = {
            "layer_fraction": fraction,
            "layer_offset": float(rng.uniform(0.0, 1.0)),
            "shape_zyx": (min(96, round(n_z / fraction)), side, side),
            "haze": float(rng.uniform(0.5, 2.0)),
            "haze_sigma_radii": float(rng.uniform(1.0, 2.5)),
            "haze_axial_factor": float(rng.uniform(2.0, 6.0)),
        }
        config = NucleiConfig(**{**config.model_dump(), **layer})
    return config


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(labels.astype(np.float32))[:, None]
    return F.interpolate(t, size=size, mode="nearest-exact")[:, 0].numpy().astype(np.int32)


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(..., H, W)`` float32 to ``size``, bilinear (antialiased when shrinking)."""
    lead = image.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(
        -1, 1, *image.shape[-2:]
    )
    shrink = size[0] < image.shape[-2]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.reshape(*lead, *size).numpy()


def make_samples(
    config: DatasetConfig,
    *,
    canonical_px: float,
    z_context: int = 0,
    workers: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[TrainSample]:
    """Synthesize the dataset's volumes and cut them into canonical-scale slices.

    Every slice that holds a cell is kept, plus ``empty_slices_per_volume`` without.
    With ``z_context = k`` each sample holds, per stain, its slice and ``k`` neighbours
    on each side (:func:`~cellrna_pipeline.core.segmentation.base.z_context_stack`).
    Deterministic for a given config, whatever ``workers`` (processes synthesizing
    volumes side by side; 0: in this process).
    """
    jobs: list[tuple[Literal["cells", "nuclei"], int]] = [
        ("cells", i) for i in range(config.n_volumes)
    ]
    jobs += [("nuclei", i) for i in range(config.n_nuclei_volumes)]

    def report(done: int, n_samples: int) -> None:
        if progress is not None and (done % 8 == 0 or done == len(jobs)):
            progress(f"synthesized {done}/{len(jobs)} volumes ({n_samples} slices)")

    samples: list[TrainSample] = []
    if workers <= 0:
        for done, (kind, i) in enumerate(jobs, start=1):
            samples += _volume_samples(config, kind, i, canonical_px, z_context)
            report(done, len(samples))
        return samples
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold torch threads (and CUDA) that fork would copy broken
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(_volume_samples, config, kind, i, canonical_px, z_context)
            for kind, i in jobs
        ]
        for done, future in enumerate(futures, start=1):
            samples += future.result()
            report(done, len(samples))
    return samples


def _volume_samples(
    config: DatasetConfig,
    kind: Literal["cells", "nuclei"],
    i: int,
    canonical_px: float,
    z_context: int,
) -> list[TrainSample]:
    """The canonical-scale slices of the dataset's ``i``-th cell or dense-nuclei volume."""
    if kind == "nuclei":
        return _dense_nuclei_samples(config, i, canonical_px=canonical_px, z_context=z_context)
    return _cell_samples(config, i, canonical_px=canonical_px, z_context=z_context)


def _canonical_size(nucleus: np.ndarray, canonical_px: float) -> tuple[int, int]:
    """``(h, w)`` of a ``(z, h, w)`` nucleus stain rescaled so that its nuclei (size
    estimated) are ``canonical_px`` across; at least 32 px."""
    scale = canonical_px / estimate_diameter_px(nucleus)
    h, w = nucleus.shape[-2:]
    return max(32, round(h * scale)), max(32, round(w * scale))


def _cell_samples(
    config: DatasetConfig, i: int, *, canonical_px: float, z_context: int
) -> list[TrainSample]:
    """Canonical-scale slices of the dataset's ``i``-th cell volume (both stains): every
    slice with a cell and up to ``empty_slices_per_volume`` without."""
    from cellrna_pipeline.core.synth import synthesize

    rng = np.random.default_rng([config.seed, i])
    seed = config.seed * 1000 + i
    acq = synthesize(_random_synth_config(rng, seed, config.shape_zyx))
    assert acq.image is not None
    nuc = acq.image[0, 0].astype(np.float32)
    cyt = acq.image[0, 1].astype(np.float32)
    size = _canonical_size(nuc, canonical_px)
    z = nuc.shape[0]
    image = _resize_image(np.stack([normalize_percentile(nuc), normalize_percentile(cyt)]), size)
    cells = _resize_labels(acq.cells[0], size)
    nuclei = _resize_labels(acq.nuclei[0], size)
    full = [k for k in range(z) if cells[k].any()]
    empty = [k for k in range(z) if not cells[k].any()]
    chosen = full + list(
        rng.choice(empty, size=min(len(empty), config.empty_slices_per_volume), replace=False)
    )
    return [
        TrainSample(
            image=z_context_stack(image, k, z_context).astype(np.float32),
            cells=cells[k],
            nuclei=nuclei[k],
            source=f"synth seed={seed} z={k}",
        )
        for k in sorted(int(c) for c in chosen)
    ]


def _dense_nuclei_samples(
    config: DatasetConfig, i: int, *, canonical_px: float, z_context: int
) -> list[TrainSample]:
    """Canonical-scale slices of the dataset's ``i``-th dense-nuclei volume (nucleus stain
    only)."""
    from cellrna_pipeline.core.synth.nuclei import synthesize_nuclei

    rng = np.random.default_rng([config.seed, i, 2])
    seed = config.seed * 1000 + i
    acq = synthesize_nuclei(
        _random_nuclei_config(
            rng, seed, config.nuclei_axial_blur_max, config.nuclei_layer_probability
        )
    )
    nuc = acq.image.astype(np.float32)
    size = _canonical_size(nuc, canonical_px)
    z = nuc.shape[0]
    full = [k for k in range(z) if acq.labels[k].any()]
    keep = sorted(
        {full[int(j)] for j in np.linspace(0, len(full) - 1, config.nuclei_slices_per_volume)}
    )
    if acq.config.layer_fraction < 1.0:  # some slices with only out-of-focus light
        empty = [k for k in range(z) if not acq.labels[k].any()]
        n = min(len(empty), config.empty_slices_per_volume)
        keep = sorted(keep + [int(k) for k in rng.choice(empty, size=n, replace=False)])
    # the kept slices and their z-context neighbours, rescaled
    used = sorted(
        {int(np.clip(k + d, 0, z - 1)) for k in keep for d in range(-z_context, z_context + 1)}
    )
    norm = _resize_image(normalize_percentile(nuc)[used], size)
    stack = np.zeros((2, z, *size), np.float32)
    stack[0, used] = norm
    labels = _resize_labels(acq.labels[keep].astype(np.int32), size)
    return [
        TrainSample(
            image=z_context_stack(stack, k, z_context).astype(np.float32),
            cells=labels[j],
            nuclei=labels[j].copy(),
            source=f"nuclei seed={seed} z={k}",
            kind="nuclei",
        )
        for j, k in enumerate(keep)
    ]


# --- COCO ------------------------------------------------------------------------------

COCO_CATEGORIES = [
    {"id": 1, "name": "cell", "supercategory": "cell"},
    {"id": 2, "name": "nucleus", "supercategory": "cell"},
]


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def export_coco(samples: Sequence[TrainSample], folder: str | Path) -> Path:
    """Write samples as a COCO dataset: ``annotations.json`` + ``images/<id>.npy``.

    Cells are category 1, nuclei category 2 with ``"cell_annotation_id"``; masks are
    RLE; ``bbox`` is ``[x, y, w, h]``. Images are ``(2, H, W)`` float32 (nucleus,
    cytoplasm), stored as float16. The folder is written atomically.
    """
    from cellrna_pipeline.core.io import atomic_dir

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    with atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        for img_id, s in enumerate(samples, start=1):
            name = f"images/{img_id:06d}.npy"
            np.save(tmp / name, s.image.astype(np.float16))
            h, w = s.cells.shape
            images.append(
                {
                    "id": img_id,
                    "file_name": name,
                    "height": h,
                    "width": w,
                    "source": s.source,
                    "kind": s.kind,
                }
            )
            for cell_id in np.unique(s.cells[s.cells > 0]):
                cell_ann = ann_id
                for cat, mask in ((1, s.cells == cell_id), (2, s.nuclei == cell_id)):
                    if not mask.any():
                        continue
                    ys, xs = np.nonzero(mask)
                    ann = {
                        "id": ann_id,
                        "image_id": img_id,
                        "category_id": cat,
                        "segmentation": _rle(mask),
                        "area": int(mask.sum()),
                        "bbox": [
                            int(xs.min()),
                            int(ys.min()),
                            int(np.ptp(xs) + 1),
                            int(np.ptp(ys) + 1),
                        ],
                        "iscrowd": 0,
                        "instance_id": int(cell_id),
                    }
                    if cat == 2:
                        ann["cell_annotation_id"] = cell_ann
                    annotations.append(ann)
                    ann_id += 1
        coco = {
            "info": {"description": "cellrna-pipeline synthetic cell slices", "version": "1"},
            "images": images,
            "annotations": annotations,
            "categories": COCO_CATEGORIES,
        }
        (tmp / "annotations.json").write_text(json.dumps(coco))
    return folder


def import_coco(folder: str | Path) -> list[TrainSample]:
    """Read a COCO dataset written by :func:`export_coco` (or any COCO set with category 1
    cells and optional category 2 nuclei, images as ``(C, H, W)`` ``.npy``)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    folder = Path(folder)
    path = folder / "annotations.json"
    if not path.exists():
        raise InputError(f"{folder}: no annotations.json (not a COCO dataset folder)")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(path))
    samples = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        image = np.load(folder / info["file_name"]).astype(np.float32)
        h, w = info["height"], info["width"]
        cells = np.zeros((h, w), np.int32)
        nuclei = np.zeros((h, w), np.int32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        by_id = {a["id"]: a for a in anns}
        for k, a in enumerate(a for a in anns if a["category_id"] == 1):
            cells[coco.annToMask(a) > 0] = a.get("instance_id", k + 1)
        for a in anns:
            if a["category_id"] == 2:
                parent = by_id.get(a.get("cell_annotation_id", -1))
                value = parent.get("instance_id", 0) if parent else a.get("instance_id", 0)
                nuclei[coco.annToMask(a) > 0] = value
        kind: Literal["cells", "nuclei"] = "nuclei" if info.get("kind") == "nuclei" else "cells"
        samples.append(TrainSample(image, cells, nuclei, info.get("source", ""), kind))
    return samples


# --- augmentation and targets ------------------------------------------------------------


def augment(
    sample: TrainSample, rng: np.random.Generator, *, tile_px: int, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random view of a sample: ``(image (2, T, T), instances (T, T), semantic (T, T))``.

    ``instances`` are the cell ids, or the nucleus ids in nucleus-only mode (always for
    ``kind == "nuclei"`` samples, which have no cell stain).
    """
    image, cells, nuclei = sample.image, sample.cells, sample.nuclei
    lo, hi = config.scale_range
    s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    rotate = rng.random() < config.rotate_probability
    # Only a window just large enough for the tile (and its rotation) is resized and
    # rotated: transforming whole slices dominated the step time.
    need = math.ceil(tile_px / s * (math.sqrt(2.0) if rotate else 1.0)) + 2
    h, w = cells.shape
    wh, ww = min(h, need), min(w, need)
    y0, x0 = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    window = (slice(y0, y0 + wh), slice(x0, x0 + ww))
    size = (max(16, round(wh * s)), max(16, round(ww * s)))
    image = _resize_image(image[(slice(None), *window)], size)
    both = _resize_labels(np.stack([cells[window], nuclei[window]]), size)
    cells, nuclei = both[0], both[1]
    # geometry: 90-degree rotations, flips, sometimes a small arbitrary rotation
    k = int(rng.integers(4))
    image, cells, nuclei = (np.rot90(a, k, axes=(-2, -1)) for a in (image, cells, nuclei))
    if rng.random() < 0.5:
        image, cells, nuclei = image[..., ::-1], cells[..., ::-1], nuclei[..., ::-1]
    if rotate:
        angle = float(rng.uniform(-45, 45))
        image = ndi.rotate(image, angle, axes=(-1, -2), reshape=False, order=1, mode="constant")
        cells = ndi.rotate(cells, angle, axes=(-1, -2), reshape=False, order=0, mode="constant")
        nuclei = ndi.rotate(nuclei, angle, axes=(-1, -2), reshape=False, order=0, mode="constant")
    # crop / pad to the tile (the centre of a rotated window: its corners are empty)
    out_img = np.zeros((image.shape[0], tile_px, tile_px), np.float32)
    out_cells = np.zeros((tile_px, tile_px), np.int32)
    out_nuc = np.zeros((tile_px, tile_px), np.int32)
    h, w = cells.shape
    if rotate:
        y0, x0 = max(0, (h - tile_px) // 2), max(0, (w - tile_px) // 2)
    else:
        y0 = int(rng.integers(0, h - tile_px + 1)) if h > tile_px else 0
        x0 = int(rng.integers(0, w - tile_px + 1)) if w > tile_px else 0
    oy = int(rng.integers(0, tile_px - h + 1)) if h < tile_px else 0
    ox = int(rng.integers(0, tile_px - w + 1)) if w < tile_px else 0
    ch, cw = min(h, tile_px), min(w, tile_px)
    out_img[:, oy : oy + ch, ox : ox + cw] = image[:, y0 : y0 + ch, x0 : x0 + cw]
    out_cells[oy : oy + ch, ox : ox + cw] = cells[y0 : y0 + ch, x0 : x0 + cw]
    out_nuc[oy : oy + ch, ox : ox + cw] = nuclei[y0 : y0 + ch, x0 : x0 + cw]
    # channel mode; the image holds 2 stains (nucleus, cytoplasm) x g z-slices each
    g = out_img.shape[0] // 2
    nucleus_ch, cell_ch = slice(0, g), slice(g, 2 * g)
    u = rng.random()
    semantic = np.zeros((tile_px, tile_px), np.int64)
    if sample.kind == "nuclei" or u < config.nucleus_only_probability:
        out_img[cell_ch] = 0.0
        instances = out_nuc
        semantic[out_nuc > 0] = SEMANTIC_NUCLEUS
    else:
        if u < config.nucleus_only_probability + config.cell_only_probability:
            out_img[nucleus_ch] = 0.0
        instances = out_cells
        semantic[out_cells > 0] = SEMANTIC_CYTOPLASM
        semantic[out_nuc > 0] = SEMANTIC_NUCLEUS
    if g > 1 and rng.random() < config.context_dropout_probability:
        for ch in (nucleus_ch, cell_ch):  # as a 2D image: the slice repeated
            out_img[ch] = out_img[ch.start + g // 2]
    # intensities: one draw per stain, the same for its z-slices (noise per slice)
    for ch in (nucleus_ch, cell_ch):
        if not out_img[ch].any():
            continue
        x: np.ndarray = out_img[ch]
        if rng.random() < config.blur_probability:
            sigma = float(rng.uniform(0.3, config.blur_sigma_max_px))
            x = ndi.gaussian_filter(x, (0.0, sigma, sigma))
        gamma = float(rng.uniform(*config.gamma_range))
        x = np.sign(x) * np.abs(x) ** gamma
        x = x * float(rng.uniform(*config.gain_range)) + float(rng.normal(0, config.offset_std))
        x = x + rng.normal(0, float(rng.uniform(0, config.noise_std_max)), x.shape)
        out_img[ch] = x.astype(np.float32)
    return out_img, instances, semantic


def make_target(
    instances: np.ndarray, semantic: np.ndarray, *, min_area: int = 4
) -> dict[str, torch.Tensor]:
    """torchvision detection target from an instance label image and a semantic map."""
    ids = np.unique(instances)
    ids = ids[ids != 0]
    masks, boxes = [], []
    for i in ids:
        m = instances == i
        if m.sum() < min_area:
            continue
        ys, xs = np.nonzero(m)
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    h, w = instances.shape
    return {
        "boxes": torch.tensor(np.array(boxes, np.float32).reshape(-1, 4)),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": torch.from_numpy(np.array(masks, np.uint8).reshape(-1, h, w)),
        "semantic": torch.from_numpy(semantic),
    }


# --- validation ------------------------------------------------------------------------


def evaluate_slices(
    model: CellMaskRCNN, samples: Sequence[TrainSample], *, score_threshold: float = 0.5
) -> dict[str, float]:
    """2D scores on canonical-scale slices (both stains): cell AP@0.5, mAP, semantic IoU."""
    from cellrna_pipeline.core.segmentation.inference import maskrcnn_predictor, paste_instances
    from cellrna_pipeline.core.segmentation.metrics import instance_scores, semantic_scores

    was_training = model.training
    predict = maskrcnn_predictor(
        model, device=next(model.parameters()).device, min_score=score_threshold
    )
    trues, preds, sem_t, sem_p = [], [], [], []
    for b in range(0, len(samples), 4):
        chunk = samples[b : b + 4]
        outs = predict([s.image for s in chunk])
        for s, out in zip(chunk, outs, strict=True):
            trues.append(s.cells)
            preds.append(
                paste_instances(out.instances, s.cells.shape, score_threshold=score_threshold)
            )
            sem = np.zeros(s.cells.shape, np.uint8)
            sem[s.cells > 0] = SEMANTIC_CYTOPLASM
            sem[s.nuclei > 0] = SEMANTIC_NUCLEUS
            sem_t.append(sem)
            assert out.semantic_logits is not None
            sem_p.append(out.semantic_logits.argmax(0).astype(np.uint8))
    model.train(was_training)
    inst = instance_scores(trues, preds)
    sem_scores = semantic_scores(sem_t, sem_p)
    return {
        "val_ap50": inst.ap50,
        "val_map": inst.map,
        "val_iou_nucleus": sem_scores["iou_1"],
        "val_iou_cytoplasm": sem_scores["iou_2"],
        "val_accuracy": sem_scores["accuracy"],
    }


def validate(
    model: CellMaskRCNN, samples: Sequence[TrainSample], *, n_slices: int
) -> dict[str, float]:
    """:func:`evaluate_slices` on the first ``n_slices`` cell slices (``val_*``) and, when
    there are dense-nuclei slices, on the first ``n_slices`` of those (``val_nuclei_ap50``,
    ``val_nuclei_map``)."""
    cells = [s for s in samples if s.kind == "cells"][:n_slices]
    nuclei = [s for s in samples if s.kind == "nuclei"][:n_slices]
    metrics = evaluate_slices(model, cells) if cells else {}
    if nuclei:
        scores = evaluate_slices(model, nuclei)
        metrics["val_nuclei_ap50"] = scores["val_ap50"]
        metrics["val_nuclei_map"] = scores["val_map"]
    return metrics


# --- batches ---------------------------------------------------------------------------

Batch = list[tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _AugmentedStream(torch.utils.data.IterableDataset):
    """Endless augmented ``(image, target)`` pairs of random samples, for loader workers;
    each worker draws from its own stream ``rng(seed + [worker id])``."""

    def __init__(self, samples: Sequence[TrainSample], config: TrainConfig, seed: list[int]):
        self.samples, self.config, self.seed = samples, config, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([*self.seed, info.id if info is not None else 0])
        tile = self.config.model.input_size_px
        while True:
            sample = self.samples[int(rng.integers(0, len(self.samples)))]
            img, inst, sem = augment(sample, rng, tile_px=tile, config=self.config.augment)
            yield torch.from_numpy(img), make_target(inst, sem)


def _batch_stream(
    samples: Sequence[TrainSample], config: TrainConfig, seed: list[int], *, workers: int
) -> Iterator[Batch]:
    """Endless training batches of ``config.batch_size`` augmented samples.

    ``workers = 0`` augments in this process (one :class:`_AugmentedStream`);
    ``workers > 0`` in that many loader processes (forked: the samples are shared, not
    copied), which keeps a GPU fed; the batches then differ from the in-process ones.
    """
    stream = _AugmentedStream(samples, config, seed)
    if workers <= 0:
        pairs = iter(stream)
        while True:
            yield [next(pairs) for _ in range(config.batch_size)]
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=config.batch_size,
        num_workers=workers,
        collate_fn=list,
        prefetch_factor=4,
        multiprocessing_context="fork",
    )
    yield from loader


# --- the loop --------------------------------------------------------------------------


class TrainCallback(Protocol):
    """Receives training events; implement any subset (missing methods are skipped)."""

    def on_step(self, step: int, losses: dict[str, float], seconds: float) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class TrainResult:
    """What :func:`train_model` returns (on every rank; ``metrics`` only on rank 0)."""

    model: CellMaskRCNN
    config: TrainConfig
    steps: int
    seconds: float
    steps_per_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1


def _emit(callbacks: Sequence[Any], name: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        from cellrna_pipeline.core.device import distributed_backend, select_device

        dist.init_process_group(backend=distributed_backend(select_device()))
    return dist.get_rank(), dist.get_world_size()


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_model(
    config: TrainConfig,
    *,
    train_samples: Sequence[TrainSample],
    val_samples: Sequence[TrainSample] = (),
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    progress: Callable[[str], None] | None = None,
    workers: int = 0,
) -> TrainResult:
    """Train the cell Mask R-CNN (from scratch, or from ``config.init_from``).

    Parameters
    ----------
    config : :class:`TrainConfig`.
    train_samples, val_samples : canonical-scale slices (see :func:`make_samples`).
    checkpoint_dir : where ``last.pt`` (model, optimizer, step) is written every
        ``checkpoint_every`` steps; an existing one is resumed from.
    callbacks : :class:`TrainCallback` objects.
    progress : called with one-line progress messages (rank 0).
    workers : augmentation processes (0: in this process; see :func:`_batch_stream`).

    Returns
    -------
    TrainResult with the trained (unwrapped) model in eval mode.
    """
    from cellrna_pipeline.core.device import select_device

    if not train_samples:
        raise InputError("no training samples")
    rank, world = _distributed()
    device = select_device()
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config.model)
    if config.init_from is not None:
        init = load_model_folder(config.init_from)
        state = init.state_dict()
        if init.config.z_context != config.model.z_context:
            state = expand_z_context(state, init.config, config.model)
        try:
            model.load_state_dict(state)
        except (RuntimeError, ValueError):
            raise InputError(
                f"{config.init_from}: its weights do not fit the training config's model"
            ) from None
    model = model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    start_step = 0
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("config", {}).get("model") != config.model.model_dump(mode="json"):
            raise InputError(
                f"{ckpt} is the checkpoint of another model architecture; remove it to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if progress and rank == 0:
            progress(f"resumed from {ckpt} at step {start_step}")
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, find_unused_parameters=True)
    batches = _batch_stream(train_samples, config, [config.seed, rank, start_step], workers=workers)
    tile = config.model.input_size_px
    say = progress if (progress is not None and rank == 0) else None
    if say:
        say(
            f"training {count_parameters(model) / 1e6:.2f}M parameters on {device} x {world}, "
            f"{len(train_samples)} slices, steps {start_step}->{config.steps}, batch {config.batch_size}x{tile}px"
        )
    history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    net.train()
    t0 = time.perf_counter()
    window: list[float] = []
    step = start_step
    for step in range(start_step, config.steps):
        ts = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, config)
        batch = next(batches)
        images = [img.to(device, non_blocking=True) for img, _ in batch]
        targets = [{k: v.to(device) for k, v in t.items()} for _, t in batch]
        losses = net(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        seconds = time.perf_counter() - ts
        window.append(seconds)
        record = {k: float(v.detach()) for k, v in losses.items()}
        record["loss"] = float(total.detach())
        _emit(callbacks, "on_step", step + 1, record, seconds)
        if say and ((step + 1) % 25 == 0 or step == start_step):
            say(
                f"step {step + 1}/{config.steps} loss {record['loss']:.3f} "
                f"(mask {record['loss_mask']:.3f}, sem {record['loss_semantic']:.3f}) "
                f"{1 / np.mean(window[-25:]):.2f} steps/s"
            )
        history.append({"step": step + 1, **record})
        last = step + 1 == config.steps
        if rank == 0 and val_samples and ((step + 1) % config.validate_every == 0 or last):
            metrics = validate(model, val_samples, n_slices=config.val_slices)
            _emit(callbacks, "on_validation", step + 1, metrics)
            if say:
                say(
                    f"validation at step {step + 1}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                )
        if rank == 0 and ckpt is not None and ((step + 1) % config.checkpoint_every == 0 or last):
            _save_checkpoint(ckpt, model, optimizer, step + 1, config)
            _emit(callbacks, "on_checkpoint", step + 1, ckpt)
    seconds = time.perf_counter() - t0
    n = max(0, config.steps - start_step)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    model.eval()
    return TrainResult(
        model=model,
        config=config,
        steps=config.steps,
        seconds=seconds,
        steps_per_s=n / seconds if seconds > 0 else 0.0,
        metrics=metrics,
        history=history,
        world_size=world,
    )


def _save_checkpoint(
    path: Path,
    model: CellMaskRCNN,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
) -> None:
    from cellrna_pipeline.core.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "config": config.model_dump(mode="json"),
            },
            tmp,
        )


# --- the whole recipe ----------------------------------------------------------------------


def load_or_make_samples(
    config: DatasetConfig,
    *,
    canonical_px: float,
    z_context: int = 0,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[TrainSample]:
    """The dataset of ``config``, read from its COCO cache under ``cache_dir`` when there,
    else synthesized (and cached). The cache folder name encodes the config."""

    def make() -> list[TrainSample]:
        return make_samples(
            config,
            canonical_px=canonical_px,
            z_context=z_context,
            workers=workers,
            progress=progress,
        )

    if cache_dir is None:
        return make()
    import hashlib

    text = config.model_dump_json() + f"|{canonical_px}" + (f"|z{z_context}" if z_context else "")
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"cells-coco-{key}"
    if (folder / "annotations.json").exists():
        if progress:
            progress(f"reading the COCO dataset {folder}")
        return import_coco(folder)
    samples = make()
    if not folder.exists():
        export_coco(samples, folder)
    return samples


def weights_sha256(folder: str | Path) -> str:
    """sha256 of a model folder's ``weights.pt`` (identifies the weights a run started from)."""
    import hashlib

    return hashlib.sha256((Path(folder) / "weights.pt").read_bytes()).hexdigest()


def read_recipe(path: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` of a recipe file, to train again what it records.

    Parameters
    ----------
    path : a ``TrainConfig`` JSON file, or a model folder (or its ``config.json``) written
        by :func:`run_training`, whose recorded ``training.train_config`` is used.

    Raises
    ------
    InputError : one line, when the file is missing, not JSON or not a training recipe.
    """
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        fields = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"recipe {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe {file}: not JSON ({exc})") from None
    if isinstance(fields, dict) and "kind" in fields:  # a model folder's config.json
        fields = (fields.get("training") or {}).get("train_config")
        if fields is None:
            raise InputError(f"recipe {file}: the model records no training config")
    if not isinstance(fields, dict):
        raise InputError(f"recipe {file}: not a training config (a JSON object)")
    try:
        return TrainConfig(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputError(f"recipe {file}: {where}: {first['msg']}") from None


INIT_RECIPE_FILE = "init_recipe.json"
"""File of a fine-tuned model folder holding the recipe of the weights it started from."""

_BENCHMARK_COLUMNS = (
    ("cells_ap50", "cell AP@0.5"),
    ("cells_map", "cell mAP"),
    ("nuclei_ap50", "nucleus AP@0.5"),
    ("iou_nucleus", "IoU nucleus"),
    ("iou_cytoplasm", "IoU cytoplasm"),
    ("seconds_per_volume", "s / volume"),
)


def model_card(
    config: TrainConfig,
    training: dict[str, Any],
    metrics: dict[str, Any],
    *,
    init_recipe: TrainConfig | None = None,
) -> str:
    """A markdown model card: how to reproduce, architecture, data, training, metrics.

    Parameters
    ----------
    config : the run's recipe.
    training : the ``training`` record of the folder's ``config.json`` (``command``,
        ``seconds``, ``steps_per_s``, ``world_size``, ``init_weights_sha256``).
    metrics : the folder's ``metrics.json``: validation entries, and ``benchmark_<data>``
        entries with ``benchmark_commands`` (``benchmarks/cells.py --record``).
    init_recipe : the recipe of the weights a fine-tuning run started from.
    """
    command = str(training.get("command", "cellrna train cells"))
    reproduce = [f"cellrna train cells --recipe THIS_FOLDER  # run as: {command}"]
    if config.init_from is not None:
        sha = str(training.get("init_weights_sha256", "?"))[:16]
        start = f"fine-tuned from the model folder {config.init_from} (weights sha256 {sha}...)"
        if init_recipe is not None:
            reproduce = [
                f"cellrna train cells --recipe THIS_FOLDER/{INIT_RECIPE_FILE} --out INIT"
                f"  # the starting weights: {init_recipe.steps} steps"
                + (" from scratch" if init_recipe.init_from is None else ""),
                f"cellrna train cells --recipe THIS_FOLDER --init INIT  # run as: {command}",
            ]
    else:
        start = "trained from scratch (no pretrained weights)"
    m, d = config.model, config.data
    lines = [
        "# cellrna-cell-maskrcnn",
        "",
        "Mask R-CNN (torchvision) with a Panoptic-FPN-style semantic head "
        f"(background / nucleus / cytoplasm), {start}, on the project's synthetic generator.",
        "",
        "## Reproduce",
        "",
        "```",
        *reproduce,
        "```",
        "",
        "CPU training is not bit-reproducible across thread counts; expect metrics within noise.",
        "",
        "## Architecture",
        "",
        f"ResNet-{m.backbone_depth} (stages 1-{m.backbone_stages}, {m.norm} norm), "
        f"FPN {m.fpn_channels} channels, anchors {list(m.anchor_sizes_px)} px, "
        f"input channels {list(m.input_channels)} (z-context {m.z_context} slices per side), "
        f"tiles {m.input_size_px} px, canonical nucleus diameter "
        f"{m.canonical_nucleus_diameter_px} px.",
        "",
        "## Data",
        "",
        f"Training: {d.n_volumes} synthetic volumes {list(d.shape_zyx)} (seed {d.seed}, "
        "randomized cell size 4.5-8 um, nucleus fraction 0.38-0.72, voxel size, stains, texture, "
        "membranes, illumination), every slice with cells; "
        f"{d.n_nuclei_volumes} dense-nuclei volumes (nucleus stain only, touching "
        f"nuclei, up to {d.nuclei_slices_per_volume} slices each; axial PSF up to "
        f"{d.nuclei_axial_blur_max:g} axial radii"
        + (
            f"; {d.nuclei_layer_probability:.0%} of them a layer of nuclei with slices of "
            "out-of-focus light only above and below, some kept as samples"
            if d.nuclei_layer_probability > 0
            else ""
        )
        + f"). Validation: "
        f"{config.val_data.n_volumes} volumes and {config.val_data.n_nuclei_volumes} "
        f"dense-nuclei volumes of seed {config.val_data.seed} (unseen).",
        "",
        "## Training",
        "",
        f"Seed {config.seed}, {training.get('steps', config.steps)} steps, batch "
        f"{config.batch_size}, AdamW lr {config.learning_rate} (warm-up {config.warmup_steps}, "
        f"cosine), weight decay {config.weight_decay}; {training.get('world_size', 1)} "
        f"process(es), {float(training.get('seconds', 0.0)) / 60:.1f} min, "
        f"{float(training.get('steps_per_s', 0.0)):.2f} steps/s.",
        "",
        "## Validation metrics (2D slices at canonical scale)",
        "",
        *(
            f"- {k}: {v:.3f}"
            for k, v in metrics.get("validation_2d_slices", metrics).items()
            if k.startswith("val_") and isinstance(v, int | float)
        ),
        "",
    ]
    benchmarks = {
        k[len("benchmark_") :]: v
        for k, v in metrics.items()
        if k.startswith("benchmark_") and isinstance(v, dict) and k != "benchmark_commands"
    }
    by_command: dict[str, list[str]] = {}
    for name, cmd in metrics.get("benchmark_commands", {}).items():
        by_command.setdefault(cmd, []).append(name)
    if benchmarks:
        lines += [
            "## Benchmark (3D volumes, `benchmarks/cells.py`, docs/benchmarks/cells.md)",
            "",
            "| data | " + " | ".join(title for _, title in _BENCHMARK_COLUMNS) + " |",
            "|---" * (len(_BENCHMARK_COLUMNS) + 1) + "|",
            *(
                f"| {name} | "
                + " | ".join(
                    (f"{row[key]:.2f}" if key.startswith("seconds") else f"{row[key]:.3f}")
                    if key in row
                    else "-"
                    for key, _ in _BENCHMARK_COLUMNS
                )
                + " |"
                for name, row in benchmarks.items()
            ),
            "",
            *(f"- `{cmd}`: {', '.join(names)}" for cmd, names in by_command.items()),
            "",
        ]
    return "\n".join(lines)


def write_model_card(folder: str | Path) -> Path:
    """Write ``folder/model_card.md`` again from the folder's recorded ``config.json``,
    ``metrics.json`` and (fine-tuned models) ``init_recipe.json``; returns its path."""
    folder = Path(folder)
    recorded = read_model_config(folder).get("training", {})
    config = read_recipe(folder)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    init_file = folder / INIT_RECIPE_FILE
    init_recipe = read_recipe(init_file) if init_file.exists() else None
    path = folder / "model_card.md"
    path.write_text(model_card(config, recorded, metrics, init_recipe=init_recipe))
    return path


def run_training(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    progress: Callable[[str], None] | None = None,
    command: str = "cellrna train cells",
    workers: int = 0,
) -> tuple[TrainResult, Path | None]:
    """Make the data, train, and (rank 0) write the model folder ``out_dir``.

    ``workers``: processes that synthesize the volumes and augment the batches (0: this
    process). Returns the result and the folder (``None`` on other ranks).
    """
    rank, world = _distributed()
    canonical = config.model.canonical_nucleus_diameter_px
    context = config.model.z_context
    if world > 1 and cache_dir is not None:
        import torch.distributed as dist

        if rank == 0:
            load_or_make_samples(
                config.data,
                canonical_px=canonical,
                z_context=context,
                cache_dir=cache_dir,
                workers=workers,
                progress=progress,
            )
        dist.barrier()
    train_samples = load_or_make_samples(
        config.data,
        canonical_px=canonical,
        z_context=context,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress if rank == 0 else None,
    )
    val_samples = (
        load_or_make_samples(
            config.val_data,
            canonical_px=canonical,
            z_context=context,
            cache_dir=cache_dir,
            workers=workers,
        )
        if rank == 0
        else []
    )
    out = Path(out_dir)
    result = train_model(
        config,
        train_samples=train_samples,
        val_samples=val_samples,
        checkpoint_dir=out.with_name(out.name + ".checkpoints"),
        callbacks=callbacks,
        progress=progress,
        workers=workers,
    )
    if rank != 0:
        return result, None
    return result, save_trained_model(result, out, command=command)


def save_trained_model(result: TrainResult, out: str | Path, *, command: str) -> Path:
    """Write a training run's model folder: weights, ``config.json`` with the recipe and
    the run's record (``command``, seconds, steps/s, starting weights), metrics, model card
    and, for a fine-tuned model, the recipe of its starting weights."""
    config = result.config
    training: dict[str, Any] = {
        "train_config": json.loads(config.model_dump_json()),
        "steps": result.steps,
        "steps_per_s": round(result.steps_per_s, 3),
        "seconds": round(result.seconds, 1),
        "world_size": result.world_size,
        "command": command,
    }
    files: dict[str, str] = {}
    init_recipe = None
    if config.init_from is not None:
        training["init_weights_sha256"] = weights_sha256(config.init_from)
        with contextlib.suppress(InputError):  # a folder that records no recipe
            init_recipe = read_recipe(config.init_from)
            files[INIT_RECIPE_FILE] = init_recipe.model_dump_json(indent=2) + "\n"
    return save_model_folder(
        result.model,
        out,
        training=training,
        metrics=result.metrics,
        model_card=model_card(config, training, result.metrics, init_recipe=init_recipe),
        files=files,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cellrna_pipeline.core.segmentation.train`` (the ``torchrun`` target)."""
    parser = argparse.ArgumentParser(description="train the cell Mask R-CNN (DDP-aware)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument(
        "--config", help="TrainConfig as JSON (file), or a model folder to train again"
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cache", help="COCO dataset cache folder")
    parser.add_argument(
        "--workers", type=int, default=0, help="data processes per rank (0: in-process)"
    )
    args = parser.parse_args(argv)
    config = read_recipe(args.config) if args.config else TrainConfig()
    if args.steps is not None:
        config = TrainConfig(**{**config.model_dump(), "steps": args.steps})

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    result, folder = run_training(
        config,
        args.out,
        cache_dir=args.cache,
        progress=say,
        command="torchrun ... -m cellrna_pipeline.core.segmentation.train",
        workers=args.workers,
    )
    if folder is not None:
        say(f"wrote {folder} ({result.steps_per_s:.2f} steps/s x {result.world_size} processes)")
    if result.world_size > 1:
        # replicas must agree after DDP's gradient averaging; printed for checks
        checksum = sum(float(p.double().sum()) for p in result.model.parameters())
        print(
            f"rank {int(os.environ.get('RANK', 0))} parameter checksum {checksum:.6f}", flush=True
        )
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
