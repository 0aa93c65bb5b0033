"""Synthetic 3D+t acquisitions with exact ground truth (cells, nuclei, RNA spots, tracks).

>>> acq = synthesize(SynthConfig(timepoints=3))          # doctest: +SKIP
>>> write_acquisition(acq, Path("out/exp1"))             # doctest: +SKIP
"""

from cellrna_pipeline.core.synth.config import (
    LIVE_RNA_DEFAULTS,
    LiveRnaConfig,
    SynthConfig,
    live_rna_config,
)
from cellrna_pipeline.core.synth.generator import (
    LINEAGE_SCHEMA,
    LIVE_SPOT_TABLE_SCHEMA,
    SPOT_TABLE_SCHEMA,
    SynthAcquisition,
    channel_shifts_px,
    illumination_of,
    make_calibration_images,
    spot_table_schema,
    synthesize,
)
from cellrna_pipeline.core.synth.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    acquisition_is_complete,
    read_manifest,
    write_manifest,
)
from cellrna_pipeline.core.synth.write import (
    CALIBRATION_FILES,
    load_ground_truth,
    read_ctc_lineage,
    write_acquisition,
)

__all__ = [
    "CALIBRATION_FILES",
    "LINEAGE_SCHEMA",
    "LIVE_RNA_DEFAULTS",
    "LIVE_SPOT_TABLE_SCHEMA",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "SPOT_TABLE_SCHEMA",
    "LiveRnaConfig",
    "SynthAcquisition",
    "SynthConfig",
    "acquisition_is_complete",
    "channel_shifts_px",
    "illumination_of",
    "live_rna_config",
    "load_ground_truth",
    "make_calibration_images",
    "read_ctc_lineage",
    "read_manifest",
    "spot_table_schema",
    "synthesize",
    "write_acquisition",
    "write_manifest",
]
