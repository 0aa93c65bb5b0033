"""The inbox sensor and raw_volume, against a tiny synthetic acquisition in tmp_path."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import tifffile
from dagster import DagsterInstance, SensorResult, materialize

from cellrna_pipeline.core.experiment import load_experiment
from cellrna_pipeline.core.io import read_image_meta, read_timepoint, timepoints_written
from cellrna_pipeline.core.synth.manifest import file_sizes, write_manifest
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


def _run_requests(instance, root, result) -> list[bool]:
    """Run what a tick requested, as the daemon would; success per run."""
    return [
        materialize(
            [raw_volume],
            partition_key=r.partition_key,
            instance=instance,
            resources={"data_root": DataRootResource(home=str(root.home))},
            raise_on_error=False,
        ).success
        for r in result.run_requests
    ]


def _age(path, seconds: float = 60.0) -> None:
    """Backdate every file under ``path`` (the sensor waits for files to settle)."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        old = p.stat().st_mtime - seconds
        os.utime(p, (old, old))


def test_inbox_partial_then_corrupt_then_fixed(data_root, tiny_acquisition_dir):
    """A folder acquisition: not ingested while written, reported once (and nothing
    registered) while corrupt, ingested on a later tick once fixed."""
    instance = DagsterInstance.get()
    acq = data_root.inbox / "acq1"
    image = tiny_acquisition_dir / "image.ome.tif"

    # 1. Being written: files arriving, no manifest yet.
    acq.mkdir()
    (acq / "image.ome.tif").write_bytes(image.read_bytes()[:1000])
    first = _tick(instance, data_root)
    assert not first.run_requests and not data_root.experiment_record("acq1").exists()

    # 2. Complete by its manifest, but the image is corrupt (a broken export).
    (acq / "image.ome.tif").write_bytes(b"II*\x00" + bytes(2000))
    write_manifest(
        acq,
        {
            "format": "cellrna-acquisition/1",
            "image": "image.ome.tif",
            "files": file_sizes(acq, ["image.ome.tif"]),
        },
    )
    second = _tick(instance, data_root, first.cursor)
    assert not second.run_requests
    reason = second.skip_reason.skip_message
    assert "cannot ingest acq1" in reason and "corrupt or unreadable TIFF" in reason
    assert not data_root.experiment_record("acq1").exists()
    assert not data_root.raw("acq1").exists()
    assert not instance.has_dynamic_partition("experiments", "acq1")
    third = _tick(instance, data_root, second.cursor)  # reported once, not retried unchanged
    assert not third.run_requests and "acq1" not in third.skip_reason.skip_message

    # 3. Fixed: the microscope re-exports; the next tick ingests it.
    shutil.rmtree(acq)
    shutil.copytree(tiny_acquisition_dir, acq)
    fourth = _tick(instance, data_root, third.cursor)
    assert sorted(r.partition_key for r in fourth.run_requests) == ["acq1__t0000", "acq1__t0001"]
    assert all(_run_requests(instance, data_root, fourth))
    assert timepoints_written(data_root.raw("acq1")) == [0, 1]
    np.testing.assert_array_equal(
        read_timepoint(data_root.raw("acq1"), 1), tifffile.imread(image)[1]
    )


def test_inbox_file_with_bad_data_is_retried_once_replaced(data_root):
    """A single OME-TIFF: waited for until its size settles; NaN found while copying fails
    that timepoint's run; the fixed file dropped in its place is copied again, whole."""
    instance = DagsterInstance.get()
    path = data_root.inbox / "stack.ome.tif"
    data = np.ones((2, 1, 3, 16, 16), np.float32)
    data[1, 0, 1, 2, 2] = np.nan
    meta = {"axes": "TCZYX", "PhysicalSizeX": 0.15, "PhysicalSizeY": 0.15, "PhysicalSizeZ": 0.6}
    tifffile.imwrite(path, data[:1], ome=True, metadata=meta)  # half of it so far
    first = _tick(instance, data_root)
    assert not first.run_requests  # seen once: not known to be stable
    tifffile.imwrite(path, data, ome=True, metadata=meta)  # finished writing
    _age(path)
    second = _tick(instance, data_root, first.cursor)
    assert not second.run_requests  # changed since the last tick
    third = _tick(instance, data_root, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["stack__t0000", "stack__t0001"]
    assert _run_requests(instance, data_root, third) == [True, False]  # NaN in t1
    assert timepoints_written(data_root.raw("stack")) == [0]
    # The same file again: the same run key, which the daemon does not launch twice.
    again = _tick(instance, data_root, third.cursor).run_requests
    assert [r.run_key for r in again] == [third.run_requests[1].run_key]

    data[1, 0, 1, 2, 2] = 7.0
    tifffile.imwrite(path, data * 2, ome=True, metadata=meta)  # the fixed export
    _age(path)
    fourth = _tick(instance, data_root, third.cursor)
    fifth = _tick(instance, data_root, fourth.cursor)
    assert [r.partition_key for r in fifth.run_requests] == ["stack__t0000", "stack__t0001"]
    assert all(_run_requests(instance, data_root, fifth))
    np.testing.assert_array_equal(read_timepoint(data_root.raw("stack"), 0), data[0] * 2)
    np.testing.assert_array_equal(read_timepoint(data_root.raw("stack"), 1), data[1] * 2)

    # A longer re-export: the raw image of the old shape goes, every timepoint is requested.
    tifffile.imwrite(path, np.concatenate([data, data]), ome=True, metadata=meta)
    _age(path)
    sixth = _tick(instance, data_root, fifth.cursor)
    seventh = _tick(instance, data_root, sixth.cursor)
    assert len(seventh.run_requests) == 4 and not data_root.raw("stack").exists()
    assert load_experiment(data_root, "stack").n_timepoints == 4


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
