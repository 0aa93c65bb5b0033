"""The classical spot detector, instance masks, assignment and scoring (tiny, seeded)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.spots import (
    DETECTION_SCHEMA,
    SpotDetectionConfig,
    assign_spots,
    detect_spots,
    match_spots,
    nucleus_surface_distance_um,
    psf_sigma_vox,
    rasterize_spots,
)
from cellrna_pipeline.core.synth import SynthConfig, synthesize
from cellrna_pipeline.core.types import VoxelSize

VS = VoxelSize(0.6, 0.15, 0.15)
SIGMA = (350 / 600, 1.0, 1.0)


def _render(shape, centres, amps, sigma=SIGMA, *, noise=10.0, seed=0, background=100.0):
    """Gaussian spots (peak = amplitude) on a constant background with white noise."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, background, dtype=np.float64)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for c, a in zip(centres, amps, strict=True):
        r2 = sum(((g - ci) / s) ** 2 for g, ci, s in zip(grids, c, sigma, strict=True) if s > 0)
        img += a * np.exp(-0.5 * r2)
    img += rng.normal(0, noise, shape)
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def synth_small():
    cfg = SynthConfig(
        seed=5, timepoints=1, shape_zyx=(16, 96, 96), n_cells=3, cell_radius_um=4.0, snr=10.0
    )
    return synthesize(cfg)


def test_config_forbids_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        SpotDetectionConfig(spot_radius=(1, 2, 3))
    with pytest.raises((InputError, ValidationError)):
        SpotDetectionConfig(spot_radius_nm=(350, -1, 150))
    with pytest.raises((InputError, ValidationError)):
        SpotDetectionConfig(threshold_sigma=0)


def test_psf_sigma_in_voxels_follows_voxel_size():
    assert psf_sigma_vox(VS, (350, 150, 150)) == pytest.approx(SIGMA)
    assert psf_sigma_vox(VS, (350, 150, 150), is_2d=True)[0] == 0.0
    with pytest.raises(InputError, match="voxel"):
        psf_sigma_vox(VoxelSize(0.6, 5.0, 5.0), (350, 150, 150))


def test_isolated_spots_found_with_subvoxel_positions_and_amplitudes():
    rng = np.random.default_rng(1)
    centres = np.column_stack(
        [rng.uniform(3, 9, 12), rng.uniform(6, 58, 12), rng.uniform(6, 58, 12)]
    )
    # keep them apart (> 6 px) so that each is an isolated spot
    keep = [0]
    for i in range(1, len(centres)):
        if all(np.linalg.norm((centres[i] - centres[j])[1:]) > 6 for j in keep):
            keep.append(i)
    centres = centres[keep]
    img = _render((12, 64, 64), centres, [150.0] * len(centres))
    res = detect_spots(img, voxel_size=VS)
    assert set(res.table.columns) == set(DETECTION_SCHEMA)
    m = match_spots(res.table.select(["z", "y", "x"]).to_numpy(), centres)
    assert m.recall == 1.0 and m.precision == 1.0
    assert m.mean_error < 0.35  # voxels
    amp = res.table["intensity"].to_numpy()
    assert np.median(amp) == pytest.approx(150.0, rel=0.2)
    assert (res.table["score"] >= 0.5).all() and (res.table["size_voxels"] >= 1).all()
    assert res.table["spot_id"].to_list() == list(range(1, len(centres) + 1))


def test_detects_generator_spots(synth_small):
    acq = synth_small
    img = acq.image[0, acq.channel_names.index("rna0")]
    true = acq.spot_table.select(["z", "y", "x"]).to_numpy()
    res = detect_spots(img, voxel_size=acq.voxel_size)
    m = match_spots(res.table.select(["z", "y", "x"]).to_numpy(), true)
    assert m.f1 > 0.8, m.as_dict()


def test_chunked_run_equals_single_block(synth_small):
    img = synth_small.image[0, 2]
    whole = detect_spots(img, voxel_size=VS).table
    chunked = detect_spots(
        img, voxel_size=VS, config=SpotDetectionConfig(chunk_shape_zyx=(16, 40, 36))
    ).table
    assert whole.height > 5
    assert chunked.equals(whole)


def test_bright_point_is_one_spot_and_cluster_is_split():
    # a transcription site (one bright point) and a cluster of 8 spots (std 0.25 um)
    rng = np.random.default_rng(2)
    cluster = np.array([6.0, 40.0, 40.0]) + rng.normal(0, [0.4, 1.7, 1.7], (8, 3))
    singles = [[6.0, 12.0, 50.0], [5.0, 50.0, 12.0], [7.0, 14.0, 14.0], [6.0, 52.0, 52.0]]
    centres = np.vstack([[[6.0, 20.0, 30.0]], singles, cluster])
    amps = [600.0] + [120.0] * 4 + [120.0] * 8
    img = _render((12, 64, 64), centres, amps)
    table = detect_spots(img, voxel_size=VS).table
    pos = table.select(["z", "y", "x"]).to_numpy()
    near_ts = np.linalg.norm((pos - centres[0])[:, 1:], axis=1) < 3
    near_cluster = np.linalg.norm((pos - [6, 40, 40])[:, 1:], axis=1) < 5
    assert near_ts.sum() == 1
    assert 5 <= near_cluster.sum() <= 12


def test_2d_image_gives_z_zero():
    centres = [[0, 20.0, 20.0], [0, 40.5, 30.2]]
    img = _render((1, 64, 64), centres, [200.0, 200.0], sigma=(0, 1.5, 1.5))[0]
    res = detect_spots(
        img,
        voxel_size=VoxelSize(1.0, 0.1, 0.1),
        config=SpotDetectionConfig(spot_radius_nm=(500, 150, 150)),
    )
    assert res.table.height == 2
    assert (res.table["z"] == 0).all()
    m = match_spots(res.table.select(["z", "y", "x"]).to_numpy(), np.asarray(centres, float))
    assert m.tp == 2 and m.mean_error < 0.3


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros(10), "dimensions"),
        (np.zeros((2, 2, 8, 8)), "dimensions"),
        (np.zeros((4, 8, 8), dtype=bool), "dtype"),
        (np.zeros((0, 8, 8)), "empty"),
    ],
)
def test_bad_images_are_input_errors(image, message):
    with pytest.raises(InputError, match=message):
        detect_spots(image, voxel_size=VS)


def test_nan_is_refused_and_constant_image_has_no_spots():
    img = np.full((4, 16, 16), 100.0)
    assert detect_spots(img, voxel_size=VS).table.height == 0
    img[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        detect_spots(img, voxel_size=VS)


def test_rasterize_spots_ellipsoids_nearest_wins():
    centres = np.array([[2.0, 5.0, 5.0], [2.0, 5.0, 6.2], [2.0, 12.0, 12.0]])
    r = rasterize_spots(centres, (5, 20, 20), sigma_vox=SIGMA, labels=True)
    lab = r.labels
    assert lab is not None and lab.dtype == np.uint32
    assert lab[2, 5, 5] == 1 and lab[2, 5, 6] == 2 and lab[2, 12, 12] == 3
    assert list(np.bincount(lab.ravel(), minlength=4)[1:]) == list(r.sizes)
    assert (r.sizes >= 1).all()
    # the isolated spot covers the voxels within one sigma: 5 in-plane (a plus), one plane
    assert r.sizes[2] == 5


def test_assign_spots_compartments_and_anisotropic_distance():
    shape = (9, 40, 40)
    cells = np.zeros(shape, np.uint32)
    cells[1:8, 5:35, 5:35] = 7
    nuclei = np.zeros(shape, np.uint32)
    nuclei[3:6, 15:25, 15:25] = 7
    table = pl.DataFrame(
        {"z": [4.0, 4.0, 4.0, 0.0], "y": [20.0, 20.0, 10.0, 2.0], "x": [20.0, 30.0, 20.0, 2.0]}
    )
    vs = VoxelSize(0.5, 0.1, 0.1)
    out = assign_spots(table, cells=cells, nuclei=nuclei, voxel_size=vs)
    assert out["compartment"].to_list() == ["nucleus", "cytoplasm", "cytoplasm", "outside"]
    assert out["cell_id"].to_list() == [7, 7, 7, 0]
    d = out["distance_to_nucleus_um"].to_list()
    assert d[0] < 0  # inside: negative
    assert d[1] == pytest.approx(0.6)  # x = 30 -> nearest nucleus voxel x = 24: 6 x 0.1 um
    assert d[2] == pytest.approx(0.5)  # y = 10 -> y = 15: 5 x 0.1 um
    dist = nucleus_surface_distance_um(nuclei, vs)
    assert dist[7, 20, 20] == pytest.approx(1.0)  # z = 7 -> z = 5: 2 x 0.5 um


def test_match_spots_is_one_to_one_within_radius():
    true = np.array([[0, 10, 10], [0, 30, 30.0]])
    pred = np.array([[0, 10, 11], [0, 10, 9], [0, 30, 34.0]])
    m = match_spots(pred, true, max_distance=3.0)
    assert (m.tp, m.fp, m.fn) == (1, 2, 1)
    assert m.f1 == pytest.approx(2 / 5)
    # physical scale: 0.3 um with 0.1 um pixels = 3 px
    assert match_spots(pred, true, max_distance=0.3, scale=(1, 0.1, 0.1)).tp == 1
    assert match_spots(np.zeros((0, 3)), true).recall == 0.0
