"""Image formation: illumination, stain texture, PSF blur, spots, camera noise.

Intensities are expected photo-electrons per voxel until :func:`camera` turns them into
counts (ADU) with shot noise, read noise and an offset.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

# Shot noise is drawn exactly below this mean; above it a Gaussian of the same mean and
# variance is used (skewness < 0.13, invisible after rounding) because numpy's Poisson
# sampler is ~5x slower and dominates the run time otherwise.
POISSON_EXACT_BELOW = 64.0
_TRUNCATE = 3.0  # Gaussian kernels are cut at 3 sigma
SPOT_WINDOW_SIGMAS = 4.0  # spots are added in a +-4 sigma window


def sigma_um_to_vox(
    sigma_um: tuple[float, float, float], voxel_um: tuple[float, float, float]
) -> tuple[float, float, float]:
    """A physical ``(z, y, x)`` sigma in micrometres as voxels."""
    return (sigma_um[0] / voxel_um[0], sigma_um[1] / voxel_um[1], sigma_um[2] / voxel_um[2])


def psf_sigma_vox(
    psf_sigma_nm: tuple[float, float, float], voxel_um: tuple[float, float, float]
) -> tuple[float, float, float]:
    """PSF Gaussian sigma ``(z, y, x)`` in voxels from nanometres."""
    return sigma_um_to_vox(tuple(s / 1000.0 for s in psf_sigma_nm), voxel_um)  # type: ignore[arg-type]


def illumination_field(
    shape_zyx: tuple[int, int, int], falloff: float, rng: np.random.Generator
) -> np.ndarray:
    """Smooth flat-field of mean 1, ``(z, y, x)`` float32, fixed to the camera.

    An off-centre radial fall-off (vignetting) times a few random low-frequency waves,
    with a weak axial gradient.
    """
    nz, ny, nx = shape_zyx
    y = (np.arange(ny) + 0.5) / ny - 0.5
    x = (np.arange(nx) + 0.5) / nx - 0.5
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    r2 = (y[:, None] - cy) ** 2 + (x[None, :] - cx) ** 2
    field = 1.0 - falloff * r2 / 0.5
    waves = np.zeros((ny, nx))
    for _ in range(3):
        fy, fx = rng.uniform(-1.5, 1.5, 2)
        waves += np.cos(2 * np.pi * (fy * y[:, None] + fx * x[None, :]) + rng.uniform(0, 2 * np.pi))
    field *= 1.0 + 0.25 * falloff * waves / 3.0
    z = (np.arange(nz) + 0.5) / nz - 0.5
    axial = 1.0 + rng.uniform(-0.1, 0.1) * z
    out = (axial[:, None, None] * field[None, :, :]).astype(np.float32)
    out /= np.float32(out.mean())
    return out


class Texture:
    """Band-limited random texture of unit standard deviation (float32, zyx)."""

    def __init__(
        self, shape_zyx: tuple[int, int, int], sigma_vox: tuple[float, float, float]
    ) -> None:
        self.shape = shape_zyx
        self.sigma = tuple(max(s, 0.3) for s in sigma_vox)
        # std of filtered white noise = L2 norm of the (separable) kernel
        norm = 1.0
        for s in self.sigma:
            n = int(2 * math.ceil(_TRUNCATE * s) + 3)
            delta = np.zeros(n)
            delta[n // 2] = 1.0
            norm *= float(np.sqrt(np.sum(ndi.gaussian_filter1d(delta, s, truncate=_TRUNCATE) ** 2)))
        self.scale = np.float32(1.0 / norm)

    def draw(self, rng: np.random.Generator, n_slices: int | None = None) -> np.ndarray:
        """A new texture of ``n_slices`` (default: all) slices."""
        shape = self.shape if n_slices is None else (n_slices, *self.shape[1:])
        noise = rng.standard_normal(shape, dtype=np.float32)
        ndi.gaussian_filter(noise, self.sigma, output=noise, truncate=_TRUNCATE, mode="reflect")
        noise *= self.scale
        return noise


def blur(volume: np.ndarray, sigma_vox: tuple[float, float, float]) -> np.ndarray:
    """Anisotropic Gaussian PSF blur of a ``zyx`` float32 volume, in place."""
    ndi.gaussian_filter(volume, sigma_vox, output=volume, truncate=_TRUNCATE, mode="nearest")
    return volume


def add_gaussian_spots(
    volume: np.ndarray,
    centres_vox: np.ndarray,
    amplitudes: np.ndarray,
    sigma_vox: tuple[float, float, float],
) -> None:
    """Add 3D anisotropic Gaussians (peak ``amplitude`` at the sub-voxel centre) in place.

    Each spot is evaluated only in a ``+-4 sigma`` window, as an outer product of three
    1D profiles.
    """
    nz, ny, nx = volume.shape
    sz, sy, sx = sigma_vox
    wz, wy, wx = (SPOT_WINDOW_SIGMAS * s for s in sigma_vox)
    for (cz, cy, cx), a in zip(centres_vox, amplitudes, strict=True):
        z0, z1 = max(math.floor(cz - wz), 0), min(math.ceil(cz + wz) + 1, nz)
        y0, y1 = max(math.floor(cy - wy), 0), min(math.ceil(cy + wy) + 1, ny)
        x0, x1 = max(math.floor(cx - wx), 0), min(math.ceil(cx + wx) + 1, nx)
        if z1 <= z0 or y1 <= y0 or x1 <= x0:
            continue
        gz = np.exp(-0.5 * ((np.arange(z0, z1) - cz) / sz) ** 2) * a
        gy = np.exp(-0.5 * ((np.arange(y0, y1) - cy) / sy) ** 2)
        gx = np.exp(-0.5 * ((np.arange(x0, x1) - cx) / sx) ** 2)
        volume[z0:z1, y0:y1, x0:x1] += (
            gz[:, None, None] * (gy[:, None] * gx[None, :])[None]
        ).astype(np.float32)


def background_noise_std_adu(
    background_photons: float, gain_adu_per_e: float, read_noise_e: float
) -> float:
    """Noise std in counts of a background voxel at mean illumination (the SNR unit)."""
    return gain_adu_per_e * math.sqrt(background_photons + read_noise_e**2)


def camera(
    photons: np.ndarray,
    rng: np.random.Generator,
    *,
    gain_adu_per_e: float,
    read_noise_e: float,
    offset_adu: float,
) -> np.ndarray:
    """Shot noise, gain, Gaussian read noise and offset; returns uint16 counts.

    ``photons`` (float32, any shape) is the expected number of photo-electrons. Where it
    is at least :data:`POISSON_EXACT_BELOW`, shot and read noise are drawn together as one
    Gaussian of the summed variance; below, shot noise is exact Poisson.
    """
    lam = np.maximum(photons, 0.0, dtype=np.float32)
    gain = np.float32(gain_adu_per_e)
    read_var = np.float32((read_noise_e * gain_adu_per_e) ** 2)
    counts = rng.standard_normal(lam.shape, dtype=np.float32)
    std = lam * (gain * gain)
    std += read_var
    np.sqrt(std, out=std)
    counts *= std
    del std
    counts += lam * gain
    small = lam < POISSON_EXACT_BELOW
    if small.any():
        n_small = int(np.count_nonzero(small))
        exact = rng.poisson(lam[small]).astype(np.float32) * gain
        exact += rng.standard_normal(n_small, dtype=np.float32) * np.sqrt(read_var)
        counts[small] = exact
    counts += np.float32(offset_adu)
    np.rint(counts, out=counts)
    np.clip(counts, 0, np.iinfo(np.uint16).max, out=counts)
    return counts.astype(np.uint16)
