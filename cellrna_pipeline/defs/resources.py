"""Dagster resources: small interfaces over the data root (and, later, engines)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import ConfigurableResource

from cellrna_pipeline.core.experiment import ExperimentRecord, load_experiment
from cellrna_pipeline.core.paths import DataRoot

if TYPE_CHECKING:
    from cellrna_pipeline.integrations.dask import DaskTarget


class DataRootResource(ConfigurableResource):
    """The data root. Empty ``home`` means ``$CELLRNA_HOME`` (or ``./cellrna_home``)."""

    home: str = ""

    @property
    def root(self) -> DataRoot:
        return DataRoot.from_env(self.home or None)

    def experiment(self, name: str) -> ExperimentRecord:
        return load_experiment(self.root, name)

    def processed_volume(self, partition_key: str) -> tuple[str, int, Path]:
        """``(experiment, timepoint, processed OME-Zarr path)`` of a volume partition."""
        from cellrna_pipeline.defs.partitions import parse_volume_key

        experiment, t = parse_volume_key(partition_key)
        return experiment, t, self.root.processed(experiment)


class DaskResource(ConfigurableResource):
    """Where chunked volume work runs (preprocessing and later stages).

    ``address``: a ``dask.distributed`` scheduler (``tcp://host:8786``), e.g. one that
    dask-jobqueue started on SLURM or that runs on Kubernetes; empty means
    ``$CELLRNA_DASK_ADDRESS``, and if that is unset too, local threads (``threads`` of
    them, 0 = one per core). Workers must see the data root at the same path.
    """

    address: str = ""
    threads: int = 0

    def scheduler(self) -> AbstractContextManager[DaskTarget]:
        """``with dask.scheduler() as target:`` runs dask computations there."""
        from cellrna_pipeline.integrations.dask import dask_scheduler

        return dask_scheduler(self.address or None, threads=self.threads or None)
