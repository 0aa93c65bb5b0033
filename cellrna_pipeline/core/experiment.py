"""Experiment registration: which source an experiment comes from and what it holds.

An experiment is registered once, at ingestion, as a small JSON record under
``$CELLRNA_HOME/experiments/<name>.json`` (written atomically). The record is what the
Dagster partitions are derived from: one volume partition per timepoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import DataRoot, validate_experiment_name
from cellrna_pipeline.core.types import ImageMeta, VoxelSize


@dataclass(frozen=True)
class ExperimentRecord:
    """What is known about a registered experiment.

    Attributes
    ----------
    name : the experiment name (a safe path component).
    source : absolute path of the acquisition (OME-TIFF, TIFF or OME-Zarr).
    shape_tczyx : full shape of the acquisition.
    dtype : numpy dtype name of the source pixels.
    voxel_size_um : ``(z, y, x)`` in micrometres.
    channel_names : one name per channel.
    frame_interval_s : seconds between timepoints, if known.
    fingerprint : identifies the source content (manifest or size+mtime); a re-drop of the
        same acquisition has the same fingerprint.
    registered_at : UNIX time of registration.
    """

    name: str
    source: str
    shape_tczyx: tuple[int, int, int, int, int]
    dtype: str
    voxel_size_um: tuple[float, float, float]
    channel_names: tuple[str, ...]
    frame_interval_s: float | None
    fingerprint: str
    registered_at: float

    @property
    def n_timepoints(self) -> int:
        return self.shape_tczyx[0]

    @property
    def voxel_size(self) -> VoxelSize:
        return VoxelSize(*self.voxel_size_um)

    @property
    def image_meta(self) -> ImageMeta:
        """The :class:`ImageMeta` of the raw image this experiment is stored as."""
        return ImageMeta(
            shape_tczyx=self.shape_tczyx,
            dtype=self.dtype,
            voxel_size=self.voxel_size,
            channel_names=self.channel_names,
            frame_interval_s=self.frame_interval_s,
        )


def source_fingerprint(path: Path) -> str:
    """A cheap content fingerprint: the manifest text if there is one, else sizes and mtimes."""
    path = Path(path)
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.exists():
        import hashlib

        return "manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = sum(p.stat().st_size for p in files)
    newest = max((p.stat().st_mtime_ns for p in files), default=0)
    return f"stat:{len(files)}:{total}:{newest}"


def resolve_image_path(path: Path) -> Path:
    """The image inside an acquisition folder (named by its manifest), or ``path`` itself."""
    path = Path(path)
    if path.is_dir() and not path.name.endswith(".zarr") and (path / "manifest.json").exists():
        from cellrna_pipeline.core.synth.manifest import read_manifest

        return path / read_manifest(path)["image"]
    return path


def register_experiment(
    root: DataRoot,
    name: str,
    source: Path,
    *,
    voxel_size: VoxelSize | None = None,
    channel_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ExperimentRecord:
    """Validate ``source`` and write the experiment record.

    Parameters
    ----------
    root : the data root.
    name : experiment name (validated: no path separators, no ``..``).
    source : an acquisition folder with ``manifest.json``, an OME-TIFF/TIFF file, or an
        OME-Zarr image.
    voxel_size : overrides the voxel size in the metadata; required where there is none.
    channel_names : one name per channel; overrides the names in the metadata.
    overwrite : replace an existing record with a different source fingerprint.

    Raises
    ------
    InputError : bad name, unreadable source, missing voxel size, or the name is taken by
        a different acquisition (and ``overwrite`` is false).
    """
    from cellrna_pipeline.core.io import open_source

    validate_experiment_name(name)
    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise InputError(f"no such file or folder: {source}")
    image_path = resolve_image_path(source)
    with open_source(image_path, voxel_size=voxel_size, channel_names=channel_names) as src:
        meta = src.meta
    record = ExperimentRecord(
        name=name,
        source=str(image_path),
        shape_tczyx=tuple(int(s) for s in meta.shape_tczyx),  # type: ignore[arg-type]
        dtype=str(meta.dtype),
        voxel_size_um=meta.voxel_size.as_tuple(),
        channel_names=tuple(meta.channel_names),
        frame_interval_s=meta.frame_interval_s,
        fingerprint=source_fingerprint(source),
        registered_at=time.time(),
    )
    path = root.ensure().experiment_record(name)
    if path.exists() and not overwrite:
        old = load_experiment(root, name)
        if old.fingerprint != record.fingerprint or old.source != record.source:
            raise InputError(
                f"experiment {name!r} is already registered from {old.source}; "
                "choose another name or re-ingest with --overwrite"
            )
        return old
    from cellrna_pipeline.core.io import atomic_write_text

    atomic_write_text(path, json.dumps(asdict(record), indent=2))
    return record


def experiment_data_paths(root: DataRoot, name: str) -> list[Path]:
    """Everything stored for one experiment (existing or not): its record, raw and processed
    images, calibration, per-partition tables, CTC export and reports. The warehouse holds
    its rows too (:func:`cellrna_pipeline.integrations.warehouse.load_experiment`)."""
    validate_experiment_name(name)
    tables = root.home / "tables"
    per_table = sorted(d / name for d in tables.iterdir() if d.is_dir()) if tables.is_dir() else []
    return [
        root.experiment_record(name),
        root.raw(name),
        root.processed(name),
        root.home / "calibration" / name,
        root.home / "ctc" / name,
        root.reports / name,
        *per_table,
    ]


def load_experiment(root: DataRoot, name: str) -> ExperimentRecord:
    """Read an experiment record; :class:`InputError` naming the known ones if absent."""
    path = root.experiment_record(name)
    if not path.exists():
        known = list_experiments(root)
        raise InputError(f"unknown experiment {name!r}; known experiments: {known or 'none'}")
    try:
        data = json.loads(path.read_text())
        data["shape_tczyx"] = tuple(data["shape_tczyx"])
        data["voxel_size_um"] = tuple(data["voxel_size_um"])
        data["channel_names"] = tuple(data["channel_names"])
        return ExperimentRecord(**data)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"corrupt experiment record {path}: {exc}") from None


def list_experiments(root: DataRoot) -> list[str]:
    """Names of the registered experiments, sorted."""
    if not root.experiments_dir.exists():
        return []
    return sorted(p.stem for p in root.experiments_dir.glob("*.json"))
