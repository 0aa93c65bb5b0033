"""Scoring segmentations of whole volumes, and champion/challenger comparison.

Used by the promotion check of ``cell_segmentation_model``, ``cellrna train cells
--promote`` and ``benchmarks/cells.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cellrna_pipeline.core.segmentation.base import (
    SEMANTIC_CYTOPLASM,
    SEMANTIC_NUCLEUS,
    CellSegmentation,
    split_disconnected,
)
from cellrna_pipeline.core.segmentation.metrics import instance_scores, semantic_scores
from cellrna_pipeline.core.types import VoxelSize

if TYPE_CHECKING:
    from cellrna_pipeline.core.segmentation.model import CellMaskRCNN
    from cellrna_pipeline.core.segmentation.segment import CellSegmentationConfig

VALIDATION_SEED = 9100
"""Generator seed of the champion/challenger validation volumes (never used for training:
training volumes use seeds ``seed * 1000 + i`` with ``i < n_volumes``, validation slices
seed 500 000+)."""
VALIDATION_VOLUMES = 4
"""Synthetic volumes per kind (default settings, randomized settings) in the promotion
comparison: 102 cells, all found by the champions so far, so these terms guard against
losses rather than rank models."""
VALIDATION_NUCLEI_VOLUMES = 6
"""Dense-nuclei volumes in the promotion comparison: 970 nuclei, where models differ."""


@dataclass
class EvalVolume:
    """A volume with ground truth: stains ``(z, y, x)`` (either may be ``None``), true
    ``cells`` and ``nuclei`` ids (nucleus ``k`` inside cell ``k``; ``cells`` may be the
    nuclei for nucleus-only data), the voxel size if known."""

    name: str
    nucleus: np.ndarray | None
    cytoplasm: np.ndarray | None
    cells: np.ndarray
    nuclei: np.ndarray
    voxel_size: VoxelSize | None = None
    extra: dict[str, object] = field(default_factory=dict)


def synthetic_volumes(
    n: int, *, seed: int, randomized: bool = False, shape_zyx: tuple[int, int, int] = (32, 256, 256)
) -> list[EvalVolume]:
    """``n`` single-timepoint synthetic volumes with ground truth.

    ``randomized=False``: the generator's default settings (the demo's data) with seeds
    ``seed .. seed + n - 1``; ``True``: the randomized parameters used for training (with
    other seeds, so unseen).
    """
    from cellrna_pipeline.core.segmentation.train import _random_synth_config
    from cellrna_pipeline.core.synth import SynthConfig, synthesize

    out = []
    for i in range(n):
        if randomized:
            rng = np.random.default_rng([seed, i, 7])
            config = _random_synth_config(rng, seed * 1000 + i, shape_zyx)
        else:
            config = SynthConfig(
                seed=seed + i, timepoints=1, shape_zyx=shape_zyx, calibration_images=False
            )
        acq = synthesize(config)
        assert acq.image is not None
        out.append(
            EvalVolume(
                name=f"synth{'-random' if randomized else ''} seed {config.seed}",
                nucleus=acq.image[0, 0],
                cytoplasm=acq.image[0, 1],
                cells=acq.cells[0],
                nuclei=acq.nuclei[0],
                voxel_size=acq.voxel_size,
            )
        )
    return out


def dense_nuclei_volumes(
    n: int, *, seed: int, max_shape_zyx: tuple[int, int, int] | None = None
) -> list[EvalVolume]:
    """``n`` dense-nuclei volumes (nucleus stain only, touching nuclei) with the training
    distribution of random settings (``train._random_nuclei_config``) under seeds
    ``seed * 1000 + i``; ``cells`` and ``nuclei`` are both the nuclei. No voxel size is
    attached (the object size is estimated, as for data of unknown scale).
    ``max_shape_zyx`` crops larger volumes (a corner, for quick checks)."""
    from cellrna_pipeline.core.segmentation.train import _random_nuclei_config
    from cellrna_pipeline.core.synth.nuclei import synthesize_nuclei

    out = []
    for i in range(n):
        config = _random_nuclei_config(np.random.default_rng([seed, i, 11]), seed * 1000 + i)
        acq = synthesize_nuclei(config)
        crop = tuple(slice(0, m) for m in max_shape_zyx) if max_shape_zyx else ()
        labels = split_disconnected(acq.labels[crop])
        out.append(
            EvalVolume(
                name=f"synth-nuclei seed {config.seed}",
                nucleus=acq.image[crop],
                cytoplasm=None,
                cells=labels,
                nuclei=labels,
                extra={"anisotropy": acq.anisotropy, "shape": acq.image.shape},
            )
        )
    return out


def promotion_volumes(
    n: int = VALIDATION_VOLUMES,
    n_nuclei: int = VALIDATION_NUCLEI_VOLUMES,
    *,
    shape_zyx: tuple[int, int, int] = (32, 256, 256),
    nuclei_max_shape_zyx: tuple[int, int, int] | None = None,
) -> tuple[list[EvalVolume], list[EvalVolume]]:
    """The promotion comparison's validation set, under ``VALIDATION_SEED``: ``n`` synthetic
    volumes with default and ``n`` with randomized settings (both stains), and ``n_nuclei``
    dense-nuclei volumes. Used by the blocking check and ``cellrna train cells --promote``."""
    volumes = synthetic_volumes(n, seed=VALIDATION_SEED, shape_zyx=shape_zyx)
    volumes += synthetic_volumes(n, seed=VALIDATION_SEED, randomized=True, shape_zyx=shape_zyx)
    nuclei = dense_nuclei_volumes(
        n_nuclei, seed=VALIDATION_SEED, max_shape_zyx=nuclei_max_shape_zyx
    )
    return volumes, nuclei


def semantic_of(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """0 background, 1 nucleus, 2 cytoplasm from instance volumes."""
    sem = np.zeros(cells.shape, np.uint8)
    sem[cells > 0] = SEMANTIC_CYTOPLASM
    sem[nuclei > 0] = SEMANTIC_NUCLEUS
    return sem


def score_volumes(
    volumes: Sequence[EvalVolume], segmentations: Sequence[CellSegmentation]
) -> dict[str, float]:
    """Pooled scores: cell and nucleus AP@0.5 and mAP@0.5:0.95 (3D objects), semantic IoU
    per class and global accuracy, precision/recall of cells at IoU 0.5."""
    cells = instance_scores([v.cells for v in volumes], [s.cells for s in segmentations])
    nuclei = instance_scores([v.nuclei for v in volumes], [s.nuclei for s in segmentations])
    sem = semantic_scores(
        [semantic_of(v.cells, v.nuclei) for v in volumes], [s.semantic for s in segmentations]
    )
    return {
        "cells_ap50": cells.ap50,
        "cells_map": cells.map,
        "cells_precision50": cells.precision(0.5),
        "cells_recall50": cells.recall(0.5),
        "nuclei_ap50": nuclei.ap50,
        "nuclei_map": nuclei.map,
        "iou_background": sem["iou_0"],
        "iou_nucleus": sem["iou_1"],
        "iou_cytoplasm": sem["iou_2"],
        "accuracy": sem["accuracy"],
        "n_true_cells": float(cells.n_true),
        "n_pred_cells": float(cells.n_pred),
    }


def evaluate(
    volumes: Sequence[EvalVolume],
    *,
    model: CellMaskRCNN | None = None,
    config: CellSegmentationConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], list[CellSegmentation]]:
    """Segment every volume (``config.method``) and score the results; also returns them."""
    from cellrna_pipeline.core.segmentation.segment import segment_cells

    segs = []
    for v in volumes:
        segs.append(
            segment_cells(
                v.nucleus, v.cytoplasm, voxel_size=v.voxel_size, config=config, model=model
            )
        )
        if progress is not None:
            progress(f"{v.name}: {segs[-1].n_cells} cells in {segs[-1].info.get('seconds')} s")
    return score_volumes(volumes, segs), segs


PROMOTION_KEYS = ("cells_ap50", "nuclei_ap50", "iou_nucleus", "iou_cytoplasm", "dense_nuclei_ap50")


def promotion_score(metrics: dict[str, float]) -> float:
    """One number to rank models: mean of cell and nucleus AP@0.5, nucleus and cytoplasm
    IoU and, when measured, the AP@0.5 on dense-nuclei volumes."""
    return float(np.mean([metrics[k] for k in PROMOTION_KEYS if k in metrics]))


@dataclass(frozen=True)
class Comparison:
    """Challenger vs champion on the same validation volumes."""

    challenger: dict[str, float]
    champion: dict[str, float]
    margin: float

    @property
    def challenger_score(self) -> float:
        return promotion_score(self.challenger)

    @property
    def champion_score(self) -> float:
        return promotion_score(self.champion)

    @property
    def challenger_wins(self) -> bool:
        return self.challenger_score > self.champion_score + self.margin


def compare_models(
    challenger: CellMaskRCNN,
    champion: CellMaskRCNN | None,
    volumes: Sequence[EvalVolume],
    *,
    nuclei_volumes: Sequence[EvalVolume] = (),
    margin: float = 0.0,
) -> Comparison:
    """Score both models on ``volumes`` (both stains) and ``nuclei_volumes`` (dense
    nuclei, adds ``dense_nuclei_ap50``); a missing champion scores 0 everywhere."""
    from cellrna_pipeline.core.segmentation.segment import CellSegmentationConfig

    cfg = CellSegmentationConfig(method="maskrcnn")

    def scores(model: CellMaskRCNN) -> dict[str, float]:
        out, _ = evaluate(volumes, model=model, config=cfg)
        if nuclei_volumes:
            dense, _ = evaluate(nuclei_volumes, model=model, config=cfg)
            out["dense_nuclei_ap50"] = dense["cells_ap50"]
        return out

    chal = scores(challenger)
    champ = dict.fromkeys(chal, 0.0) if champion is None else scores(champion)
    return Comparison(challenger=chal, champion=champ, margin=margin)
