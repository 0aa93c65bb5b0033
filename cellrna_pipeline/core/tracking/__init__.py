"""Cell tracking: frame-to-frame LAP with motion prediction, morphology, gap closing, divisions.

>>> dets = detections_from_labels(cells_tzyx, voxel_size=vs)   # doctest: +SKIP
>>> result = track(dets, config=TrackingConfig())               # doctest: +SKIP
>>> tracks_zyx = relabel_masks(cells_tzyx, result)              # doctest: +SKIP

See ``docs/tracking.md`` for the method, the parameters and the output tables.
"""

from cellrna_pipeline.core.tracking.config import TrackingConfig
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
    "TRACKS_TABLE_SCHEMA",
    "TrackingConfig",
    "TrackingResult",
    "ctc_tracks",
    "detections_from_labels",
    "division_problems",
    "measure_objects",
    "napari_graph",
    "relabel_frame",
    "relabel_masks",
    "track",
    "track_jumps",
    "track_labels",
    "tracks_table",
]
