"""The classical spot detector, instance masks, assignment and scoring (tiny, seeded)."""

from __future__ import annotations

import itertools

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


def test_chunked_and_lazy_runs_equal_single_block_in_a_dense_image():
    # dense enough that pairs are split by the fit: a dask array (read point-wise, the
    # fit's sparse voxel pool) and chunks give exactly the in-memory single-block table
    import dask.array as da

    cfg = SynthConfig(
        seed=5,
        timepoints=1,
        shape_zyx=(16, 96, 96),
        n_cells=3,
        cell_radius_um=4.0,
        snr=10.0,
        spots_per_cell=150.0,
    )
    img = synthesize(cfg).image[0, 2]
    whole = detect_spots(img, voxel_size=VS)
    chunks = SpotDetectionConfig(chunk_shape_zyx=(8, 48, 48))
    lazy = detect_spots(da.from_array(img, chunks=(8, 48, 48)), voxel_size=VS, config=chunks)
    chunked = detect_spots(img, voxel_size=VS, config=chunks)
    # a file reader that only slices (the CLI's loader): windows read tile by tile
    sliced = detect_spots(_SliceOnly(img), voxel_size=VS, config=chunks)
    assert whole.table.height > 100 and whole.n_split > 0
    assert lazy.table.equals(whole.table)
    assert chunked.table.equals(whole.table)
    assert sliced.table.equals(whole.table)


class _SliceOnly:
    """An array that supports only basic slicing (like a lazy file reader)."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, key):
        assert all(isinstance(k, slice) for k in key)
        return self.arr[key].copy()


def _clusters_image() -> np.ndarray:
    rng = np.random.default_rng(2)
    centres = np.vstack(
        [np.array([6.0, y, x]) + rng.normal(0, [0.4, 1.7, 1.7], (8, 3)) for y, x in CLUSTERS]
    )
    return _render((12, 64, 64), centres, [120.0] * len(centres))


def test_batches_give_the_same_clusters_fits_and_masks(monkeypatch):
    from cellrna_pipeline.core.spots import decompose, fit

    img = _clusters_image()
    monkeypatch.setenv("CELLRNA_THREADS", "1")
    whole = detect_spots(img, voxel_size=VS)
    monkeypatch.setattr(decompose, "_BATCH_BLOBS", 2)
    monkeypatch.setattr(fit, "_SPLIT_BATCH", 3)
    monkeypatch.setattr(fit, "_WINDOW_BATCH", 4)
    batched = detect_spots(img, voxel_size=VS)
    assert whole.n_clusters >= 2 and whole.n_split >= 2
    assert batched.table.equals(whole.table)


def test_thread_count_does_not_change_the_result(monkeypatch):
    from cellrna_pipeline.core.spots import _candidates, _threads, decompose, fit

    img = _clusters_image()
    monkeypatch.setattr(fit, "_SLAB_SPOTS", 4)  # sweeps in slabs even on this tiny image
    monkeypatch.setenv("CELLRNA_THREADS", "1")
    one = detect_spots(img, voxel_size=VS)
    # small pieces, so that every threaded step is split even on this tiny image
    monkeypatch.setattr(fit, "_SPLIT_PIECE", 1)
    monkeypatch.setattr(decompose, "_MIN_BATCH_BLOBS", 1)
    monkeypatch.setattr(_candidates, "_MIN_SLAB_PLANES", 1)
    calls = []
    real_map = _threads.thread_map

    def counting_map(fn, args, threads):
        calls.append((fn.__name__, len(args), threads))
        return real_map(fn, args, threads)

    for module in (fit, decompose, _candidates):
        monkeypatch.setattr(module, "thread_map", counting_map)
    monkeypatch.setenv("CELLRNA_THREADS", "3")
    three = detect_spots(img, voxel_size=VS)
    assert one.n_split >= 2
    assert three.table.equals(one.table)
    split = {name for name, n, t in calls if n > 1 and t == 3}
    assert {"_split_fit", "_decompose_batch", "separable_valid", "sweep"} <= split


def test_pieces_cover_the_rows_in_order():
    from cellrna_pipeline.core.spots._threads import pieces

    assert pieces(10, 1, 2, 100) == [(0, 10)]
    assert pieces(10, 1, 2, 4) == [(0, 3), (3, 6), (6, 10)]
    parts = pieces(1000, 2, 100, 8192)
    assert len(parts) == 8 and parts[0][0] == 0 and parts[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert pieces(50, 2, 100, 8192) == [(0, 50)]
    assert pieces(0, 2, 1, 10) == [(0, 0)]


def test_overlapping_finds_every_pair_within_the_span():
    from cellrna_pipeline.core.spots._kernels import overlapping

    rng = np.random.default_rng(3)
    for trial in range(20):
        hi = rng.integers(1, 50, 3)
        a = rng.integers(-3, hi, (int(rng.integers(1, 120)), 3))
        b = rng.integers(0, hi + 3, (int(rng.integers(1, 150)), 3))
        if trial % 4 == 0:  # a 2-D image: every z is 0
            a[:, 0] = b[:, 0] = 0
        span = rng.integers(0, 6, 3)
        expected = np.argwhere((np.abs(a[:, None] - b[None]) <= span).all(axis=2))
        got = overlapping(a, b, span)
        assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    far = np.array([[0, 0, 0], [300, 5000, 5000]])  # a coarse grid: memory stays small
    assert sorted(map(tuple, overlapping(far, far, np.array([2, 4, 4])))) == [(0, 0), (1, 1)]


def test_principal_axes_match_lapack():
    from cellrna_pipeline.core.spots._kernels import principal_axes

    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 3, 3))
    cov = x @ x.transpose(0, 2, 1)
    cov[:20, 0, :] = cov[:20, :, 0] = 0.0  # 2-D: no z extent
    cov[20:30] = np.diag([1.0, 3.0, 3.0])  # the largest eigenvalue repeated
    cov[30:40] = 2.0 * np.eye(3)
    values, vectors = principal_axes(cov)
    w, v = np.linalg.eigh(cov)
    np.testing.assert_allclose(values, w[:, -1], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0)
    np.testing.assert_allclose(
        np.einsum("nij,nj->ni", cov, vectors), values[:, None] * vectors, atol=1e-10
    )
    distinct = slice(40, None)
    assert (np.abs((vectors[distinct] * v[distinct, :, -1]).sum(axis=1)) > 1 - 1e-9).all()


CLUSTERS = [(16.0, 16.0), (16.0, 48.0), (48.0, 16.0), (48.0, 48.0)]


def test_noise_sample_lattice_is_capped():
    from cellrna_pipeline.core.spots._candidates import NOISE_SAMPLE_MAX, noise_strides

    assert noise_strides((32, 256, 256)) == (1, 4, 4)
    strides = noise_strides((256, 2048, 2048))
    counts = [-(-n // s) for n, s in zip((256, 2048, 2048), strides, strict=True)]
    assert NOISE_SAMPLE_MAX // 2 < np.prod(counts) <= NOISE_SAMPLE_MAX


@pytest.mark.parametrize("separation", [1.0, 1.2, 2.4])
def test_close_pair_is_resolved_and_a_bright_point_is_not_split(separation):
    # two equal spots closer than the PSF merges (sigma 1 px laterally): one local maximum,
    # split by the fit; a point 3x as bright stays one spot
    pair = [[6.0, 30.0, 30.0 - separation / 2], [6.0, 30.0, 30.0 + separation / 2]]
    singles = [[6.0, 10.0, 12.0], [5.2, 12.0, 50.0], [6.6, 50.0, 12.0], [6.0, 48.0, 48.0]]
    bright = [[6.0, 14.0, 32.0]]
    centres = np.array(pair + singles + bright)
    img = _render((12, 64, 64), centres, [150.0] * 6 + [450.0], seed=3)
    table = detect_spots(img, voxel_size=VS).table
    pos = table.select(["z", "y", "x"]).to_numpy()
    near_pair = np.linalg.norm((pos - [6.0, 30.0, 30.0])[:, 1:], axis=1) < 3
    near_bright = np.linalg.norm((pos - bright[0])[:, 1:], axis=1) < 3
    assert near_pair.sum() == 2
    assert near_bright.sum() == 1
    assert table.height == len(centres)
    m = match_spots(pos, centres, max_distance=1.0)
    assert m.tp == len(centres) and m.mean_error < 0.4


def test_without_decomposition_a_close_pair_is_one_spot():
    pair = np.array([[6.0, 30.0, 29.4], [6.0, 30.0, 30.6]])
    img = _render((12, 64, 64), pair, [150.0, 150.0], seed=3)
    cfg = SpotDetectionConfig(decompose=False)
    assert detect_spots(img, voxel_size=VS, config=cfg).table.height == 1


def test_fit_recovers_amplitudes_positions_and_the_shot_noise_gain():
    from cellrna_pipeline.core.spots.fit import fit_spots

    rng = np.random.default_rng(4)
    centres = np.column_stack(
        [rng.uniform(3, 9, 40), rng.uniform(4, 92, 40), rng.uniform(4, 92, 40)]
    )
    # Poisson counts (gain 1) on a background of 100: noise variance 100 + signal
    mean = _render((12, 96, 96), centres, [200.0] * 40, noise=0.0).astype(np.float64)
    img = rng.poisson(mean).astype(np.uint16)
    start = np.rint(centres) + rng.uniform(-0.3, 0.3, centres.shape)
    fit = fit_spots(img, start, np.full(40, 100.0), sigma_vox=SIGMA, min_amplitude=50.0)
    m = match_spots(fit.zyx, centres, max_distance=1.0)
    assert m.tp == len(fit.zyx) and m.mean_error < 0.25
    assert np.median(fit.amplitude) == pytest.approx(200.0, rel=0.1)
    assert fit.noise_var == pytest.approx(100.0, rel=0.3)
    # the raw residuals under-read the gain (the fit absorbs part of the noise at spot
    # centres, where the signal is); it must still see the shot noise
    assert 0.2 < fit.gain < 1.5


def test_sweep_slabs_partition_the_spots_and_inner_windows_never_touch():
    from cellrna_pipeline.core.spots.fit import _Model

    rng = np.random.default_rng(0)
    n = 3000
    zyx = np.column_stack([rng.uniform(0, 8, n), rng.uniform(0, 300, n), rng.uniform(0, 60, n)])
    model = _Model(np.zeros((8, 300, 60), np.uint16), SIGMA)
    model.set(zyx, np.ones(n), np.zeros(n), np.zeros(n))
    rows = np.arange(0, n, 2)  # a subset, as after a split round
    *inner, near = model.slabs(rows)
    assert len(inner) == 5 and 0 < len(near) < len(rows) // 4
    assert sorted(np.concatenate([*inner, near]).tolist()) == rows.tolist()
    for a in range(len(inner)):
        for b in range(a + 1, len(inner)):
            d = np.abs(model.centres[inner[a]][:, None] - model.centres[inner[b]][None])
            assert not np.all(d <= 2 * model.reach, axis=2).any()
    few = model.slabs(rows[:100])  # too few for slabs: one sequential sweep
    assert len(few) == 2 and len(few[0]) == 0 and few[1].tolist() == rows[:100].tolist()


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


def test_rasterize_spots_matches_the_rule_voxel_by_voxel():
    """Brute force over the volume: nearest centre within one sigma (ties: the lower
    spot), the rounded centre always its spot's own, clipped into the volume."""
    rng = np.random.default_rng(5)
    shape, sigma = (6, 18, 18), (0.7, 1.3, 1.1)
    centres = rng.uniform(-0.6, np.array(shape) - 0.4, (40, 3))
    centres[:8] = np.round(centres[:8])  # shared and integer centres: ties
    centres[8] = centres[0]
    got = rasterize_spots(centres, shape, sigma_vox=sigma, labels=True).labels
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    d = np.sqrt((((grid[..., None, :] - centres) / sigma) ** 2).sum(axis=-1))
    rounded = np.clip(np.rint(centres).astype(int), 0, np.array(shape) - 1)
    for i, r in enumerate(rounded):
        d[tuple(r)][i] = -1.0
    expected = np.where(d.min(axis=-1) <= 1.0, d.argmin(axis=-1) + 1, 0)
    np.testing.assert_array_equal(got, expected)


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


def _double(x):
    return 2 * x


def _map_in_child(queue):
    from cellrna_pipeline.core.spots._threads import thread_map

    queue.put(thread_map(_double, [(i,) for i in range(6)], 2))


def test_kernel_threads_work_in_a_forked_child():
    """Dagster's executors fork: the parent's pool threads do not exist in the child."""
    import multiprocessing

    from cellrna_pipeline.core.spots._threads import thread_map

    assert thread_map(_double, [(i,) for i in range(6)], 2) == [0, 2, 4, 6, 8, 10]
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_map_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == [0, 2, 4, 6, 8, 10]
    finally:
        child.join(timeout=10)
