"""Denoising of one ``(z, y, x)`` volume: Gaussian (3-D, physical sigma) or non-local means.

Each filter states how far its output reaches (:func:`gaussian_depth`,
:func:`nl_means_depth`): a chunk extended by that many voxels on each side gives the
same values as the whole volume, which is what the chunked runner relies on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.types import VoxelSize

__all__ = [
    "estimate_noise_sigma",
    "gaussian_denoise",
    "gaussian_depth",
    "gaussian_sigma_vox",
    "nl_means_denoise",
    "nl_means_depth",
]

GAUSSIAN_TRUNCATE = 4.0


def gaussian_sigma_vox(
    sigma_nm: Sequence[float], voxel_size: VoxelSize
) -> tuple[float, float, float]:
    """A ``(z, y, x)`` sigma in nanometres as voxels of ``voxel_size``."""
    z, y, x = (float(s) / 1000.0 for s in sigma_nm)
    return (z / voxel_size.z_um, y / voxel_size.y_um, x / voxel_size.x_um)


def gaussian_depth(sigma_vox: Sequence[float]) -> tuple[int, int, int]:
    """Kernel radius per axis (scipy's ``int(truncate * sigma + 0.5)``)."""
    r = [int(GAUSSIAN_TRUNCATE * float(s) + 0.5) if s > 0 else 0 for s in sigma_vox]
    return (r[0], r[1], r[2])


def gaussian_denoise(volume_zyx: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """Anisotropic Gaussian smoothing, float32 ``(z, y, x)``; edges repeat the border voxel.

    Parameters
    ----------
    volume_zyx : ``(z, y, x)`` array.
    sigma_vox : Gaussian sigma per axis in voxels (see :func:`gaussian_sigma_vox`).
    """
    arr = np.asarray(volume_zyx, dtype=np.float32)
    if not any(s > 0 for s in sigma_vox):
        return arr
    return ndi.gaussian_filter(arr, tuple(sigma_vox), mode="nearest", truncate=GAUSSIAN_TRUNCATE)


def nl_means_depth(patch_size: int, patch_distance: int) -> tuple[int, int, int]:
    """How far non-local means (per z-plane) reaches: search radius + patch half-width + 1."""
    r = int(patch_distance) + int(patch_size) // 2 + 1
    return (0, r, r)


def estimate_noise_sigma(planes_yx: np.ndarray) -> float:
    """Gaussian noise sigma of ``(n, y, x)`` planes (or one ``(y, x)`` plane).

    Immerkaer's estimator made robust: the planes are filtered with the 3x3 kernel
    ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]`` (which cancels smooth signal; its L2 norm is
    6), and sigma is the median absolute response / 0.6745 / 6.
    """
    arr = np.asarray(planes_yx, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] < 3 or arr.shape[2] < 3:
        raise InputError(f"need (n, y, x) planes of at least 3 x 3 pixels, got {arr.shape}")
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    response = ndi.correlate(arr, kernel[None], mode="nearest")[:, 1:-1, 1:-1]
    return float(np.median(np.abs(response)) / 0.6745 / 6.0)


def nl_means_denoise(
    volume_zyx: np.ndarray,
    *,
    noise_sigma: float,
    h: float = 0.8,
    patch_size: int = 5,
    patch_distance: int = 6,
) -> np.ndarray:
    """Non-local means (scikit-image, fast mode), one z-plane at a time.

    Planes rather than 3-D patches because voxels are anisotropic (a cubic patch would
    span several times more micrometres in z than in y and x) and because it is much
    faster.

    Parameters
    ----------
    volume_zyx : ``(z, y, x)`` array.
    noise_sigma : noise standard deviation in the volume's units
        (:func:`estimate_noise_sigma`).
    h : filter strength in units of ``noise_sigma``.
    patch_size, patch_distance : patch width and search radius, in pixels.
    """
    from skimage.restoration import denoise_nl_means

    arr = np.asarray(volume_zyx, dtype=np.float32)
    if not math.isfinite(noise_sigma) or noise_sigma < 0:
        raise InputError(f"noise_sigma must be >= 0 and finite, got {noise_sigma}")
    if noise_sigma == 0:
        return arr.copy()
    out = np.empty_like(arr)
    for z in range(arr.shape[0]):
        out[z] = denoise_nl_means(
            arr[z],
            h=h * noise_sigma,
            sigma=noise_sigma,
            patch_size=patch_size,
            patch_distance=patch_distance,
            fast_mode=True,
            channel_axis=None,
        )
    return out
