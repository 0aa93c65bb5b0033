"""Where preprocessing results live under the data root, written atomically.

::

    $CELLRNA_HOME/
      calibration/<experiment>/calibration.json       sources, channel shifts, details;
                               dark-<digest>.tif      (c, y, x) float32 (names from the JSON)
                               flat-<digest>.tif      (c, y, x) float32, mean 1 per channel
      tables/drift_shifts/<experiment>/drift_shifts.parquet    one row per timepoint
      tables/preprocessing/<experiment>/t0005.parquet          one row per channel
      processed/<experiment>.ome.zarr                 preprocessed_volume (float32)

The arrays are written first under content-derived names, then the JSON that names them
replaces the old one (``os.replace``), then files no longer named are removed: a reader
sees the old or the new calibration, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io.atomic import atomic_path, atomic_write_text
from cellrna_pipeline.core.paths import DataRoot, validate_experiment_name
from cellrna_pipeline.core.preprocess.calibration import CameraCalibration
from cellrna_pipeline.core.preprocess.drift import DRIFT_SCHEMA

__all__ = [
    "PREPROCESSING_SCHEMA",
    "acquisition_calibration_images",
    "calibration_dir",
    "drift_table_path",
    "load_calibration",
    "load_drift_table",
    "preprocessing_table_path",
    "read_tiff",
    "save_calibration",
    "save_drift_table",
    "save_preprocessing_table",
]

CALIBRATION_JSON = "calibration.json"

#: Columns of the per-timepoint preprocessing table (one row per channel).
PREPROCESSING_SCHEMA: dict[str, pl.DataType] = {
    "timepoint": pl.Int32(),
    "channel": pl.String(),
    "p_low": pl.Float64(),
    "p_high": pl.Float64(),
    "value_low": pl.Float64(),
    "value_high": pl.Float64(),
    "shift_z_px": pl.Float64(),
    "shift_y_px": pl.Float64(),
    "shift_x_px": pl.Float64(),
    "denoise": pl.String(),
    "seconds": pl.Float64(),
}


def calibration_dir(root: DataRoot, experiment: str) -> Path:
    """``$CELLRNA_HOME/calibration/<experiment>``."""
    return root.home / "calibration" / validate_experiment_name(experiment)


def drift_table_path(root: DataRoot, experiment: str) -> Path:
    """``tables/drift_shifts/<experiment>/drift_shifts.parquet``."""
    return root.tables("drift_shifts", experiment) / "drift_shifts.parquet"


def preprocessing_table_path(root: DataRoot, experiment: str, t: int) -> Path:
    """``tables/preprocessing/<experiment>/t<tttt>.parquet``."""
    return root.tables("preprocessing", experiment) / f"t{int(t):04d}.parquet"


def _write_array(folder: Path, stem: str, array: np.ndarray) -> str:
    import tifffile

    data = np.ascontiguousarray(array, dtype=np.float32)
    digest = hashlib.sha1(data.tobytes()).hexdigest()[:12]
    name = f"{stem}-{digest}.tif"
    target = folder / name
    if not target.exists():
        with atomic_path(target) as tmp:
            tifffile.imwrite(
                tmp,
                data,
                metadata={"axes": "CYX"},
                compression="zlib",
                compressionargs={"level": 1},
            )
    return name


def save_calibration(root: DataRoot, experiment: str, calibration: CameraCalibration) -> Path:
    """Write an experiment's calibration (arrays, then the JSON); returns the JSON path."""
    folder = calibration_dir(root, experiment)
    folder.mkdir(parents=True, exist_ok=True)
    dark = _write_array(folder, "dark", calibration.dark_cyx)
    flat = _write_array(folder, "flat", calibration.flat_cyx)
    doc: dict[str, Any] = {
        "format": "cellrna-calibration/1",
        "experiment": experiment,
        "channel_names": list(calibration.channel_names),
        "shape_yx": list(calibration.shape_yx),
        "dark": dark,
        "flat": flat,
        "channel_shifts_zyx_px": calibration.channel_shifts_zyx_px.round(6).tolist(),
        "sources": calibration.sources,
        "details": calibration.details,
        "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    path = folder / CALIBRATION_JSON
    atomic_write_text(path, json.dumps(doc, indent=2, default=float))
    for stale in folder.glob("*.tif"):
        if stale.name not in (dark, flat):
            stale.unlink(missing_ok=True)
    return path


def load_calibration(root: DataRoot, experiment: str) -> CameraCalibration:
    """Read an experiment's calibration; :class:`InputError` if it was not made yet."""
    import tifffile

    folder = calibration_dir(root, experiment)
    path = folder / CALIBRATION_JSON
    if not path.exists():
        raise InputError(
            f"experiment {experiment!r} has no camera calibration; materialize camera_calibration first"
        )
    try:
        doc = json.loads(path.read_text())
        return CameraCalibration(
            dark_cyx=tifffile.imread(folder / doc["dark"]).astype(np.float32),
            flat_cyx=tifffile.imread(folder / doc["flat"]).astype(np.float32),
            channel_shifts_zyx_px=np.asarray(doc["channel_shifts_zyx_px"], dtype=np.float64),
            channel_names=tuple(doc["channel_names"]),
            sources=dict(doc.get("sources", {})),
            details=dict(doc.get("details", {})),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"corrupt calibration {path}: {exc}") from None


def acquisition_calibration_images(image_path: str | Path) -> dict[str, Path]:
    """Calibration images shipped with an acquisition, by kind (``dark``, ``flat``, ``beads``).

    Looks at the ``"calibration"`` entry of the ``manifest.json`` next to the image (the
    acquisition folder), else for ``calibration/dark.tif``, ``flat.tif``, ``beads.tif``
    there. Missing kinds are left out.
    """
    folder = Path(image_path).parent
    found: dict[str, Path] = {}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text()).get("calibration") or {}
        except (OSError, ValueError):
            listed = {}
        if isinstance(listed, dict):
            for kind, rel in listed.items():
                p = folder / str(rel)
                if (
                    kind in ("dark", "flat", "beads")
                    and p.is_file()
                    and ".." not in Path(rel).parts
                ):
                    found[kind] = p
    for kind in ("dark", "flat", "beads"):
        p = folder / "calibration" / f"{kind}.tif"
        if kind not in found and p.is_file():
            found[kind] = p
    return found


def read_tiff(path: Path, crop: tuple[slice, ...] | None = None) -> np.ndarray:
    """A TIFF (or a crop of it, trailing axes) read through tifffile's zarr store, so a
    crop of a large file reads only its pages; :class:`InputError` if unreadable."""
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            store = tif.series[0].aszarr()
            array = zarr.open(store, mode="r")
            if not isinstance(array, zarr.Array):
                raise TypeError("not a single image")
            if crop is None:
                return np.asarray(array[...])
            lead = (slice(None),) * (array.ndim - len(crop))
            return np.asarray(array[lead + tuple(crop)])
    except Exception as exc:
        raise InputError(
            f"{path}: cannot read calibration image ({type(exc).__name__}: {exc})"
        ) from None


def save_drift_table(root: DataRoot, experiment: str, table: pl.DataFrame) -> Path:
    """Write the drift table (Parquet, atomic)."""
    if set(table.columns) != set(DRIFT_SCHEMA):
        raise InputError(f"drift table needs columns {list(DRIFT_SCHEMA)}, got {table.columns}")
    path = drift_table_path(root, experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.select(list(DRIFT_SCHEMA)).write_parquet(tmp)
    return path


def load_drift_table(root: DataRoot, experiment: str) -> pl.DataFrame:
    """Read the drift table; :class:`InputError` if it was not made yet."""
    path = drift_table_path(root, experiment)
    if not path.exists():
        raise InputError(
            f"experiment {experiment!r} has no drift table; materialize drift_shifts first"
        )
    return pl.read_parquet(path)


def save_preprocessing_table(root: DataRoot, experiment: str, t: int, table: pl.DataFrame) -> Path:
    """Write one timepoint's preprocessing record (Parquet, atomic)."""
    path = preprocessing_table_path(root, experiment, t)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.select(list(PREPROCESSING_SCHEMA)).cast(PREPROCESSING_SCHEMA).write_parquet(tmp)  # type: ignore[arg-type]
    return path
