"""Dagster resources: small interfaces over the data root (and, later, engines)."""

from __future__ import annotations

from dagster import ConfigurableResource

from cellrna_pipeline.core.experiment import ExperimentRecord, load_experiment
from cellrna_pipeline.core.paths import DataRoot


class DataRootResource(ConfigurableResource):
    """The data root. Empty ``home`` means ``$CELLRNA_HOME`` (or ``./cellrna_home``)."""

    home: str = ""

    @property
    def root(self) -> DataRoot:
        return DataRoot.from_env(self.home or None)

    def experiment(self, name: str) -> ExperimentRecord:
        return load_experiment(self.root, name)
