"""Asset checks, one or more per stage: ``check_<asset>_<property>``."""

import numpy as np
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from cellrna_pipeline.core.io import read_timepoint
from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.partitions import parse_volume_key
from cellrna_pipeline.defs.resources import DataRootResource


@asset_check(
    asset=raw_volume, description="Every channel has signal: not constant, not all saturated."
)
def check_raw_volume_has_signal(
    context: AssetCheckExecutionContext, data_root: DataRootResource
) -> AssetCheckResult:
    experiment, t = parse_volume_key(context.partition_key)
    volume = read_timepoint(data_root.root.raw(experiment), t)
    record = data_root.experiment(experiment)
    flat = volume.reshape(volume.shape[0], -1)
    std = flat.std(axis=1)
    saturated = (
        (flat == np.iinfo(volume.dtype).max).mean(axis=1)
        if np.issubdtype(volume.dtype, np.integer)
        else np.zeros(len(flat))
    )
    bad = [
        name
        for name, s, sat in zip(record.channel_names, std, saturated, strict=True)
        if s == 0 or sat > 0.05
    ]
    return AssetCheckResult(
        passed=not bad,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "std_per_channel": str(np.round(std, 2).tolist()),
            "saturated_fraction": str(np.round(saturated, 4).tolist()),
            "bad_channels": ", ".join(bad) or "none",
        },
    )
