"""Tests of the synthetic acquisition generator: ground truth, determinism, optics, I/O."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth import (
    MANIFEST_FORMAT,
    SPOT_TABLE_SCHEMA,
    SynthAcquisition,
    SynthConfig,
    acquisition_is_complete,
    load_ground_truth,
    read_ctc_lineage,
    read_manifest,
    synthesize,
    write_acquisition,
)

# 3 frames of 12 x 64 x 64 voxels (7.2 x 19.2 x 19.2 um), 4 cells: ~50 ms to make
TINY = {
    "timepoints": 3,
    "shape_zyx": (12, 64, 64),
    "voxel_size_um": (0.6, 0.3, 0.3),
    "n_cells": 4,
    "cell_radius_um": 4.0,
    "spots_per_cell": 15.0,
}


def tiny(**overrides: object) -> SynthConfig:
    return SynthConfig(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def acq() -> SynthAcquisition:
    # two RNA channels, frequent divisions and clusters: every code path in one fixture
    return synthesize(
        tiny(
            timepoints=5,
            shape_zyx=(12, 96, 96),
            n_cells=6,
            n_rna_channels=2,
            division_probability=0.3,
            cluster_probability=0.8,
            seed=1,
        )
    )


def _touches_lateral_border(mask: np.ndarray) -> bool:
    return bool(
        mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any()
    )


def _lineage(acq: SynthAcquisition) -> dict[int, tuple[int, int, int]]:
    return {int(label): (int(b), int(e), int(p)) for label, b, e, p in acq.lineage.iter_rows()}


def _assert_nuclei_strictly_inside(acq: SynthAcquisition) -> None:
    inside = acq.nuclei > 0
    assert np.array_equal(acq.cells[inside], acq.nuclei[inside])
    for t in range(acq.cells.shape[0]):
        # every 6-neighbour of a nucleus voxel belongs to the same cell (beyond the image
        # edge the cell continues, hence the 'nearest' padding)
        padded = np.pad(acq.cells[t], 1, mode="edge")
        nuc = acq.nuclei[t]
        for axis in range(3):
            for shift in (-1, 1):
                neighbour = np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
                assert np.all(neighbour[nuc > 0] == nuc[nuc > 0])


# ---- configuration ---------------------------------------------------------------------


def test_default_config_is_valid_and_names_channels() -> None:
    config = SynthConfig()
    assert config.channel_names == ("nucleus", "cytoplasm", "rna0")
    assert SynthConfig(n_rna_channels=2).channel_names[-1] == "rna1"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"timepoints": 0}, "timepoints"),
        ({"shape_zyx": (0, 64, 64)}, "shape_zyx"),
        ({"voxel_size_um": (0.6, -0.1, 0.1)}, "voxel_size_um"),
        ({"psf_sigma_nm": (350.0, float("nan"), 150.0)}, "psf_sigma_nm"),
        ({"n_rna_channels": 3}, "n_rna_channels"),
        ({"snr": 0.0}, "snr"),
        ({"nuclear_spot_fraction": 1.5}, "nuclear_spot_fraction"),
        ({"cell_radius_um": -2.0}, "cell_radius_um"),
        ({"frame_interval_s": 0.0}, "frame_interval_s"),
        ({"drift_um_per_frame": (0.0, -1.0, 1.0)}, "drift_um_per_frame"),
    ],
)
def test_bad_values_raise_one_line_input_error(overrides: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment) as info:
        SynthConfig(**overrides)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=fragment):
        SynthConfig.model_validate(overrides)


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SynthConfig(n_cell=3)


# ---- arrays and ground truth -------------------------------------------------------------


def test_shapes_dtypes_and_schema(acq: SynthAcquisition) -> None:
    t, z, y, x = 5, 12, 96, 96
    assert acq.image is not None
    assert acq.image.shape == (t, 4, z, y, x) and acq.image.dtype == np.uint16
    assert acq.channel_names == ("nucleus", "cytoplasm", "rna0", "rna1")
    assert acq.cells.shape == acq.nuclei.shape == (t, z, y, x)
    assert acq.cells.dtype == acq.nuclei.dtype == np.uint32
    assert acq.spots.shape == (t, 2, z, y, x) and acq.spots.dtype == np.uint32
    assert dict(acq.spot_table.schema) == SPOT_TABLE_SCHEMA
    assert acq.drift_zyx_um.shape == (t, 3) and np.all(acq.drift_zyx_um[0] == 0)
    assert np.allclose(acq.drift_zyx_px * np.array(acq.config.voxel_size_um), acq.drift_zyx_um)
    assert acq.voxel_size.as_tuple() == (0.6, 0.3, 0.3)
    assert acq.meta.shape_tczyx == acq.image.shape
    # camera offset: no voxel reads below the offset by much, none saturates
    assert acq.image.min() > 50 and acq.image.max() < 60000


def test_nuclei_are_strictly_inside_their_cells(acq: SynthAcquisition) -> None:
    _assert_nuclei_strictly_inside(acq)
    for t in range(acq.cells.shape[0]):
        assert set(np.unique(acq.nuclei[t])) <= set(np.unique(acq.cells[t]))


def test_each_label_is_one_connected_object(acq: SynthAcquisition) -> None:
    for volume in (acq.cells, acq.nuclei):
        for t in range(volume.shape[0]):
            for label in np.unique(volume[t])[1:]:
                assert ndi.label(volume[t] == label)[1] == 1


def test_confluent_cells_share_borders() -> None:
    # 8 cells of radius 4 um in a 19.2 um field: a dense layer, neighbours must touch
    cells = synthesize(tiny(n_cells=8, timepoints=1)).cells[0]
    a, b = cells[:, :, 1:], cells[:, :, :-1]
    touching = (a != b) & (a > 0) & (b > 0)
    assert touching.sum() > 20, "neighbouring cells do not share borders"


def test_lineage_matches_labels(acq: SynthAcquisition) -> None:
    lineage = _lineage(acq)
    n_t = acq.cells.shape[0]
    present = [set(np.unique(acq.cells[t]).tolist()) - {0} for t in range(n_t)]
    assert set().union(*present) == set(lineage)
    for label, (begin, end, parent) in lineage.items():
        frames = [t for t in range(n_t) if label in present[t]]
        assert frames == list(range(begin, end + 1)), f"track {label} has gaps or wrong bounds"
        if parent:
            assert lineage[parent][1] == begin - 1
    assert present[0], "no cell at t=0"


def test_divisions_make_two_half_volume_daughters(acq: SynthAcquisition) -> None:
    lineage = _lineage(acq)
    children: dict[int, list[int]] = {}
    for label, (_, _, parent) in lineage.items():
        if parent:
            children.setdefault(parent, []).append(label)
    assert children, "no division with division_probability=0.3"
    checked = 0
    for parent, kids in children.items():
        assert len(kids) <= 2
        end = lineage[parent][1]
        for kid in kids:
            assert lineage[kid][0] == end + 1
        if len(kids) != 2:
            continue
        parent_mask = acq.cells[end] == parent
        kid_masks = [acq.cells[end + 1] == kid for kid in kids]
        if _touches_lateral_border(parent_mask) or any(
            _touches_lateral_border(m) for m in kid_masks
        ):
            continue
        for mask in kid_masks:
            assert 0.25 < mask.sum() / parent_mask.sum() < 0.95
        checked += 1
    assert checked >= 1


def test_spot_table_agrees_with_label_volumes(acq: SynthAcquisition) -> None:
    table = acq.spot_table
    assert table.height > 0
    rounded = np.rint(table.select("z", "y", "x").to_numpy()).astype(int)
    t = table["timepoint"].to_numpy()
    r = np.array([int(name[3:]) for name in table["channel"]])
    zi, yi, xi = rounded.T
    assert np.array_equal(acq.spots[t, r, zi, yi, xi], table["spot_id"].to_numpy())
    cell = acq.cells[t, zi, yi, xi]
    nucleus = acq.nuclei[t, zi, yi, xi]
    assert np.array_equal(cell, table["cell_id"].to_numpy())
    expected = np.where(nucleus > 0, "nucleus", np.where(cell > 0, "cytoplasm", "outside"))
    assert np.array_equal(expected, table["compartment"].to_numpy())
    vox = np.array(acq.config.voxel_size_um)
    assert np.allclose(
        table.select("z_um", "y_um", "x_um").to_numpy(),
        table.select("z", "y", "x").to_numpy() * vox,
    )
    assert (table["amplitude"] > 0).all()
    # ids are 1..n in every (t, channel) volume, and each id is present
    for (tp, ch), group in table.group_by("timepoint", "channel"):
        ids = np.unique(acq.spots[tp, int(ch[3:])])[1:]
        assert np.array_equal(ids, np.sort(group["spot_id"].to_numpy()))
        assert np.array_equal(ids, np.arange(1, group.height + 1))


def test_spot_kinds_when_configured() -> None:
    table = synthesize(
        tiny(cluster_probability=1.0, transcription_sites=2, timepoints=1)
    ).spot_table
    assert set(table["kind"]) == {"single", "cluster", "transcription_site"}
    sites = table.filter(table["kind"] == "transcription_site")
    assert set(sites["compartment"]) == {"nucleus"}
    singles = table.filter(table["kind"] == "single")
    assert sites["amplitude"].median() > 2.5 * singles["amplitude"].median()
    # cluster members sit closer than the PSF width (FWHM ~ 2.355 sigma = 350 nm laterally)
    cluster = table.filter(table["kind"] == "cluster").select("z_um", "y_um", "x_um").to_numpy()
    d = np.linalg.norm(cluster[:, None] - cluster[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert np.median(d.min(axis=1)) < 0.35

    plain = synthesize(
        tiny(cluster_probability=0.0, transcription_sites=0, timepoints=1)
    ).spot_table
    assert set(plain["kind"]) == {"single"}


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a, b = synthesize(tiny()), synthesize(tiny())
    for name in ("image", "cells", "nuclei", "spots", "drift_zyx_um"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.spot_table.equals(b.spot_table) and a.lineage.equals(b.lineage)
    c = synthesize(tiny(seed=1))
    assert not np.array_equal(a.cells, c.cells)


def test_drift_moves_static_cells_by_the_drift() -> None:
    config = tiny(
        timepoints=4,
        shape_zyx=(12, 128, 128),
        n_cells=3,
        motion_um_per_frame=0.0,
        division_probability=0.0,
        enter_leave=False,
        drift_um_per_frame=(0.3, 0.6, 0.6),
        seed=2,
    )
    acq = synthesize(config)
    assert np.abs(acq.drift_zyx_um[1:]).sum() > 0
    checked = 0
    for label in np.unique(acq.cells[0])[1:]:
        masks = [acq.cells[t] == label for t in range(config.timepoints)]
        if any(_touches_lateral_border(m) or not m.any() for m in masks):
            continue
        centroids = np.array([ndi.center_of_mass(m) for m in masks])
        error = centroids - centroids[0] - acq.drift_zyx_px
        # lateral: sub-voxel; axial: cells span few slices, so rasterization costs more
        assert np.abs(error[:, 1:]).max() < 0.25
        assert np.abs(error[:, 0]).max() < 0.5
        checked += 1
    assert checked >= 1


def test_higher_snr_gives_higher_spot_contrast() -> None:
    contrasts, amplitudes = [], []
    for snr in (2.0, 6.0, 18.0):
        acq = synthesize(
            tiny(timepoints=1, snr=snr, transcription_sites=0, cluster_probability=0.0)
        )
        assert acq.image is not None
        table = acq.spot_table
        zi, yi, xi = np.rint(table.select("z", "y", "x").to_numpy()).astype(int).T
        rna = acq.image[0, 2].astype(float)
        contrasts.append(rna[zi, yi, xi].mean() - np.median(rna))
        amplitudes.append(table["amplitude"].mean())
        # only brightness changes with snr: same cells, same spots
        if snr == 2.0:
            first = acq
        else:
            assert np.array_equal(first.cells, acq.cells)
            assert np.allclose(first.spot_table["x"].to_numpy(), table["x"].to_numpy())
    assert contrasts[0] < contrasts[1] < contrasts[2]
    assert amplitudes[1] / amplitudes[0] == pytest.approx(3.0)


def test_cells_enter_and_leave_at_the_border() -> None:
    acq = synthesize(tiny(timepoints=6, motion_um_per_frame=2.5, motion_persistence=0.8, seed=4))
    lineage = _lineage(acq)
    last = acq.cells.shape[0] - 1
    parents = {p for _, _, p in lineage.values()}
    entered = [label for label, (b, _, p) in lineage.items() if b > 0 and p == 0]
    left = [label for label, (_, e, _) in lineage.items() if e < last and label not in parents]
    assert entered, "no cell entered the field"
    assert left, "no cell left the field"
    # tracks start and end at the image border, never in the middle of the field
    for label in entered:
        assert _touches_lateral_border(acq.cells[lineage[label][0]] == label)
    for label in left:
        assert _touches_lateral_border(acq.cells[lineage[label][1]] == label)


def test_no_cells_still_makes_an_image() -> None:
    acq = synthesize(tiny(n_cells=0, timepoints=2))
    assert acq.cells.max() == 0 and acq.lineage.height == 0
    assert set(acq.spot_table["compartment"]) <= {"outside"}
    assert acq.image is not None and acq.image.mean() > acq.config.camera_offset_adu


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1))
def test_nuclei_inside_cells_for_any_seed(seed: int) -> None:
    acq = synthesize(tiny(seed=seed, timepoints=2, division_probability=0.5))
    _assert_nuclei_strictly_inside(acq)


# ---- on disk ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthAcquisition, Path]:
    acq = synthesize(tiny(division_probability=0.3, n_rna_channels=2))
    out = write_acquisition(acq, tmp_path_factory.mktemp("synth") / "exp1")
    return acq, out


def test_write_read_round_trip(written: tuple[SynthAcquisition, Path]) -> None:
    acq, out = written
    back = load_ground_truth(out)
    for name in ("image", "cells", "nuclei", "spots"):
        assert np.array_equal(getattr(back, name), getattr(acq, name)), name
    assert back.spot_table.equals(acq.spot_table)
    assert back.lineage.equals(acq.lineage)
    assert np.allclose(back.drift_zyx_um, acq.drift_zyx_um, rtol=0, atol=1e-12)
    assert back.config == acq.config and back.channel_names == acq.channel_names
    assert back.voxel_size == acq.voxel_size and back.frame_interval_s == acq.frame_interval_s
    assert load_ground_truth(out, with_image=False).image is None


def test_ome_tiff_carries_physical_sizes(written: tuple[SynthAcquisition, Path]) -> None:
    acq, out = written
    with tifffile.TiffFile(out / "image.ome.tif") as tif:
        ome = tif.ome_metadata
        assert tif.series[0].axes == "TCZYX"
        assert tif.series[0].shape == acq.image.shape
    assert ome is not None
    for axis, size in zip("ZYX", acq.config.voxel_size_um, strict=True):
        assert f'PhysicalSize{axis}="{size}"' in ome
        assert f'PhysicalSize{axis}Unit="µm"' in ome
    assert 'TimeIncrement="300.0"' in ome
    for name in acq.channel_names:
        assert f'Name="{name}"' in ome


def test_ctc_ground_truth_files(written: tuple[SynthAcquisition, Path]) -> None:
    acq, out = written
    tra = out / "ground_truth" / "TRA"
    for t in range(acq.cells.shape[0]):
        mask = tifffile.imread(tra / f"man_track{t:03d}.tif")
        assert mask.dtype == np.uint16 and np.array_equal(mask, acq.cells[t])
    lines = (tra / "man_track.txt").read_text().splitlines()
    assert lines == [f"{lab} {b} {e} {p}" for lab, b, e, p in acq.lineage.iter_rows()]
    assert read_ctc_lineage(tra / "man_track.txt").equals(acq.lineage)
    drift = (out / "ground_truth" / "drift.csv").read_text().splitlines()
    assert drift[0] == "timepoint,dz_um,dy_um,dx_um,dz_px,dy_px,dx_px"
    assert len(drift) == acq.cells.shape[0] + 1


def test_manifest_lists_every_file(written: tuple[SynthAcquisition, Path]) -> None:
    acq, out = written
    manifest = read_manifest(out)
    assert manifest["format"] == MANIFEST_FORMAT and manifest["image"] == "image.ome.tif"
    on_disk = {
        p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()
    }
    on_disk.pop("manifest.json")
    assert manifest["files"] == on_disk
    assert manifest["voxel_size_um"] == list(acq.config.voxel_size_um)
    assert manifest["channel_names"] == list(acq.channel_names)
    assert manifest["timepoints"] == acq.config.timepoints
    assert SynthConfig.model_validate(manifest["generator"]) == acq.config
    assert acquisition_is_complete(out)
    assert not (out / "manifest.json.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "no_manifest", "bad_json", "wrong_size"])
def test_damaged_acquisition_is_incomplete(tmp_path: Path, damage: str) -> None:
    out = write_acquisition(synthesize(tiny(timepoints=1)), tmp_path / "exp")
    assert acquisition_is_complete(out)
    spots_csv = out / "ground_truth" / "spots.csv"
    manifest_path = out / "manifest.json"
    if damage == "truncate":
        spots_csv.write_bytes(spots_csv.read_bytes()[:-10])
    elif damage == "delete":
        (out / "ground_truth" / "TRA" / "man_track000.tif").unlink()
    elif damage == "no_manifest":
        manifest_path.unlink()
    elif damage == "bad_json":
        manifest_path.write_text("{not json")
    elif damage == "wrong_size":
        manifest = json.loads(manifest_path.read_text())
        manifest["files"]["image.ome.tif"] += 1
        manifest_path.write_text(json.dumps(manifest))
    assert not acquisition_is_complete(out)


def test_read_manifest_errors_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": "other/1", "image": "a", "files": {"a": 1}})
    )
    with pytest.raises(InputError, match="format"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"format": MANIFEST_FORMAT, "image": "a", "files": {"../a": 1}})
    )
    with pytest.raises(InputError, match="relative"):
        read_manifest(tmp_path)
