"""Cell tracking: frame-to-frame LAP with motion prediction, morphology, gap closing, divisions.

>>> dets = detections_from_labels(cells_tzyx, voxel_size=vs)   # doctest: +SKIP
>>> result = track(dets, config=TrackingConfig())               # doctest: +SKIP
>>> tracks_zyx = relabel_masks(cells_tzyx, result)              # doctest: +SKIP

See ``docs/tracking.md`` for the method, the parameters and the output tables.
"""

from cellrna_pipeline.core.tracking.config import TrackingConfig
from cellrna_pipeline.core.tracking.embedding import (
    SpotEmbedder,
    SpotEmbeddingConfig,
    load_spot_embedder,
)
from cellrna_pipeline.core.tracking.features import (
    DETECTION_SCHEMA,
    detections_from_labels,
    measure_objects,
)
from cellrna_pipeline.core.tracking.outputs import (
    CTC_TRACKS_SCHEMA,
    TRACKS_TABLE_SCHEMA,
    ctc_tracks,
    napari_graph,
    relabel_frame,
    relabel_masks,
    tracks_table,
)
from cellrna_pipeline.core.tracking.spots import (
    SPOT_APPEARANCE_SIGMA,
    SPOT_TRACKING_DEFAULTS,
    SPOT_TRACKS_SCHEMA,
    spot_detections,
    spot_tracking_config,
    track_spots,
)
from cellrna_pipeline.core.tracking.tracker import (
    LINEAGE_SCHEMA,
    TrackingResult,
    track,
    track_labels,
)
from cellrna_pipeline.core.tracking.validate import division_problems, track_jumps

__all__ = [
    "CTC_TRACKS_SCHEMA",
    "DETECTION_SCHEMA",
    "LINEAGE_SCHEMA",
    "SPOT_APPEARANCE_SIGMA",
    "SPOT_TRACKING_DEFAULTS",
    "SPOT_TRACKS_SCHEMA",
    "TRACKS_TABLE_SCHEMA",
    "SpotEmbedder",
    "SpotEmbeddingConfig",
    "TrackingConfig",
    "TrackingResult",
    "ctc_tracks",
    "detections_from_labels",
    "division_problems",
    "load_spot_embedder",
    "measure_objects",
    "napari_graph",
    "relabel_frame",
    "relabel_masks",
    "spot_detections",
    "spot_tracking_config",
    "track",
    "track_jumps",
    "track_labels",
    "track_spots",
    "tracks_table",
]
