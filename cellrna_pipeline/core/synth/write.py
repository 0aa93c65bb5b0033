"""Write a synthetic acquisition to disk, and read its ground truth back.

Layout of ``out_dir``::

    image.ome.tif                      (t, c, z, y, x) uint16 OME-TIFF, physical sizes in um
    ground_truth/cells.tif             (t, z, y, x) uint32 cell labels
    ground_truth/nuclei.tif            (t, z, y, x) uint32 nucleus labels (= cell id)
    ground_truth/spots.tif             (t, r, z, y, x) uint32 spot labels per RNA channel
    ground_truth/spots.csv             the spot table
    ground_truth/drift.csv             timepoint, dz_um, dy_um, dx_um, dz_px, dy_px, dx_px
    ground_truth/TRA/man_track000.tif  (z, y, x) uint16 cell labels per frame (CTC)
    ground_truth/TRA/man_track.txt     CTC lineage, lines "L B E P"
    ground_truth/channel_shifts.csv    channel, dz_px, dy_px, dx_px, dz_nm, dy_nm, dx_nm
    ground_truth/flat_field.tif        (y, x) float32 lateral flat-field of mean 1
    calibration/dark.tif               (n, y, x) uint16 dark frames          } when the config
    calibration/flat.tif               (c, y, x) uint16 uniform-slide images } has calibration
    calibration/beads.tif              (c, z, y, x) uint16 bead volume       } images
    manifest.json                      written last, atomically (see manifest.py)

A live-RNA acquisition (``config.live_rna`` set) has a ``track_id`` column in
``spots.csv`` and ``"live_rna": true`` in the manifest.

The manifest lists the calibration images under ``"calibration"``:
``{"dark": "calibration/dark.tif", "flat": "calibration/flat.tif", "beads": ...}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import tifffile

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth.config import SynthConfig
from cellrna_pipeline.core.synth.generator import (
    LINEAGE_SCHEMA,
    SynthAcquisition,
    illumination_of,
    spot_table_schema,
)
from cellrna_pipeline.core.synth.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    file_sizes,
    read_manifest,
    write_manifest,
)
from cellrna_pipeline.core.types import VoxelSize

IMAGE_NAME = "image.ome.tif"
GT_DIR = "ground_truth"
CTC_DIR = f"{GT_DIR}/TRA"
CTC_LINEAGE = f"{CTC_DIR}/man_track.txt"
DRIFT_COLUMNS = ("timepoint", "dz_um", "dy_um", "dx_um", "dz_px", "dy_px", "dx_px")
CALIBRATION_DIR = "calibration"
CALIBRATION_FILES = {
    "dark": f"{CALIBRATION_DIR}/dark.tif",
    "flat": f"{CALIBRATION_DIR}/flat.tif",
    "beads": f"{CALIBRATION_DIR}/beads.tif",
}


def _write_labels(path: Path, labels: np.ndarray, axes: str | None = None) -> None:
    """Label volumes compress ~100x with fast deflate."""
    tifffile.imwrite(
        path,
        labels,
        metadata={"axes": axes} if axes else {},
        compression="zlib",
        compressionargs={"level": 1},
    )


def ctc_mask_name(t: int) -> str:
    """Relative path of the CTC tracking mask of frame ``t``."""
    return f"{CTC_DIR}/man_track{t:03d}.tif"


def write_acquisition(acq: SynthAcquisition, out_dir: Path) -> Path:
    """Write ``acq`` (image, ground truth, manifest) into ``out_dir``; returns ``out_dir``.

    Any earlier manifest is removed first and the new one is written last and atomically,
    so the folder only looks complete once every file is in place.
    """
    if acq.image is None:
        raise InputError("this acquisition has no image (loaded without it); cannot write it")
    out_dir = Path(out_dir)
    (out_dir / CTC_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    n_t = acq.cells.shape[0]
    if acq.cells.max(initial=0) > np.iinfo(np.uint16).max:
        raise InputError(f"{int(acq.cells.max())} cell labels do not fit the CTC uint16 masks")
    vz, vy, vx = acq.voxel_size.as_tuple()
    written: list[str] = []

    tifffile.imwrite(
        out_dir / IMAGE_NAME,
        acq.image,
        ome=True,
        photometric="minisblack",
        metadata={
            "axes": "TCZYX",
            "PhysicalSizeX": vx,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": vy,
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeZ": vz,
            "PhysicalSizeZUnit": "µm",
            "TimeIncrement": acq.frame_interval_s,
            "TimeIncrementUnit": "s",
            "Channel": {"Name": list(acq.channel_names)},
        },
    )
    written.append(IMAGE_NAME)

    for name, array, axes in (
        ("cells.tif", acq.cells, "TZYX"),
        ("nuclei.tif", acq.nuclei, "TZYX"),
        ("spots.tif", acq.spots, "TCZYX"),
    ):
        rel = f"{GT_DIR}/{name}"
        _write_labels(out_dir / rel, array, axes)
        written.append(rel)

    rel = f"{GT_DIR}/spots.csv"
    acq.spot_table.write_csv(out_dir / rel)
    written.append(rel)

    drift_px = acq.drift_zyx_px
    drift = pl.DataFrame(
        {
            "timepoint": np.arange(n_t, dtype=np.int32),
            "dz_um": acq.drift_zyx_um[:, 0],
            "dy_um": acq.drift_zyx_um[:, 1],
            "dx_um": acq.drift_zyx_um[:, 2],
            "dz_px": drift_px[:, 0],
            "dy_px": drift_px[:, 1],
            "dx_px": drift_px[:, 2],
        }
    )
    rel = f"{GT_DIR}/drift.csv"
    drift.write_csv(out_dir / rel)
    written.append(rel)

    shifts_px = acq.channel_shifts_zyx_px
    shifts_nm = shifts_px * 1000.0 * np.asarray(acq.voxel_size.as_tuple())
    rel = f"{GT_DIR}/channel_shifts.csv"
    pl.DataFrame(
        {
            "channel": list(acq.channel_names),
            "dz_px": shifts_px[:, 0],
            "dy_px": shifts_px[:, 1],
            "dx_px": shifts_px[:, 2],
            "dz_nm": shifts_nm[:, 0],
            "dy_nm": shifts_nm[:, 1],
            "dx_nm": shifts_nm[:, 2],
        }
    ).write_csv(out_dir / rel)
    written.append(rel)
    flat_field = acq.flat_field_yx
    if flat_field is not None:
        rel = f"{GT_DIR}/flat_field.tif"
        tifffile.imwrite(out_dir / rel, flat_field.astype(np.float32))
        written.append(rel)

    calibration = {}
    for key, images, axes in (
        ("dark", acq.calibration_dark, "QYX"),
        ("flat", acq.calibration_flat, "CYX"),
        ("beads", acq.calibration_beads, "CZYX"),
    ):
        if images is None:
            continue
        rel = CALIBRATION_FILES[key]
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(
            out_dir / rel,
            images,
            metadata={"axes": axes},
            compression="zlib",
            compressionargs={"level": 1},
        )
        written.append(rel)
        calibration[key] = rel

    for t in range(n_t):
        rel = ctc_mask_name(t)
        _write_labels(out_dir / rel, acq.cells[t].astype(np.uint16))
        written.append(rel)
    lines = [f"{lab} {b} {e} {p}" for lab, b, e, p in acq.lineage.iter_rows()]
    (out_dir / CTC_LINEAGE).write_text("".join(line + "\n" for line in lines), encoding="ascii")
    written.append(CTC_LINEAGE)

    manifest = {
        "format": MANIFEST_FORMAT,
        "image": IMAGE_NAME,
        "files": file_sizes(out_dir, written),
        "voxel_size_um": [vz, vy, vx],
        "channel_names": list(acq.channel_names),
        "timepoints": n_t,
        "frame_interval_s": acq.frame_interval_s,
        # the live-RNA settings only when set: static acquisitions keep their manifest bytes
        "generator": acq.config.model_dump(
            mode="json", exclude={"live_rna"} if acq.config.live_rna is None else None
        ),
    }
    if acq.config.live_rna is not None:
        manifest["live_rna"] = True  # spots persist over frames: spot tracking applies
    if calibration:
        manifest["calibration"] = calibration
    write_manifest(out_dir, manifest)
    return out_dir


def read_ctc_lineage(path: Path) -> pl.DataFrame:
    """A CTC ``L B E P`` text file as a table with :data:`LINEAGE_SCHEMA` columns."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise InputError(f"{path}:{n}: expected 'L B E P' (4 integers), got {line!r}")
        rows.append(tuple(int(p) for p in parts))
    return pl.DataFrame(rows, schema=LINEAGE_SCHEMA, orient="row")


def load_ground_truth(out_dir: Path, *, with_image: bool = True) -> SynthAcquisition:
    """Read what :func:`write_acquisition` wrote back into a :class:`SynthAcquisition`.

    ``with_image=False`` skips the (large) image and leaves ``image`` as ``None``.
    Raises :class:`InputError` when the manifest is missing or invalid.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if "generator" not in manifest:
        raise InputError(
            f"{out_dir} was not written by the synthetic generator (no 'generator' in the manifest)"
        )
    config = SynthConfig.model_validate(manifest["generator"])
    gt = out_dir / GT_DIR
    calibration = {
        key: tifffile.imread(out_dir / rel)
        for key, rel in (manifest.get("calibration") or {}).items()
        if key in CALIBRATION_FILES
    }
    spot_table = pl.read_csv(gt / "spots.csv", schema=spot_table_schema(config))
    drift = pl.read_csv(gt / "drift.csv")
    return SynthAcquisition(
        image=tifffile.imread(out_dir / manifest["image"]) if with_image else None,
        channel_names=tuple(manifest["channel_names"]),
        cells=tifffile.imread(gt / "cells.tif"),
        nuclei=tifffile.imread(gt / "nuclei.tif"),
        spots=tifffile.imread(gt / "spots.tif"),
        spot_table=spot_table,
        lineage=read_ctc_lineage(out_dir / CTC_LINEAGE),
        drift_zyx_um=drift.select("dz_um", "dy_um", "dx_um").to_numpy().astype(np.float64),
        voxel_size=VoxelSize.from_um(manifest["voxel_size_um"]),
        frame_interval_s=float(manifest["frame_interval_s"]),
        config=config,
        illumination=illumination_of(config),
        calibration_dark=calibration.get("dark"),
        calibration_flat=calibration.get("flat"),
        calibration_beads=calibration.get("beads"),
    )
