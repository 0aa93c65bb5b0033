from __future__ import annotations

import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.paths import DataRoot, validate_experiment_name
from cellrna_pipeline.core.types import VoxelSize


@pytest.mark.parametrize("name", ["e1", "embryo_2024-01-03", "A.b-c_d", "x" * 64])
def test_valid_experiment_names(name):
    assert validate_experiment_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "..", ".hidden", "a__b", "x" * 65, "a b", "a\\b", "-a", "a.."]
)
def test_invalid_experiment_names(name):
    with pytest.raises(InputError, match="invalid experiment name"):
        validate_experiment_name(name)


def test_paths_stay_inside_root(tmp_path):
    root = DataRoot(tmp_path)
    assert root.raw("e1") == tmp_path / "raw" / "e1.ome.zarr"
    with pytest.raises(InputError):
        root.raw("../../etc")


def test_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLRNA_HOME", str(tmp_path / "h"))
    assert DataRoot.from_env().home == tmp_path / "h"
    assert DataRoot.from_env(tmp_path / "x").home == tmp_path / "x"


def test_unwritable_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not writable"):
        DataRoot(blocker / "home").ensure()


def test_voxel_size_units_and_validation():
    v = VoxelSize.from_nm([600, 150, 150])
    assert v.as_tuple() == pytest.approx((0.6, 0.15, 0.15))
    assert v.as_nm() == pytest.approx((600, 150, 150))
    assert v.anisotropy == pytest.approx(4.0)
    for bad in ([0, 1, 1], [1, -1, 1], [1, 1, float("nan")], [1, 1]):
        with pytest.raises(InputError):
            VoxelSize.from_nm(bad)
