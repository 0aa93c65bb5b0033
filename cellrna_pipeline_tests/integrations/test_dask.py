"""The Dask target: local threads by default, a dask.distributed scheduler when given;
the same chunked preprocessing gives the same bytes on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.io import create_image, read_timepoint, write_timepoint
from cellrna_pipeline.core.preprocess import CameraCalibration, preprocess_volume
from cellrna_pipeline.core.types import ImageMeta, VoxelSize
from cellrna_pipeline.integrations.dask import ADDRESS_ENV, dask_scheduler, resolve_address

VOX = VoxelSize(0.6, 0.15, 0.15)


def test_address_comes_from_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    assert resolve_address(None) is None and resolve_address("  ") is None
    monkeypatch.setenv(ADDRESS_ENV, "tcp://10.0.0.5:8786")
    assert resolve_address(None) == "tcp://10.0.0.5:8786"
    assert resolve_address("tcp://127.0.0.1:9000") == "tcp://127.0.0.1:9000"
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.5:8786")
    with pytest.raises(InputError, match=ADDRESS_ENV):
        resolve_address(None)


def test_local_threads_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import dask

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    with dask_scheduler(threads=2) as target:
        assert target.kind == "threads" and target.workers == 2
        assert dask.config.get("scheduler") == "threads"
        assert "local threads" in target.describe()


def test_unreachable_scheduler_is_a_one_line_error() -> None:
    with (
        pytest.raises(InputError, match=r"cannot reach the dask scheduler at tcp://127\.0\.0\.1:9"),
        dask_scheduler("tcp://127.0.0.1:9", timeout_s=1.0),
    ):
        pass


def _preprocess_and_write(raw: np.ndarray, out: Path) -> np.ndarray:
    calibration = CameraCalibration(
        dark_cyx=np.full((2, 96, 80), 100.0, np.float32),
        flat_cyx=np.linspace(0.8, 1.2, 2 * 96 * 80, dtype=np.float32).reshape(2, 96, 80),
        channel_shifts_zyx_px=np.array([[0, 0, 0], [0.2, 0.5, -0.4]]),
        channel_names=("nucleus", "rna0"),
    )
    result = preprocess_volume(
        raw,
        voxel_size=VOX,
        calibration=calibration,
        drift_zyx_px=(0.3, -2.6, 4.1),
        chunked=True,
        chunks_zyx=(5, 48, 40),
    )
    meta = ImageMeta((1, 2, 10, 96, 80), "float32", VOX, ("nucleus", "rna0"))
    create_image(out, meta, chunks_zyx=(5, 48, 40))
    write_timepoint(out, 0, result.data)
    return read_timepoint(out, 0)


def test_local_cluster_of_two_processes_gives_identical_output(tmp_path: Path) -> None:
    from distributed import LocalCluster

    rng = np.random.default_rng(0)
    raw = rng.poisson(150, (2, 10, 96, 80)).astype(np.uint16)
    with dask_scheduler(threads=2) as target:
        assert target.kind == "threads"
        local = _preprocess_and_write(raw, tmp_path / "threads.ome.zarr")
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        dask_scheduler(cluster.scheduler_address) as target,
    ):
        assert target.kind == "distributed" and target.workers == 2
        remote = _preprocess_and_write(raw, tmp_path / "cluster.ome.zarr")
    np.testing.assert_array_equal(remote, local)
    assert np.isfinite(local).all() and local.std() > 0
