"""RNA spots: classical 3D detection, instance masks, cell/compartment assignment, scoring.

>>> result = detect_spots(volume_zyx, voxel_size=VoxelSize(0.6, 0.15, 0.15))  # doctest: +SKIP
>>> spots = assign_spots(result.table, cells=cells, nuclei=nuclei, voxel_size=vs)  # doctest: +SKIP

The tiny-object Mask R-CNN lives in :mod:`cellrna_pipeline.core.spots.maskrcnn` (imports
torch; not loaded here). See ``docs/spots.md``.
"""

from cellrna_pipeline.core.spots.assign import (
    COMPARTMENTS,
    assign_spots,
    nucleus_surface_distance_um,
)
from cellrna_pipeline.core.spots.config import (
    DEFAULT_SPOT_RADIUS_NM,
    SpotDetectionConfig,
    psf_sigma_vox,
)
from cellrna_pipeline.core.spots.detect import (
    DETECTION_SCHEMA,
    SpotDetection,
    as_zyx_array,
    detect_spots,
)
from cellrna_pipeline.core.spots.labels import RasterizedSpots, rasterize_spots
from cellrna_pipeline.core.spots.metrics import SpotMatch, match_spots

__all__ = [
    "COMPARTMENTS",
    "DEFAULT_SPOT_RADIUS_NM",
    "DETECTION_SCHEMA",
    "RasterizedSpots",
    "SpotDetection",
    "SpotDetectionConfig",
    "SpotMatch",
    "as_zyx_array",
    "assign_spots",
    "detect_spots",
    "match_spots",
    "nucleus_surface_distance_um",
    "psf_sigma_vox",
    "rasterize_spots",
]
