"""The data root (``CELLRNA_HOME``) and where each kind of data lives under it.

Layout (see ``docs/data_root.md``)::

    $CELLRNA_HOME/
      inbox/<acquisition>/          dropped by the microscope (manifest.json marks it complete)
      experiments/<experiment>.json registration record written at ingestion
      raw/<experiment>.ome.zarr     raw_volume
      processed/<experiment>.ome.zarr
      tables/<table>/<experiment>/  per-partition Parquet
      warehouse.duckdb              loaded by one writer, read-only for users
      mlruns/                       MLflow tracking + registry (SQLite + artifacts)
      dagster/                      DAGSTER_HOME for the demo and the UI
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cellrna_pipeline.core.errors import InputError

DEFAULT_HOME = Path("cellrna_home")
"""Default data root, relative to the working directory, when ``CELLRNA_HOME`` is unset."""

# Experiment names become path components and partition keys: no separators, no dots at
# the start (so no "..", no hidden files) and no "__", which separates the composite key.
_EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9])?$")


def validate_experiment_name(name: str) -> str:
    """Return ``name`` if it is a safe experiment name, else raise :class:`InputError`.

    Allowed: 1-64 characters of letters, digits, ``_``, ``.``, ``-``, starting and ending
    with a letter or digit, without ``__`` (reserved as the partition-key separator) and
    without ``..``.
    """
    if not isinstance(name, str) or not _EXPERIMENT_RE.match(name) or "__" in name or ".." in name:
        raise InputError(
            f"invalid experiment name {name!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(no path separators, no '..', no '__')"
        )
    return name


@dataclass(frozen=True)
class DataRoot:
    """Paths under one data root. Creating the object touches nothing on disk."""

    home: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> DataRoot:
        """The data root from ``home``, else ``$CELLRNA_HOME``, else ``./cellrna_home``."""
        value = home if home is not None else os.environ.get("CELLRNA_HOME") or DEFAULT_HOME
        return cls(Path(value).expanduser().absolute())

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def experiments_dir(self) -> Path:
        return self.home / "experiments"

    def experiment_record(self, experiment: str) -> Path:
        return self.experiments_dir / f"{validate_experiment_name(experiment)}.json"

    def raw(self, experiment: str) -> Path:
        return self.home / "raw" / f"{validate_experiment_name(experiment)}.ome.zarr"

    def processed(self, experiment: str) -> Path:
        return self.home / "processed" / f"{validate_experiment_name(experiment)}.ome.zarr"

    def tables(self, table: str, experiment: str) -> Path:
        return self.home / "tables" / table / validate_experiment_name(experiment)

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def mlruns(self) -> Path:
        return self.home / "mlruns"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    def ensure(self) -> DataRoot:
        """Create the top-level folders; :class:`InputError` if the root is not writable."""
        try:
            for p in (self.home, self.inbox, self.experiments_dir, self.home / "raw"):
                p.mkdir(parents=True, exist_ok=True)
            probe = self.home / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InputError(f"data root {self.home} is not writable: {exc.strerror}") from None
        return self


def shipped_models_dir() -> Path:
    """The shipped models: ``$CELLRNA_MODEL_REGISTRY`` or the repository's ``model_registry/``."""
    env = os.environ.get("CELLRNA_MODEL_REGISTRY")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "model_registry"
