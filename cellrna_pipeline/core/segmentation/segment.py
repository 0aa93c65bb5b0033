"""One entry point for both methods: :func:`segment_cells`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from cellrna_pipeline.core.config import StrictModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.segmentation.base import (
    CELL_TO_NUCLEUS_DIAMETER,
    CellSegmentation,
    anisotropy_of,
    check_channel,
    estimate_diameter_px,
)
from cellrna_pipeline.core.segmentation.classical import ClassicalConfig, segment_classical
from cellrna_pipeline.core.segmentation.inference import InferenceConfig
from cellrna_pipeline.core.types import VoxelSize

if TYPE_CHECKING:
    from collections.abc import Callable

    from cellrna_pipeline.core.segmentation.model import CellMaskRCNN


class CellSegmentationConfig(StrictModel):
    """How to segment cells.

    Attributes
    ----------
    method : ``"maskrcnn"`` (needs a model) or ``"classical"`` (threshold + watershed).
    diameter_px : lateral nucleus diameter in pixels (cell diameter for a cell-stain-only
        image); overrides everything else.
    nucleus_diameter_um : nucleus diameter in micrometres (used with the voxel size).
        Without either, the size is estimated from the image.
    classical, inference : settings of each method.
    """

    method: Literal["maskrcnn", "classical"] = "maskrcnn"
    diameter_px: float | None = Field(default=None, gt=0)
    nucleus_diameter_um: float | None = Field(default=None, gt=0)
    classical: ClassicalConfig = ClassicalConfig()
    inference: InferenceConfig = InferenceConfig()


def resolve_diameter_px(
    nucleus: np.ndarray | None,
    cytoplasm: np.ndarray | None,
    *,
    voxel_size: VoxelSize | None,
    config: CellSegmentationConfig,
) -> tuple[float, str]:
    """Lateral object diameter (px) to use and where it came from.

    Nucleus diameter when a nucleus stain is given, else cell diameter. Order: the
    ``diameter_px`` hint, ``nucleus_diameter_um`` with the voxel size, the estimate.
    """
    if config.diameter_px is not None:
        return float(config.diameter_px), "hint"
    if config.nucleus_diameter_um is not None and voxel_size is not None:
        d = config.nucleus_diameter_um / ((voxel_size.y_um + voxel_size.x_um) / 2)
        return float(d if nucleus is not None else d * CELL_TO_NUCLEUS_DIAMETER), "voxel_size"
    if nucleus is not None:
        return estimate_diameter_px(nucleus), "estimated"
    assert cytoplasm is not None
    return estimate_diameter_px(cytoplasm, search_scale=False), "estimated"


def segment_cells(
    nucleus: Any | None,
    cytoplasm: Any | None = None,
    *,
    voxel_size: VoxelSize | None = None,
    config: CellSegmentationConfig | None = None,
    model: CellMaskRCNN | None = None,
    progress: Callable[[str], None] | None = None,
) -> CellSegmentation:
    """Segment cells and nuclei in one ``(z, y, x)`` volume or ``(y, x)`` image.

    Parameters
    ----------
    nucleus : nuclear stain, ``(z, y, x)`` or ``(y, x)``, any integer or float dtype and
        intensity range; ``None`` if the image has only a cell stain.
    cytoplasm : cell (cytoplasm/membrane) stain of the same shape, or ``None``.
    voxel_size : micrometres; gives the anisotropy (z step / lateral pixel) and, with
        ``config.nucleus_diameter_um``, the object scale. ``None``: isotropic, size
        estimated.
    config : :class:`CellSegmentationConfig`.
    model : the cell Mask R-CNN (required for ``method="maskrcnn"``).
    progress : called with short progress messages.

    Returns
    -------
    CellSegmentation with ``cells``, ``nuclei`` (uint32) and ``semantic`` (uint8) of the
    input's shape as ``(z, y, x)`` (a 2D input gives ``z = 1``).

    Raises
    ------
    InputError
        No stain given, shapes differ, bad dtype, NaN, constant or blank image.
    """
    cfg = config or CellSegmentationConfig()
    if nucleus is None and cytoplasm is None:
        raise InputError("give a nucleus stain, a cell stain, or both")
    nuc = check_channel(nucleus, name="nucleus channel") if nucleus is not None else None
    cyt = check_channel(cytoplasm, name="cell channel") if cytoplasm is not None else None
    if nuc is not None and cyt is not None and nuc.shape != cyt.shape:
        raise InputError(f"nucleus and cell channels differ in shape: {nuc.shape} vs {cyt.shape}")
    diameter, source = resolve_diameter_px(nuc, cyt, voxel_size=voxel_size, config=cfg)
    if not diameter > 0:
        raise InputError(f"object diameter must be positive, got {diameter}")
    anisotropy = anisotropy_of(voxel_size)
    if cfg.method == "classical":
        nucleus_d = diameter if nuc is not None else diameter / CELL_TO_NUCLEUS_DIAMETER
        result = segment_classical(
            nuc, cyt, diameter_px=nucleus_d, anisotropy=anisotropy, config=cfg.classical
        )
    else:
        if model is None:
            raise InputError("method 'maskrcnn' needs a model; load one or use method 'classical'")
        from cellrna_pipeline.core.segmentation.inference import maskrcnn_predictor, segment_volume

        result = segment_volume(
            nuc,
            cyt,
            maskrcnn_predictor(model, min_score=cfg.inference.score_threshold),
            diameter_px=diameter,
            anisotropy=anisotropy,
            canonical_px=model.config.canonical_nucleus_diameter_px,
            channels=model.config.input_channels,
            z_context=model.config.z_context,
            config=cfg.inference,
            progress=progress,
        )
        result.info["method"] = "maskrcnn"
    result.info["diameter_source"] = source
    return result
