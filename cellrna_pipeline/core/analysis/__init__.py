"""Statistics on cells and RNA: per-cell features, track behaviour, RNA localization,
two-channel colocalization. Inputs are label volumes (``zyx``), images (``czyx``) and
polars tables; outputs are polars tables whose column names carry their units."""

from cellrna_pipeline.core.analysis.behavior import experiment_summary, track_behavior
from cellrna_pipeline.core.analysis.colocalization import colocalize
from cellrna_pipeline.core.analysis.features import cell_features
from cellrna_pipeline.core.analysis.localization import rna_localization

__all__ = [
    "cell_features",
    "colocalize",
    "experiment_summary",
    "rna_localization",
    "track_behavior",
]
