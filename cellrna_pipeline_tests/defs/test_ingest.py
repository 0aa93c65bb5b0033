"""The inbox sensor and raw_volume, against a tiny synthetic acquisition in tmp_path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import tifffile
from dagster import DagsterInstance, SensorResult, materialize

from cellrna_pipeline.core.experiment import load_experiment
from cellrna_pipeline.core.io import read_image_meta, read_timepoint, timepoints_written
from cellrna_pipeline.defs import CHECKS
from cellrna_pipeline.defs.assets.ingest import raw_volume
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.defs.runner import (
    materialize_experiment,
    register_partitions,
    tick_inbox_sensor,
)


def _tick(instance, root, cursor=None) -> SensorResult:
    """One sensor evaluation, with its partition requests applied (as the daemon does)."""
    return tick_inbox_sensor(instance, root, cursor)


def test_sensor_requests_complete_acquisitions_once(data_root, tiny_acquisition_dir):
    instance = DagsterInstance.get()
    # One complete acquisition, one still being written (no manifest yet, fresh files).
    shutil.copytree(tiny_acquisition_dir, data_root.inbox / "exp1")
    partial = data_root.inbox / "exp2"
    shutil.copytree(tiny_acquisition_dir, partial)
    (partial / "manifest.json").unlink()

    result = _tick(instance, data_root)
    keys = sorted(r.partition_key for r in result.run_requests)
    assert keys == ["exp1__t0000", "exp1__t0001"]
    assert len({r.run_key for r in result.run_requests}) == 2
    added = {
        req.partitions_def_name: list(req.partition_keys)
        for req in result.dynamic_partitions_requests
    }
    assert added == {"experiments": ["exp1"], "volumes": ["exp1__t0000", "exp1__t0001"]}
    assert load_experiment(data_root, "exp1").n_timepoints == 2

    # The runs happen; the next tick (even with a fresh cursor) requests nothing twice.
    for key in keys:
        assert materialize(
            [raw_volume],
            partition_key=key,
            instance=instance,
            resources={"data_root": DataRootResource(home=str(data_root.home))},
        ).success
    again = _tick(instance, data_root, result.cursor)
    assert not again.run_requests
    assert not _tick(instance, data_root).run_requests

    # The second acquisition completes (manifest written last): only it is requested.
    shutil.copy(tiny_acquisition_dir / "manifest.json", partial / "manifest.json")
    third = _tick(instance, data_root, again.cursor)
    assert sorted(r.partition_key for r in third.run_requests) == ["exp2__t0000", "exp2__t0001"]


def test_sensor_completes_an_interrupted_ingestion(data_root, tiny_acquisition_dir):
    instance = DagsterInstance.get()
    shutil.copytree(tiny_acquisition_dir, data_root.inbox / "exp1")
    first = _tick(instance, data_root)
    materialize(
        [raw_volume],
        partition_key="exp1__t0000",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
    )
    # Timepoint 1 never ran (killed daemon): the next tick asks for it, and only it.
    second = _tick(instance, data_root, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["exp1__t0001"]
    assert second.run_requests[0].run_key == first.run_requests[1].run_key


def test_sensor_reports_bad_acquisition_without_registering(data_root):
    instance = DagsterInstance.get()
    bad = data_root.inbox / "broken"
    bad.mkdir()
    (bad / "image.ome.tif").write_bytes(b"not a tiff at all")
    manifest = {
        "format": "cellrna-acquisition/1",
        "image": "image.ome.tif",
        "files": {"image.ome.tif": 17},
    }
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = _tick(instance, data_root)
    assert not result.run_requests
    assert not data_root.experiment_record("broken").exists()
    assert json.loads(result.cursor)["failed"] == {
        "broken": json.loads(result.cursor)["failed"]["broken"]
    }


def test_raw_volume_materializes_into_tmp_root(data_root, tiny_acquisition_dir):
    instance = DagsterInstance.get()
    shutil.copytree(tiny_acquisition_dir, data_root.inbox / "exp1")
    _tick(instance, data_root)
    register_partitions(instance, "exp1", 2)
    result = materialize(
        [raw_volume, *CHECKS],
        partition_key="exp1__t0001",
        instance=instance,
        resources={"data_root": DataRootResource(home=str(data_root.home))},
    )
    assert result.success
    path = data_root.raw("exp1")
    assert timepoints_written(path) == [1]
    meta = read_image_meta(path)
    truth = tifffile.imread(tiny_acquisition_dir / "image.ome.tif")
    assert meta.shape_tczyx == truth.shape
    assert meta.voxel_size.as_tuple() == tuple(
        json.loads((tiny_acquisition_dir / "manifest.json").read_text())["voxel_size_um"]
    )
    np.testing.assert_array_equal(read_timepoint(path, 1), truth[1])
    checks = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert checks and all(e.event_specific_data.passed for e in checks)


def test_runner_materializes_every_timepoint(data_root, tiny_acquisition_dir):
    from cellrna_pipeline.core.experiment import register_experiment

    instance = DagsterInstance.get()
    register_experiment(data_root, "exp1", tiny_acquisition_dir)
    runs = materialize_experiment(instance, data_root, "exp1", select=["raw_volume"])
    assert all(r.success for r in runs)
    assert timepoints_written(data_root.raw("exp1")) == [0, 1]
