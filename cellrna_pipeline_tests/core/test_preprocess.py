"""Preprocessing core: registration, shifts, normalization, denoising, slicing, chunking."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.preprocess import (
    CameraCalibration,
    PreprocessConfig,
    RegistrationConfig,
    estimate_drift,
    estimate_noise_sigma,
    filter_chunked,
    from_sections,
    gaussian_denoise,
    gaussian_depth,
    nl_means_denoise,
    nl_means_depth,
    normalize_percentile,
    percentile_range,
    preprocess_volume,
    register_translation,
    shift_chunked,
    shift_volume,
    to_sections,
)
from cellrna_pipeline.core.synth import SynthConfig, synthesize
from cellrna_pipeline.core.types import VoxelSize

VOX = VoxelSize(0.6, 0.15, 0.15)


def _blobs(shape=(16, 64, 64), seed=0, n=30) -> np.ndarray:
    """Smooth random blobs (float32 zyx): a structure that registers well."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, s, n) for s in shape)
    vol[idx] = rng.uniform(50, 100, n)
    return ndi.gaussian_filter(vol, (1.0, 2.5, 2.5)) * 100


def _shifted_pair(shape, shift, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, moving): crops of one large blob volume and of its exactly (Fourier)
    shifted copy, so content enters and leaves at the borders as in a real drift."""
    pad = 12
    big = _blobs(tuple(s + 2 * pad if s > 1 else 1 for s in shape), seed=seed, n=120)
    moved = np.fft.ifftn(ndi.fourier_shift(np.fft.fftn(big), shift)).real.astype(np.float32)
    crop = tuple(slice(pad, pad + s) if s > 1 else slice(None) for s in shape)
    return big[crop], moved[crop]


# --------------------------------------------------------------------------- configs


def test_configs_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        PreprocessConfig(denoize="gaussian")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        RegistrationConfig(chanel="nucleus")  # type: ignore[call-arg]
    with pytest.raises(InputError, match="percentiles"):
        PreprocessConfig(percentiles=(99.0, 1.0))
    with pytest.raises(InputError, match="max_crop_zyx"):
        RegistrationConfig(max_crop_zyx=(2, 64, 64))
    with pytest.raises(ValidationError):
        PreprocessConfig(denoise="median")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("shift", [(0.4, -3.3, 5.7), (-1.25, 7.6, -0.45)])
def test_register_recovers_a_known_subvoxel_shift(shift) -> None:
    ref, moving = _shifted_pair((16, 64, 64), shift)
    rng = np.random.default_rng(1)
    moving = moving + rng.normal(0, 5, ref.shape).astype(np.float32)
    reg = register_translation(ref, moving, voxel_size=VOX)
    assert reg.converged
    np.testing.assert_allclose(reg.shift_zyx_px, shift, atol=0.05)
    assert reg.correlation > 0.9
    um = reg.shift_zyx_um(VOX)
    assert um[0] == pytest.approx(reg.shift_zyx_px[0] * 0.6)


def test_register_handles_a_single_plane_and_refuses_bad_input() -> None:
    ref, moving = _shifted_pair((1, 64, 64), (0, 2.3, -1.6))
    reg = register_translation(ref, moving, voxel_size=VOX)
    assert reg.shift_zyx_px[0] == 0.0
    np.testing.assert_allclose(reg.shift_zyx_px[1:], (2.3, -1.6), atol=0.05)
    with pytest.raises(InputError, match="constant"):
        register_translation(np.ones((8, 32, 32)), _blobs((8, 32, 32)), voxel_size=VOX)
    with pytest.raises(InputError, match="differ in shape"):
        register_translation(ref, ref[:, :32], voxel_size=VOX)
    bad = ref.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        register_translation(ref, bad, voxel_size=VOX)


def test_drift_of_static_cells_is_recovered_within_a_fifth_of_a_voxel() -> None:
    # Cells static in the sample (no motion, no divisions), so the image content moves by
    # the drift alone. texture_contrast=0: the generator redraws chromatin texture in every
    # frame (real chromatin does not), which alone costs ~0.3 px of lateral precision.
    config = SynthConfig(
        seed=0,
        timepoints=4,
        motion_um_per_frame=0.0,
        division_probability=0.0,
        texture_contrast=0.0,
        calibration_images=False,
    )
    acq = synthesize(config)
    assert acq.image is not None and acq.illumination is not None
    calibration = CameraCalibration(
        dark_cyx=np.full((3, 256, 256), config.camera_offset_adu, np.float32),
        flat_cyx=np.broadcast_to(acq.flat_field_yx, (3, 256, 256)).astype(np.float32),
        channel_shifts_zyx_px=np.zeros((3, 3)),
        channel_names=acq.channel_names,
    )
    table = estimate_drift(
        lambda t: calibration.calibrate_channel(acq.image[t, 0], 0),
        range(config.timepoints),
        voxel_size=acq.voxel_size,
        channel_name="nucleus",
    )
    truth = acq.drift_zyx_px - acq.drift_zyx_px[0]
    assert np.abs(truth[1:, 1:]).max() > 2  # a real drift, several voxels
    est = table.select("dz_px", "dy_px", "dx_px").to_numpy()
    assert np.abs(est - truth).max(axis=0).tolist() == pytest.approx([0, 0, 0], abs=0.2)
    assert table["converged"].all() and table["timepoint"].to_list() == [0, 1, 2, 3]
    # static content: every chained estimate was re-anchored on the reference
    assert table["anchored"].all()
    # registering every timepoint straight to the reference agrees here
    direct = estimate_drift(
        lambda t: calibration.calibrate_channel(acq.image[t, 0], 0),
        range(config.timepoints),
        voxel_size=acq.voxel_size,
        config=RegistrationConfig(strategy="reference", reference_timepoint=2),
    )
    est2 = direct.select("dz_px", "dy_px", "dx_px").to_numpy()
    np.testing.assert_allclose(est2 - est2[0], est - est[0], atol=0.2)
    assert direct["dz_px"][2] == 0.0 and direct["reference_timepoint"][0] == 2


def test_shift_volume_matches_scipy_inside_and_fills_outside() -> None:
    vol = _blobs((8, 40, 40))
    out = shift_volume(vol, (0.0, 2.4, -1.7), fill_value=-1.0)
    ref = ndi.shift(vol, (0.0, 2.4, -1.7), order=1, mode="constant", cval=-1.0)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(out[inner], ref[inner], rtol=1e-5, atol=1e-3)
    assert (out[:, :2] == -1.0).all() and (out[:, :, -1] == -1.0).all()
    assert shift_volume(vol, (0, 0, 0)).tolist() == vol.tolist()
    assert (shift_volume(vol, (0, 50, 0), fill_value=3.0) == 3.0).all()
    with pytest.raises(InputError, match="finite"):
        shift_volume(vol, (0, np.inf, 0))


# --------------------------------------------------------------------------- normalize


def test_percentiles_ignore_hot_pixels() -> None:
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, (2, 12, 64, 64)).astype(np.float32)
    vol[:, :, 20:30, 20:30] += 500  # a real bright structure, 100 voxels per plane
    hot = vol.copy()
    hot.reshape(-1)[rng.choice(hot.size, hot.size // 300, replace=False)] = 60000
    clean = percentile_range(vol, percentiles=(1, 99.8))
    robust = percentile_range(hot, percentiles=(1, 99.8))
    np.testing.assert_allclose(robust, clean, rtol=0.03)
    naive = np.percentile(hot[0], 99.8)
    assert naive > 10 * clean[0, 1]  # what a plain percentile would have done
    out = normalize_percentile(vol, clean)
    assert out.dtype == np.float32
    assert np.percentile(out[0], 50) == pytest.approx(
        (np.median(vol[0]) - clean[0, 0]) / (clean[0, 1] - clean[0, 0]), rel=0.05
    )


def test_constant_channel_gets_a_unit_range() -> None:
    ranges = percentile_range(np.full((1, 3, 16, 16), 7.0))
    assert ranges.tolist() == [[7.0, 8.0]]


# --------------------------------------------------------------------------- denoise


def test_denoisers_reduce_noise_and_report_their_reach() -> None:
    rng = np.random.default_rng(0)
    clean = _blobs((6, 48, 48)) / 50
    noisy = clean + rng.normal(0, 1.0, clean.shape).astype(np.float32)
    sigma = estimate_noise_sigma(noisy)
    assert sigma == pytest.approx(1.0, rel=0.25)
    g = gaussian_denoise(noisy, (0.5, 1.0, 1.0))
    nl = nl_means_denoise(noisy, noise_sigma=sigma, patch_size=3, patch_distance=3)
    for out in (g, nl):
        assert out.dtype == np.float32
        assert np.abs(out - clean).mean() < 0.7 * np.abs(noisy - clean).mean()
    assert gaussian_depth((0.5, 1.0, 0.0)) == (2, 4, 0)
    assert nl_means_depth(5, 6) == (0, 9, 9)


# --------------------------------------------------------------------------- chunked == in memory


@pytest.mark.parametrize("denoise", ["gaussian", "nl_means", "none"])
def test_chunked_preprocessing_equals_in_memory(denoise: str) -> None:
    rng = np.random.default_rng(2)
    raw = (rng.poisson(120, (2, 10, 45, 53)) + _blobs((10, 45, 53))[None] / 20).astype(np.uint16)
    calibration = CameraCalibration(
        dark_cyx=np.full((2, 45, 53), 100.0, np.float32),
        flat_cyx=(0.8 + 0.4 * rng.random((2, 45, 53))).astype(np.float32),
        channel_shifts_zyx_px=np.array([[0, 0, 0], [0.3, -0.6, 1.2]]),
        channel_names=("nucleus", "rna0"),
    )
    config = PreprocessConfig(denoise=denoise, nl_means_patch_size=3, nl_means_patch_distance=2)
    kwargs = {"voxel_size": VOX, "calibration": calibration, "drift_zyx_px": (0.4, 3.7, -2.2)}
    whole = preprocess_volume(raw, config=config, **kwargs)
    # odd chunks: every chunk border (and the volume edge) must come out right
    chunked = preprocess_volume(
        da.from_array(raw, chunks=(1, 4, 16, 20)), config=config, chunks_zyx=(3, 13, 17), **kwargs
    )
    assert isinstance(whole.data, np.ndarray) and isinstance(chunked.data, da.Array)
    assert len(chunked.data.chunks[1]) > 1 and len(chunked.data.chunks[3]) > 1
    np.testing.assert_array_equal(chunked.data.compute(), whole.data)
    np.testing.assert_array_equal(chunked.percentile_values, whole.percentile_values)
    np.testing.assert_allclose(
        whole.shifts_applied_zyx_px, [[-0.4, -3.7, 2.2], [-0.7, -3.1, 1.0]], atol=1e-12
    )


def test_chunked_filters_equal_whole_volume_filters() -> None:
    vol = _blobs((9, 40, 37))
    lazy = da.from_array(vol, chunks=(2, 7, 11))
    sigma = (0.7, 1.5, 1.5)
    out = filter_chunked(gaussian_denoise, lazy, gaussian_depth(sigma), sigma_vox=sigma)
    np.testing.assert_array_equal(out.compute(), gaussian_denoise(vol, sigma))
    for shift in [(1.3, -2.6, 0.5), (-4.0, 9.0, -11.25), (0.0, 0.0, 0.75)]:
        np.testing.assert_array_equal(
            shift_chunked(lazy, shift, fill_value=-2.0).compute(),
            shift_volume(vol, shift, fill_value=-2.0),
        )


def test_preprocess_volume_refuses_mismatched_inputs() -> None:
    raw = np.zeros((2, 4, 16, 16), np.uint16)
    with pytest.raises(InputError, match="calibration is for"):
        preprocess_volume(
            raw,
            voxel_size=VOX,
            calibration=CameraCalibration.identity(("a", "b", "c"), (16, 16)),
        )
    with pytest.raises(InputError, match="drift"):
        preprocess_volume(raw, voxel_size=VOX, drift_zyx_px=(0, np.nan, 0))
    with pytest.raises(InputError, match=r"\(c, z, y, x\)"):
        preprocess_volume(raw[0], voxel_size=VOX)


# --------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("axis", ["z", "y", "x"])
def test_sections_round_trip(axis: str) -> None:
    vol = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    sections, idx = to_sections(vol, axis=axis)  # type: ignore[arg-type]
    n = {"z": 4, "y": 5, "x": 6}[axis]
    assert sections.shape[:2] == (n, 2) and idx.tolist() == list(range(n))
    back = from_sections(sections, idx, vol.shape, axis=axis)  # type: ignore[arg-type]
    np.testing.assert_array_equal(back, vol)
    every_other, idx2 = to_sections(vol[0], axis=axis, step=2)  # type: ignore[arg-type]
    partial = from_sections(every_other, idx2, vol[0].shape, axis=axis, fill_value=-1)  # type: ignore[arg-type]
    taken = [slice(None)] * 3
    taken["zyx".index(axis)] = slice(0, None, 2)
    np.testing.assert_array_equal(partial[tuple(taken)], vol[0][tuple(taken)])
    assert (partial == -1).sum() == vol[0].size - vol[0][tuple(taken)].size


def test_sections_of_a_dask_volume_stay_lazy() -> None:
    lazy = da.zeros((3, 8, 8), chunks=(1, 8, 8))
    sections, _ = to_sections(lazy)
    assert isinstance(sections, da.Array) and sections.shape == (3, 8, 8)
    with pytest.raises(InputError, match="axis"):
        to_sections(lazy, axis="t")  # type: ignore[arg-type]
