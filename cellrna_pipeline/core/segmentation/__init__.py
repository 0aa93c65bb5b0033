"""Cell and nucleus segmentation: Mask R-CNN with a semantic head, and a classical baseline.

>>> seg = segment_cells(nucleus_zyx, cytoplasm_zyx, voxel_size=vs, model=model)  # doctest: +SKIP
>>> seg.cells, seg.nuclei, seg.semantic                                            # doctest: +SKIP

Modules: ``base`` (result type, normalization, size estimate, clean-up), ``classical``
(threshold + seeded watershed), ``model`` (the Mask R-CNN builder and model folders),
``inference`` (per-slice tiled inference and 3D assembly), ``train`` (datasets, COCO,
augmentation, training loop, DDP), ``metrics`` (AP, semantic IoU). Importing this package
does not import torch; ``model``/``train`` do.
"""

from cellrna_pipeline.core.segmentation.base import (
    CANONICAL_NUCLEUS_DIAMETER_PX,
    SEMANTIC_CLASSES,
    CellSegmentation,
    estimate_diameter_px,
)
from cellrna_pipeline.core.segmentation.classical import ClassicalConfig, segment_classical
from cellrna_pipeline.core.segmentation.inference import (
    InferenceConfig,
    predict_tiled,
    segment_volume,
    stitch_slices,
)
from cellrna_pipeline.core.segmentation.metrics import instance_scores, semantic_scores
from cellrna_pipeline.core.segmentation.segment import CellSegmentationConfig, segment_cells

__all__ = [
    "CANONICAL_NUCLEUS_DIAMETER_PX",
    "SEMANTIC_CLASSES",
    "CellSegmentation",
    "CellSegmentationConfig",
    "ClassicalConfig",
    "InferenceConfig",
    "estimate_diameter_px",
    "instance_scores",
    "predict_tiled",
    "segment_cells",
    "segment_classical",
    "segment_volume",
    "semantic_scores",
    "stitch_slices",
]
