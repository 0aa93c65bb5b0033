"""Camera calibration against the generator's truth: vignetting, offset, chromatic shifts;
calibration images on disk; the calibration store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.core.preprocess import (
    DRIFT_SCHEMA,
    CalibrationConfig,
    CameraCalibration,
    apply_calibration,
    estimate_camera_calibration,
    estimate_camera_offset,
    estimate_channel_shifts,
)
from cellrna_pipeline.core.preprocess.store import (
    acquisition_calibration_images,
    load_calibration,
    load_drift_table,
    read_tiff,
    save_calibration,
    save_drift_table,
)
from cellrna_pipeline.core.synth import (
    SynthAcquisition,
    SynthConfig,
    load_ground_truth,
    read_manifest,
    synthesize,
    write_acquisition,
)
from cellrna_pipeline.core.types import VoxelSize

SHIFTS_NM = ((0.0, 0.0, 0.0), (150.0, 60.0, -45.0), (-200.0, 90.0, 30.0))


@pytest.fixture(scope="module")
def acq() -> SynthAcquisition:
    """Two frames of the default field with vignetting and chromatic shifts (~1 s)."""
    return synthesize(SynthConfig(seed=0, timepoints=2, channel_shift_zyx_nm=SHIFTS_NM))


def _max_rel_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(estimate / truth - 1.0).max())


def test_generator_applies_the_configured_channel_shift(acq: SynthAcquisition) -> None:
    np.testing.assert_allclose(
        acq.channel_shifts_zyx_px[1], [0.15 / 0.6, 0.06 / 0.15, -0.045 / 0.15], atol=1e-12
    )
    assert acq.calibration_beads is not None and acq.flat_field_yx is not None
    # bead centroids move by the shift between channels (a check of the generator itself)
    beads = acq.calibration_beads.astype(np.float32)
    beads -= np.median(beads, axis=(1, 2, 3), keepdims=True)  # offset + background
    labels, n = ndi.label(beads[0] > 600)
    assert n >= 10
    moves = []
    for z, y, x in ndi.center_of_mass(beads[0], labels, range(1, n + 1)):
        lo = np.round([z, y, x]).astype(int) - (2, 5, 5)
        if (lo < 0).any() or (lo + (5, 11, 11) > beads.shape[1:]).any():
            continue
        win = tuple(slice(a, a + w) for a, w in zip(lo, (5, 11, 11), strict=True))
        c0, c2 = (np.array(ndi.center_of_mass(np.maximum(beads[c][win], 0))) for c in (0, 2))
        moves.append(c2 - c0)
    np.testing.assert_allclose(np.median(moves, axis=0), acq.channel_shifts_zyx_px[2], atol=0.1)


def test_calibration_images_recover_vignetting_and_channel_shifts(acq: SynthAcquisition) -> None:
    cal = estimate_camera_calibration(
        channel_names=acq.channel_names,
        shape_yx=(256, 256),
        voxel_size=acq.voxel_size,
        dark_frames=acq.calibration_dark,
        flat_images=acq.calibration_flat,
        beads_czyx=acq.calibration_beads,
    )
    assert cal.sources == {"dark": "images", "flat": "images", "chromatic": "beads"}
    assert cal.dark_cyx.mean() == pytest.approx(acq.config.camera_offset_adu, abs=0.5)
    for c in range(3):
        assert _max_rel_error(cal.flat_cyx[c], acq.flat_field_yx) < 0.015
    residual = np.abs(cal.channel_shifts_zyx_px - acq.channel_shifts_zyx_px)
    assert residual.max() <= 0.1  # the issue asks for <= 0.2 px


def test_data_alone_recovers_vignetting_and_offset(acq: SynthAcquisition) -> None:
    assert acq.image is not None
    planes = [acq.image[:, c].reshape(-1, 256, 256) for c in range(3)]
    cal = estimate_camera_calibration(
        channel_names=acq.channel_names,
        shape_yx=(256, 256),
        voxel_size=acq.voxel_size,
        sample_planes=planes,
        data_czyx=acq.image[0],
    )
    assert cal.sources["dark"].startswith("estimated offset")
    assert cal.sources["flat"].startswith("estimated")
    # photon transfer neglects read noise (2 e- -> ~4 counts low); 100 is the truth
    assert 92.0 < cal.details["estimated_offset_adu"] <= 100.5
    for c in range(3):
        assert _max_rel_error(cal.flat_cyx[c], acq.flat_field_yx) < 0.05
    # different stains do not share structure: no chromatic correction, and it says so
    assert cal.sources["chromatic"].startswith("data (not applied")
    assert not cal.channel_shifts_zyx_px.any()
    assert not cal.details["chromatic"]["rna0"]["accepted"]


def test_channel_shifts_from_data_when_channels_share_structure() -> None:
    rng = np.random.default_rng(0)
    base = ndi.gaussian_filter(rng.random((40, 140, 140)).astype(np.float32), (1, 3, 3)) * 1000
    truth = np.array([0.3, -0.7, 1.4])
    shifted = ndi.shift(base, truth, order=3, mode="nearest")
    crop = (slice(4, 36), slice(10, 130), slice(10, 130))
    volume = np.stack([base[crop], shifted[crop]]) + rng.normal(0, 1, (2, 32, 120, 120))
    shifts, report = estimate_channel_shifts(volume, voxel_size=VoxelSize(0.6, 0.15, 0.15))
    assert report[1]["accepted"], report
    np.testing.assert_allclose(shifts[1], truth, atol=0.1)
    assert shifts[0].tolist() == [0.0, 0.0, 0.0]


def test_offset_fit_needs_signal_dependent_noise() -> None:
    flat = np.full((8, 64, 64), 120.0, np.float32)  # no noise at all: no photon transfer
    with pytest.raises(InputError, match="offset"):
        estimate_camera_offset(flat)


def test_apply_calibration_and_identity() -> None:
    vol = np.full((2, 3, 4, 5), 300, np.uint16)
    dark = np.full((2, 4, 5), 100, np.float32)
    flat = np.full((2, 4, 5), 2.0, np.float32)
    out = apply_calibration(vol, dark, flat)
    assert out.dtype == np.float32 and (out == 100.0).all()
    ident = CameraCalibration.identity(("a", "b"), (4, 5), offset_adu=100)
    assert ident.calibrate_channel(vol[1], 1).tolist() == (vol[1] - 100.0).tolist()
    with pytest.raises(InputError, match="flat-field"):
        CameraCalibration(dark, -flat, np.zeros((2, 3)), ("a", "b"))


def test_missing_data_for_an_estimate_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="no flat-field image and no data"):
        estimate_camera_calibration(
            channel_names=("a",),
            shape_yx=(32, 32),
            voxel_size=VoxelSize(1, 1, 1),
            dark_frames=np.zeros((32, 32)),
        )
    with pytest.raises(InputError, match="chromatic correction from beads"):
        estimate_camera_calibration(
            channel_names=("a", "b"),
            shape_yx=(32, 32),
            voxel_size=VoxelSize(1, 1, 1),
            dark_frames=np.zeros((32, 32)),
            flat_images=np.ones((32, 32)),
            config=CalibrationConfig(chromatic="beads"),
        )


# --------------------------------------------------------------------------- on disk


def test_acquisition_ships_calibration_images(tmp_path: Path) -> None:
    config = SynthConfig(
        seed=1,
        timepoints=1,
        shape_zyx=(8, 64, 64),
        n_cells=3,
        cell_radius_um=3.0,
        channel_shift_zyx_nm=SHIFTS_NM,
    )
    acq = synthesize(config)
    out = write_acquisition(acq, tmp_path / "exp")
    manifest = read_manifest(out)
    assert manifest["calibration"] == {
        "dark": "calibration/dark.tif",
        "flat": "calibration/flat.tif",
        "beads": "calibration/beads.tif",
    }
    for rel in manifest["calibration"].values():
        assert rel in manifest["files"]
    assert "ground_truth/channel_shifts.csv" in manifest["files"]
    found = acquisition_calibration_images(out / "image.ome.tif")
    assert sorted(found) == ["beads", "dark", "flat"]
    assert read_tiff(found["flat"]).shape == (3, 64, 64)
    assert read_tiff(found["beads"], (slice(10, 20), slice(0, 8))).shape == (3, 8, 10, 8)
    back = load_ground_truth(out, with_image=False)
    np.testing.assert_array_equal(back.calibration_dark, acq.calibration_dark)
    np.testing.assert_array_equal(back.calibration_beads, acq.calibration_beads)
    np.testing.assert_array_equal(back.illumination, acq.illumination)
    shifts = pl.read_csv(out / "ground_truth/channel_shifts.csv")
    np.testing.assert_allclose(
        shifts.select("dz_px", "dy_px", "dx_px").to_numpy(), acq.channel_shifts_zyx_px
    )
    # without calibration images: nothing listed, nothing found
    plain = synthesize(config.model_copy(update={"calibration_images": False}))
    out2 = write_acquisition(plain, tmp_path / "plain")
    assert "calibration" not in read_manifest(out2)
    assert acquisition_calibration_images(out2 / "image.ome.tif") == {}


def test_channel_shift_config_is_validated() -> None:
    with pytest.raises(InputError, match="one \\(z, y, x\\) shift per channel"):
        SynthConfig(channel_shift_zyx_nm=((0, 0, 0),))
    with pytest.raises(InputError, match="within"):
        SynthConfig(channel_shift_zyx_nm=((0, 0, 0), (0, 0, 1e6), (0, 0, 0)))


def test_calibration_and_drift_round_trip(tmp_path: Path) -> None:
    root = DataRoot(tmp_path / "home").ensure()
    rng = np.random.default_rng(0)
    cal = CameraCalibration(
        dark_cyx=rng.random((2, 8, 9)).astype(np.float32),
        flat_cyx=(1 + rng.random((2, 8, 9))).astype(np.float32),
        channel_shifts_zyx_px=np.array([[0, 0, 0], [0.5, -0.25, 1.0]]),
        channel_names=("nucleus", "rna0"),
        sources={"dark": "images"},
        details={"x": 1},
    )
    path = save_calibration(root, "e1", cal)
    first = sorted(p.name for p in path.parent.iterdir())
    back = load_calibration(root, "e1")
    np.testing.assert_array_equal(back.flat_cyx, cal.flat_cyx)
    np.testing.assert_array_equal(back.channel_shifts_zyx_px, cal.channel_shifts_zyx_px)
    assert back.sources == {"dark": "images"} and back.channel_names == cal.channel_names
    # a new calibration replaces the files it names; the old ones go, nothing temporary stays
    cal2 = CameraCalibration(
        cal.dark_cyx + 1, cal.flat_cyx, cal.channel_shifts_zyx_px, cal.channel_names
    )
    save_calibration(root, "e1", cal2)
    second = sorted(p.name for p in path.parent.iterdir())
    assert len(second) == 3 and second != first and not any(".tmp" in n for n in second)
    assert json.loads(path.read_text())["dark"] in second
    with pytest.raises(InputError, match="materialize camera_calibration"):
        load_calibration(root, "other")

    table = pl.DataFrame(
        {
            "timepoint": [0, 1],
            "reference_timepoint": [0, 0],
            "channel": ["nucleus"] * 2,
            "dz_px": [0.0, 0.5],
            "dy_px": [0.0, 1.0],
            "dx_px": [0.0, -2.0],
            "dz_um": [0.0, 0.3],
            "dy_um": [0.0, 0.15],
            "dx_um": [0.0, -0.3],
            "correlation": [1.0, 0.9],
            "converged": [True, True],
            "anchored": [True, False],
        },
        schema=DRIFT_SCHEMA,
    )
    save_drift_table(root, "e1", table)
    assert load_drift_table(root, "e1").equals(table)
    with pytest.raises(InputError, match="materialize drift_shifts"):
        load_drift_table(root, "other")
