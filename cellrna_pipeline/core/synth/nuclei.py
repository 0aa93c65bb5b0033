"""Dense touching nuclei: nucleus-only 3D acquisitions with exact instance labels.

The cell generator (:func:`~cellrna_pipeline.core.synth.synthesize`) puts every nucleus
inside its own cell on a coverslip, so its nucleus-only views never show two nuclei
touching. Tissue, organoids, spheroids and embryos do: nuclei packed in 3D, in clumps,
touching laterally and above one another. :func:`synthesize_nuclei` makes such volumes:

1. **Placement.** ``n`` nuclei (from ``volume_fraction`` of the field plus a margin, so
   nuclei are cut by the borders; with ``layer_fraction < 1`` the field is a layer of
   that fraction of the depth at ``layer_offset``, leaving slices above and below that
   hold only out-of-focus light, as in a cell monolayer or a tissue section imaged
   through) are drawn uniformly or, with probability
   ``clustering``, around a few clump centres, then pushed apart until centres are at
   least ``contact x (r_i + r_j)`` apart (distances with z scaled by the nuclei's axial
   aspect). ``contact < 1`` leaves neighbours overlapping, so they touch.
2. **Labels.** Each nucleus is an irregular star-shaped ellipsoid (lateral harmonics
   ``m = 2..5`` of amplitude ``irregularity``, elongation up to ``elongation_max``,
   random orientation, axial aspect ``z_aspect``); where shapes overlap, a voxel goes to
   the nucleus of smallest normalized distance (the cell generator's weighted Voronoi
   split), so touching nuclei share a border; each keeps its largest 6-connected piece.
3. **Image.** Per-nucleus brightness (lognormal, ``brightness_cv``) x chromatin texture
   x darker nucleoli, blurred by the anisotropic PSF, plus out-of-focus haze (the stain
   blurred over ``haze_sigma_radii`` nucleus radii, ``haze_axial_factor`` times that
   along z, scaled by ``haze``), background,
   flat-field, and the camera (shot noise, gain, read noise, offset).

Deterministic: the same config gives bit-identical arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.config import CheckedModel
from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth.labels import render_shapes
from cellrna_pipeline.core.synth.optics import (
    Texture,
    add_gaussian_spots,
    blur,
    camera,
    illumination_field,
    psf_sigma_vox,
    sigma_um_to_vox,
)
from cellrna_pipeline.core.synth.shapes import Ellipsoid, random_harmonics
from cellrna_pipeline.core.types import VoxelSize

_TEXTURE_SIGMA_UM = (0.35, 0.3, 0.3)
_NUCLEOLUS_SIGMA_UM = (0.5, 0.5, 0.5)
_RELAX_ITERATIONS = 60


class NucleiConfig(CheckedModel):
    """One dense-nuclei volume; same config -> same bytes (see ``docs/generator.md``).

    Lengths in micrometres (``_um``) or nanometres (``_nm``), light in photo-electrons
    per voxel (``_photons``), camera values in counts (``_adu``) or electrons (``_e``);
    ``zyx`` tuples in ``(z, y, x)`` order.
    """

    seed: int = 0
    shape_zyx: tuple[int, int, int] = (48, 128, 128)
    voxel_size_um: tuple[float, float, float] = (0.5, 0.25, 0.25)

    # nuclei
    nucleus_radius_um: float = 2.5
    nucleus_radius_cv: float = 0.15
    z_aspect: float = 0.9
    elongation_max: float = 1.4
    irregularity: float = 0.12
    volume_fraction: float = 0.3
    contact: float = 0.85
    clustering: float = 0.5
    layer_fraction: float = 1.0
    layer_offset: float = 0.5

    # optics and camera
    psf_sigma_nm: tuple[float, float, float] = (600.0, 180.0, 180.0)
    nucleus_photons: float = 150.0
    brightness_cv: float = 0.3
    texture_contrast: float = 0.2
    nucleolus_contrast: float = 0.3
    haze: float = 0.2
    haze_sigma_radii: float = 2.0
    haze_axial_factor: float = 1.0
    background_photons: float = 100.0
    illumination_falloff: float = 0.2
    camera_offset_adu: float = 100.0
    camera_gain_adu_per_e: float = 1.0
    read_noise_e: float = 2.0

    def _check(self) -> None:
        _check_ranges(self)


def _check_ranges(c: NucleiConfig) -> None:
    def within(name: str, value: float, lo: float, hi: float) -> None:
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InputError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")

    if c.seed < 0:
        raise InputError(f"seed must be >= 0, got {c.seed}")
    if any(s < 1 for s in c.shape_zyx) or min(c.shape_zyx[1:]) < 8:
        raise InputError(f"shape_zyx must be positive with y, x >= 8, got {list(c.shape_zyx)}")
    for name, values in (("voxel_size_um", c.voxel_size_um), ("psf_sigma_nm", c.psf_sigma_nm)):
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise InputError(f"{name} must be positive and finite, got {list(values)}")
    if not (math.isfinite(c.nucleus_radius_um) and c.nucleus_radius_um > 0):
        raise InputError(f"nucleus_radius_um must be > 0, got {c.nucleus_radius_um!r}")
    within("nucleus_radius_cv", c.nucleus_radius_cv, 0.0, 1.0)
    within("z_aspect", c.z_aspect, 0.2, 2.0)
    within("elongation_max", c.elongation_max, 1.0, 3.0)
    within("irregularity", c.irregularity, 0.0, 0.3)
    within("volume_fraction", c.volume_fraction, 0.0, 0.6)
    within("contact", c.contact, 0.5, 1.2)
    within("clustering", c.clustering, 0.0, 1.0)
    within("brightness_cv", c.brightness_cv, 0.0, 2.0)
    within("texture_contrast", c.texture_contrast, 0.0, 1.0)
    within("nucleolus_contrast", c.nucleolus_contrast, 0.0, 0.9)
    within("haze", c.haze, 0.0, 5.0)
    within("haze_sigma_radii", c.haze_sigma_radii, 0.1, 20.0)
    within("haze_axial_factor", c.haze_axial_factor, 0.1, 10.0)
    within("layer_fraction", c.layer_fraction, 0.05, 1.0)
    within("layer_offset", c.layer_offset, 0.0, 1.0)
    within("illumination_falloff", c.illumination_falloff, 0.0, 0.99)
    for name, value in (
        ("nucleus_photons", c.nucleus_photons),
        ("background_photons", c.background_photons),
        ("camera_offset_adu", c.camera_offset_adu),
        ("read_noise_e", c.read_noise_e),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be >= 0 and finite, got {value!r}")
    if not (math.isfinite(c.camera_gain_adu_per_e) and c.camera_gain_adu_per_e > 0):
        raise InputError(f"camera_gain_adu_per_e must be > 0, got {c.camera_gain_adu_per_e!r}")


@dataclass(frozen=True)
class NucleiAcquisition:
    """A dense-nuclei volume and its ground truth.

    Attributes
    ----------
    image : ``(z, y, x)`` uint16 camera counts of the nuclear stain.
    labels : ``(z, y, x)`` uint32 nucleus instances 1..n (each one 6-connected object;
        touching nuclei share borders).
    voxel_size : physical voxel size (micrometres).
    config : the configuration that made it.
    """

    image: np.ndarray
    labels: np.ndarray
    voxel_size: VoxelSize
    config: NucleiConfig

    @property
    def anisotropy(self) -> float:
        """z step / lateral pixel size."""
        vz, vy, vx = self.config.voxel_size_um
        return vz / ((vy + vx) / 2.0)


def _place(c: NucleiConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 3)`` (um, zyx, in the volume frame) and equivalent lateral radii."""
    vox = np.asarray(c.voxel_size_um)
    extent = np.asarray(c.shape_zyx) * vox
    r0 = c.nucleus_radius_um
    margin = np.array([r0 * c.z_aspect, r0, r0])
    lo, hi = -margin, extent + margin
    if c.layer_fraction < 1.0:  # a layer of nuclei, empty slices above and below
        depth = c.layer_fraction * extent[0]
        bottom = c.layer_offset * (extent[0] - depth)
        lo[0], hi[0] = bottom, bottom + depth
    region = float(np.prod(hi - lo))
    mean_volume = 4.0 / 3.0 * math.pi * r0**3 * c.z_aspect * math.exp(4.5 * c.nucleus_radius_cv**2)
    n = int(rng.poisson(c.volume_fraction * region / mean_volume))
    radii = r0 * np.exp(rng.normal(0.0, c.nucleus_radius_cv, n))
    pos = rng.uniform(lo, hi, (n, 3))
    # clumps: a share of the nuclei around a few centres a few nuclei wide
    clump_radius = r0 * rng.uniform(3.0, 6.0)
    n_clumps = max(1, round(region / (4.0 / 3.0 * math.pi * clump_radius**3 * c.z_aspect)))
    clumped = rng.random(n) < c.clustering
    if clumped.any():
        centres = rng.uniform(lo, hi, (n_clumps, 3))
        which = rng.integers(0, n_clumps, int(clumped.sum()))
        spread = rng.normal(0.0, clump_radius / 2.0, (int(clumped.sum()), 3))
        spread[:, 0] *= c.z_aspect
        pos[clumped] = np.clip(centres[which] + spread, lo, hi)
    return _relax(pos, radii, c.contact, c.z_aspect, lo, hi), radii


def _relax(
    pos: np.ndarray,
    radii: np.ndarray,
    contact: float,
    z_aspect: float,
    lo: np.ndarray,
    hi: np.ndarray,
) -> np.ndarray:
    """Push centres apart until ``|p_i - p_j| >= contact (r_i + r_j)`` (z scaled by
    ``1 / z_aspect``), keeping them in ``[lo, hi]``."""
    from scipy.spatial import cKDTree

    if len(pos) < 2:
        return pos
    scale = np.array([1.0 / z_aspect, 1.0, 1.0])
    p = pos * scale
    reach = contact * 2.0 * float(radii.max())
    for _ in range(_RELAX_ITERATIONS):
        pairs = cKDTree(p).query_pairs(reach, output_type="ndarray")
        if len(pairs) == 0:
            break
        i, j = pairs[:, 0], pairs[:, 1]
        diff = p[i] - p[j]
        dist = np.maximum(np.linalg.norm(diff, axis=1), 1e-6)
        overlap = contact * (radii[i] + radii[j]) - dist
        keep = overlap > 1e-3
        if not keep.any():
            break
        i, j, diff, dist, overlap = i[keep], j[keep], diff[keep], dist[keep], overlap[keep]
        push = (0.5 * overlap / dist)[:, None] * diff
        move = np.zeros_like(p)
        np.add.at(move, i, push)
        np.add.at(move, j, -push)
        p = np.clip(p + 0.8 * move, lo * scale, hi * scale)
    return p / scale


def _shapes(c: NucleiConfig, radii: np.ndarray, rng: np.random.Generator) -> list[Ellipsoid]:
    shapes = []
    for r in radii:
        elong = rng.uniform(1.0, c.elongation_max)
        az = r * c.z_aspect * rng.uniform(0.85, 1.15)
        angle = float(rng.uniform(0.0, np.pi))
        amp, phase = random_harmonics(rng, c.irregularity)
        shapes.append(
            Ellipsoid(
                semi_axes_um=(az, r * math.sqrt(elong), r / math.sqrt(elong)),
                angle_rad=angle,
                harmonic_amp=amp,
                harmonic_phase=phase,
            )
        )
    return shapes


def synthesize_nuclei(config: NucleiConfig) -> NucleiAcquisition:
    """Make a dense-nuclei volume with exact instance labels (see the module docstring).

    Returns
    -------
    NucleiAcquisition: ``image`` ``(z, y, x)`` uint16, ``labels`` ``(z, y, x)`` uint32.
    """
    c = config
    geo_rng, tex_rng, noise_rng = np.random.default_rng(c.seed).spawn(3)
    vox = c.voxel_size_um
    shape = c.shape_zyx
    centres_um, radii = _place(c, geo_rng)
    shapes = _shapes(c, radii, geo_rng)
    centres_vox = [p / np.asarray(vox) for p in centres_um]
    raw, _, _ = render_shapes(shapes, centres_vox, [1.0] * len(shapes), vox, shape)
    # visible nuclei numbered 1..n in order of placement
    visible = np.bincount(raw.ravel(), minlength=len(shapes) + 1)[1:] > 0
    lut = np.zeros(len(shapes) + 1, dtype=np.uint32)
    lut[1:][visible] = np.arange(1, int(visible.sum()) + 1, dtype=np.uint32)
    labels = lut[raw]

    level = np.zeros(len(shapes) + 1, dtype=np.float32)
    level[1:] = c.nucleus_photons * np.exp(
        geo_rng.normal(0.0, c.brightness_cv, len(shapes)) - 0.5 * c.brightness_cv**2
    )
    tex = Texture(shape, sigma_um_to_vox(_TEXTURE_SIGMA_UM, vox)).draw(tex_rng)
    tex *= np.float32(c.texture_contrast)
    tex += np.float32(1.0)
    np.maximum(tex, 0.0, out=tex)
    stain = level[raw]
    stain *= tex
    del tex
    if c.nucleolus_contrast > 0 and visible.any():
        # 1-3 darker nucleoli per nucleus, within half its radii of the centre
        k = geo_rng.integers(1, 4, len(shapes))
        offsets = []
        for i in np.nonzero(visible)[0]:
            u = geo_rng.normal(size=(int(k[i]), 3))
            u *= (geo_rng.uniform(0.0, 0.5, int(k[i])) / np.linalg.norm(u, axis=1))[:, None]
            offsets.append(
                centres_vox[i] + u * np.asarray(shapes[i].semi_axes_um) / np.asarray(vox)
            )
        dark = np.zeros(shape, dtype=np.float32)
        where = np.concatenate(offsets)
        add_gaussian_spots(
            dark,
            where,
            np.full(len(where), c.nucleolus_contrast),
            sigma_um_to_vox(_NUCLEOLUS_SIGMA_UM, vox),
        )
        np.minimum(dark, np.float32(0.9), out=dark)
        stain *= np.float32(1.0) - dark
    blur(stain, psf_sigma_vox(c.psf_sigma_nm, vox))
    if c.haze > 0:
        sigma = c.haze_sigma_radii * c.nucleus_radius_um
        haze_sigma = (c.haze_axial_factor * sigma, sigma, sigma)
        stain += np.float32(c.haze) * ndi.gaussian_filter(
            stain, sigma_um_to_vox(haze_sigma, vox), mode="nearest", truncate=3.0
        )
    illum = illumination_field(shape, c.illumination_falloff, tex_rng)
    stain += np.float32(c.background_photons)
    stain *= illum
    image = camera(
        stain,
        noise_rng,
        gain_adu_per_e=c.camera_gain_adu_per_e,
        read_noise_e=c.read_noise_e,
        offset_adu=c.camera_offset_adu,
    )
    return NucleiAcquisition(
        image=image, labels=labels, voxel_size=VoxelSize.from_um(vox), config=c
    )
