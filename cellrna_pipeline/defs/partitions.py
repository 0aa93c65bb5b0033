"""The partition scheme (see ``docs/partitions.md``).

Per-volume assets use one dynamic partitions definition, ``volumes``, whose keys are
composite: ``<experiment>__t<timepoint:04d>`` (``embryo1__t0005``). Experiment-level
assets use a second one, ``experiments``. Both are filled by ingestion only, from the
experiment's own number of timepoints, so a partition that does not exist is never
listed, requested or shown as failed; experiments of different lengths do not share a
timepoint axis (the weakness of a multi-partition experiment x timepoint grid).
"""

from __future__ import annotations

import re

from dagster import DynamicPartitionsDefinition

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import validate_experiment_name

VOLUMES = "volumes"
EXPERIMENTS = "experiments"
volumes_partitions = DynamicPartitionsDefinition(name=VOLUMES)
experiments_partitions = DynamicPartitionsDefinition(name=EXPERIMENTS)

_KEY_RE = re.compile(r"^(?P<experiment>.+)__t(?P<t>\d{4,})$")


def volume_key(experiment: str, timepoint: int) -> str:
    """Composite partition key of one volume: ``volume_key("e1", 5) == "e1__t0005"``."""
    validate_experiment_name(experiment)
    if timepoint < 0:
        raise InputError(f"timepoint must be >= 0, got {timepoint}")
    return f"{experiment}__t{timepoint:04d}"


def parse_volume_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`volume_key`: ``"e1__t0005" -> ("e1", 5)``."""
    match = _KEY_RE.match(key)
    if match is None:
        raise InputError(f"not a volume partition key (expected <experiment>__tNNNN): {key!r}")
    return validate_experiment_name(match["experiment"]), int(match["t"])


def volume_keys(experiment: str, n_timepoints: int) -> list[str]:
    """All volume partition keys of an experiment with ``n_timepoints`` timepoints."""
    return [volume_key(experiment, t) for t in range(n_timepoints)]
