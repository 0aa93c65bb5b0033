"""Image I/O: OME-Zarr containers (images, labels, pyramids), ingestion sources, atomic writes.

Axis order is ``t, c, z, y, x``; physical sizes are micrometres, times seconds. See
``docs/storage.md`` for the on-disk layout and the concurrency guarantees.
"""

from cellrna_pipeline.core.io.atomic import (
    all_or_nothing,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    discard,
)
from cellrna_pipeline.core.io.omezarr import (
    NGFF_VERSION,
    auto_chunks_zyx,
    create_image,
    create_labels,
    list_labels,
    open_image,
    preview_level,
    read_image_meta,
    read_label_timepoint,
    read_timepoint,
    timepoint_stats,
    timepoints_written,
    write_image,
    write_label_timepoint,
    write_timepoint,
)
from cellrna_pipeline.core.io.source import OmeZarrSource, Source, open_source
from cellrna_pipeline.core.io.tiff import TiffSource, open_tiff

__all__ = [
    "NGFF_VERSION",
    "OmeZarrSource",
    "Source",
    "TiffSource",
    "all_or_nothing",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "auto_chunks_zyx",
    "create_image",
    "create_labels",
    "discard",
    "list_labels",
    "open_image",
    "open_source",
    "open_tiff",
    "preview_level",
    "read_image_meta",
    "read_label_timepoint",
    "read_timepoint",
    "timepoint_stats",
    "timepoints_written",
    "write_image",
    "write_label_timepoint",
    "write_timepoint",
]
