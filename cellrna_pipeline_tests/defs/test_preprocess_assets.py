"""camera_calibration, drift_shifts and preprocessed_volume materialized into tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from cellrna_pipeline.core.experiment import load_experiment, register_experiment
from cellrna_pipeline.core.io import (
    create_image,
    open_source,
    read_image_meta,
    read_timepoint,
    timepoints_written,
    write_timepoint,
)
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.core.preprocess.store import (
    calibration_dir,
    load_calibration,
    load_drift_table,
    preprocessing_table_path,
)
from cellrna_pipeline.core.synth import SynthAcquisition, SynthConfig, synthesize, write_acquisition
from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.assets.preprocess import (
    PREPROCESS_ASSETS,
    PREPROCESS_CHECKS,
    camera_calibration,
    check_camera_calibration_plausible,
    check_drift_shifts_converged,
    check_preprocessed_volume_registration_residual,
    drift_shifts,
    preprocessed_volume,
)
from cellrna_pipeline.defs.partitions import volume_key
from cellrna_pipeline.defs.resources import DaskResource, DataRootResource
from cellrna_pipeline.defs.runner import register_partitions

ALL = [raw_volume, *PREPROCESS_ASSETS, *PREPROCESS_CHECKS]
SHIFTS_NM = ((0.0, 0.0, 0.0), (120.0, 75.0, -60.0), (-150.0, 45.0, 90.0))


def _acquisition(**overrides: object) -> SynthAcquisition:
    config = {
        "seed": 0,
        "timepoints": 3,
        "shape_zyx": (16, 128, 128),
        "n_cells": 6,
        "cell_radius_um": 4.0,
        "motion_um_per_frame": 0.0,
        "division_probability": 0.0,
        "texture_contrast": 0.0,
        "channel_shift_zyx_nm": SHIFTS_NM,
        **overrides,
    }
    return synthesize(SynthConfig(**config))  # type: ignore[arg-type]


def _ingested(root: DataRoot, acq: SynthAcquisition, name: str) -> tuple[DagsterInstance, dict]:
    folder = write_acquisition(acq, root.inbox / name)
    register_experiment(root, name, folder)
    instance = DagsterInstance.ephemeral()
    n_t = acq.cells.shape[0]
    register_partitions(instance, name, n_t)
    resources = {"data_root": DataRootResource(home=str(root.home)), "dask": DaskResource()}
    # raw_volume's own work, without a Dagster run per timepoint (tested in test_ingest.py)
    record = load_experiment(root, name)
    create_image(root.raw(name), record.image_meta)
    with open_source(record.source) as source:
        for t in range(n_t):
            write_timepoint(root.raw(name), t, source.read_timepoint(t))
    return instance, resources


def _checks(result) -> dict[str, bool]:
    return {ev.check_name: ev.passed for ev in result.get_asset_check_evaluations()}


def test_preprocessing_assets_calibrate_register_and_write(data_root: DataRoot) -> None:
    acq = _acquisition()
    instance, resources = _ingested(data_root, acq, "e1")
    exp = materialize(
        ALL,
        selection=[
            camera_calibration,
            drift_shifts,
            check_camera_calibration_plausible,
            check_drift_shifts_converged,
        ],
        partition_key="e1",
        instance=instance,
        resources=resources,
    )
    assert exp.success
    assert _checks(exp) == {
        "check_camera_calibration_plausible": True,
        "check_drift_shifts_converged": True,
    }
    calibration = load_calibration(data_root, "e1")
    assert calibration.sources == {"dark": "images", "flat": "images", "chromatic": "beads"}
    assert np.abs(calibration.channel_shifts_zyx_px - acq.channel_shifts_zyx_px).max() <= 0.2
    drift = load_drift_table(data_root, "e1")
    truth = acq.drift_zyx_px - acq.drift_zyx_px[0]
    est = drift.select("dz_px", "dy_px", "dx_px").to_numpy()
    # a small field (6 cells); the <= 0.2 voxel accuracy is tested on the full field in
    # core/test_preprocess.py
    assert np.abs(est - truth).max() <= 0.3
    meta = exp.asset_materializations_for_node("camera_calibration")[0].metadata
    assert meta["calibration_images"].value == "beads, dark, flat"

    for t in range(3):
        run = materialize(
            ALL,
            selection=[preprocessed_volume, check_preprocessed_volume_registration_residual],
            partition_key=volume_key("e1", t),
            instance=instance,
            resources=resources,
        )
        assert run.success
        assert _checks(run) == {"check_preprocessed_volume_registration_residual": True}
        md = run.asset_materializations_for_node("preprocessed_volume")[0].metadata
        for key in ("drift_applied_zyx_px", "normalization_percentiles", "seconds", "scheduler"):
            assert key in md
        assert md["scheduler"].value.startswith("local threads")
    processed = data_root.processed("e1")
    meta_out = read_image_meta(processed)
    assert meta_out.dtype == "float32" and meta_out.shape_tczyx == (3, 3, 16, 128, 128)
    assert meta_out.channel_names == acq.channel_names
    assert timepoints_written(processed) == [0, 1, 2]
    table = pl.read_parquet(preprocessing_table_path(data_root, "e1", 2))
    assert table["channel"].to_list() == list(acq.channel_names)
    np.testing.assert_allclose(
        table.select("shift_z_px", "shift_y_px", "shift_x_px").to_numpy(),
        -(est[2][None] + calibration.channel_shifts_zyx_px),
    )
    # registered: the nuclear stain of t=2 now sits where it was at t=0
    nuc0, nuc2 = (read_timepoint(processed, t)[0] for t in (0, 2))
    inner = (slice(None), slice(24, -24), slice(24, -24))
    raw2 = read_timepoint(data_root.raw("e1"), 2)[0].astype(np.float32)
    aligned = np.corrcoef(nuc0[inner].ravel(), nuc2[inner].ravel())[0, 1]
    unaligned = np.corrcoef(nuc0[inner].ravel(), raw2[inner].ravel())[0, 1]
    assert aligned > 0.9 > unaligned


def test_calibration_estimated_from_data_without_calibration_images(data_root: DataRoot) -> None:
    acq = _acquisition(calibration_images=False, channel_shift_zyx_nm=(), timepoints=2)
    instance, resources = _ingested(data_root, acq, "e2")
    result = materialize(
        ALL,
        selection=[camera_calibration, check_camera_calibration_plausible],
        partition_key="e2",
        instance=instance,
        resources=resources,
    )
    assert result.success and _checks(result) == {"check_camera_calibration_plausible": True}
    calibration = load_calibration(data_root, "e2")
    assert calibration.sources["flat"].startswith("estimated")
    assert calibration.sources["dark"].startswith("estimated offset")
    assert acq.flat_field_yx is not None
    assert np.abs(calibration.flat_cyx[0] / acq.flat_field_yx - 1).max() < 0.06
    doc = json.loads((calibration_dir(data_root, "e2") / "calibration.json").read_text())
    assert doc["channel_names"] == list(acq.channel_names)


def test_stages_out_of_order_fail_with_a_clear_message(data_root: DataRoot) -> None:
    acq = _acquisition(timepoints=2, shape_zyx=(8, 64, 64), n_cells=3, cell_radius_um=3.0)
    folder = write_acquisition(acq, data_root.inbox / "e3")
    register_experiment(data_root, "e3", folder)
    instance = DagsterInstance.ephemeral()
    register_partitions(instance, "e3", 2)
    resources = {"data_root": DataRootResource(home=str(data_root.home)), "dask": DaskResource()}

    def error(asset, key) -> str:
        result = materialize(
            ALL,
            selection=[asset],
            partition_key=key,
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.error
        while failure.cause is not None and failure.cls_name != "InputError":
            failure = failure.cause
        return failure.message

    assert "materialize raw_volume first" in error(camera_calibration, "e3")
    assert "raw_volume is not materialized" in error(preprocessed_volume, "e3__t0001")


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DataRoot:
    monkeypatch.delenv("CELLRNA_DASK_ADDRESS", raising=False)
    return DataRoot(tmp_path / "home").ensure()
