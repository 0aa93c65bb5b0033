"""Asset checks, one or more per stage: ``check_<asset>_<property>``."""

import numpy as np
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from cellrna_pipeline.core.io import timepoint_stats
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
    # Chunk by chunk: a 2 GiB volume must not be loaded whole for a check.
    stats = timepoint_stats(data_root.root.raw(experiment), t)
    record = data_root.experiment(experiment)
    std = stats["std"]
    saturated = stats.get("saturated_fraction", np.zeros(len(std)))
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
