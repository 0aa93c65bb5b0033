"""Irregular 3D cell and nucleus shapes, evaluated in a bounding box of the volume.

A shape is a star-shaped ellipsoid: in the ellipsoid's own normalized coordinates the
radius in lateral direction ``phi`` is ``1 + h(phi)``, where ``h`` is a sum of low-order
angular harmonics. It may be cut flat below its centre (a cell lying on the coverslip).
``normalized_distance2`` returns ``d**2`` with ``d <= 1`` inside; comparing ``d`` between
cells gives the Voronoi-like split of touching cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# h(phi) is clipped so a shape never pinches to a point or doubles its radius
_H_MIN, _H_MAX = -0.45, 0.6


N_HARMONICS = 4  # m = 2..5: low-order outline bumps


def random_harmonics(
    rng: np.random.Generator, irregularity: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Random outline bumps for :class:`Ellipsoid`: ``(harmonic_amp, harmonic_phase)``,
    amplitudes ``irregularity * N(0, 1) / sqrt(m - 1)`` for ``m = 2 .. N_HARMONICS + 1``
    (drawn first), phases uniform in ``[0, 2 pi)``."""
    m = np.arange(2, 2 + N_HARMONICS)
    amp = irregularity * rng.normal(size=N_HARMONICS) / np.sqrt(m - 1)
    phase = rng.uniform(0.0, 2 * np.pi, N_HARMONICS)
    return tuple(float(v) for v in amp), tuple(float(v) for v in phase)


@dataclass(frozen=True)
class Ellipsoid:
    """An irregular ellipsoid in micrometres.

    Attributes
    ----------
    semi_axes_um : ``(c_z, a, b)``: axial semi-axis, then the two lateral semi-axes
        (along the rotated x' and y' axes).
    angle_rad : rotation of the lateral axes in the ``yx`` plane.
    harmonic_amp, harmonic_phase : ``(M,)`` amplitudes and phases of ``cos(m phi + p)``
        for ``m = 2 .. M + 1``.
    bottom_um : the shape is cut flat this far below its centre (``inf``: not cut).
    """

    semi_axes_um: tuple[float, float, float]
    angle_rad: float
    harmonic_amp: tuple[float, ...] = ()
    harmonic_phase: tuple[float, ...] = ()
    bottom_um: float = math.inf

    def lateral_extent_um(self, scale: float = 1.0) -> float:
        """Largest lateral distance from the centre to the surface (a bound)."""
        bump = min(1.0 + sum(abs(a) for a in self.harmonic_amp), 1.0 + _H_MAX)
        return max(self.semi_axes_um[1], self.semi_axes_um[2]) * scale * bump

    def axial_extent_um(self, scale: float = 1.0) -> float:
        """Largest axial distance from the centre to the surface (a bound)."""
        bump = min(1.0 + sum(abs(a) for a in self.harmonic_amp), 1.0 + _H_MAX)
        return self.semi_axes_um[0] * scale * bump

    def volume_um3(self, scale: float = 1.0) -> float:
        """Volume in um^3: exact for the irregular outline, the flat cut as for an ellipsoid."""
        cz, a, b = (s * scale for s in self.semi_axes_um)
        phi = np.linspace(0.0, 2.0 * np.pi, 256, endpoint=False)
        h = np.clip(_harmonics(phi, self.harmonic_amp, self.harmonic_phase), _H_MIN, _H_MAX)
        # a radial function of phi only: volume = (4 pi / 3) * mean over phi of (1+h)^3
        ball = 4.0 / 3.0 * np.pi * cz * a * b * float(np.mean((1.0 + h) ** 3))
        cut = min(self.bottom_um * scale / cz, 1.0) if math.isfinite(self.bottom_um) else 1.0
        # fraction of a unit ball above the plane z = -cut
        kept = 1.0 - (1.0 - cut) ** 2 * (2.0 + cut) / 4.0
        return ball * kept


def _harmonics(phi: np.ndarray, amp: tuple[float, ...], phase: tuple[float, ...]) -> np.ndarray:
    h = np.zeros_like(phi)
    for m, (a, p) in enumerate(zip(amp, phase, strict=True), start=2):
        h += a * np.cos(m * phi + p)
    return h


def bounding_box(
    shape: Ellipsoid,
    centre_vox: np.ndarray,
    scale: float,
    voxel_um: tuple[float, float, float],
    volume_zyx: tuple[int, int, int],
    pad: int = 0,
) -> tuple[slice, slice, slice] | None:
    """Voxel bounding box of the shape clipped to the volume; ``None`` if empty.

    ``centre_vox`` is the ``(z, y, x)`` centre in (sub-)voxels; ``pad`` widens the box.
    """
    ez = shape.axial_extent_um(scale) / voxel_um[0]
    ey = shape.lateral_extent_um(scale) / voxel_um[1]
    ex = shape.lateral_extent_um(scale) / voxel_um[2]
    cz, cy, cx = (float(c) for c in centre_vox)
    z0 = math.floor(cz - ez) - pad
    if math.isfinite(shape.bottom_um):
        z0 = max(z0, math.ceil(cz - shape.bottom_um * scale / voxel_um[0] - 1e-9) - pad)
    lo = (z0, math.floor(cy - ey) - pad, math.floor(cx - ex) - pad)
    hi = (math.ceil(cz + ez) + 1 + pad, math.ceil(cy + ey) + 1 + pad, math.ceil(cx + ex) + 1 + pad)
    box = []
    for lo_i, hi_i, n in zip(lo, hi, volume_zyx, strict=True):
        lo_c, hi_c = max(lo_i, 0), min(hi_i, n)
        if hi_c <= lo_c:
            return None
        box.append(slice(lo_c, hi_c))
    return box[0], box[1], box[2]


def normalized_distance2(
    shape: Ellipsoid,
    centre_vox: np.ndarray,
    scale: float,
    voxel_um: tuple[float, float, float],
    box: tuple[slice, slice, slice],
) -> np.ndarray:
    """Squared normalized distance ``d**2`` of every voxel of ``box`` (float32, zyx).

    ``d <= 1`` inside the shape; voxels below the flat cut get ``inf``. The shape is
    ``scale`` times its nominal size and centred at ``centre_vox`` (voxels).
    """
    cz, cy, cx = (float(c) for c in centre_vox)
    sz, sa, sb = (s * scale for s in shape.semi_axes_um)
    z = np.arange(box[0].start, box[0].stop, dtype=np.float64)
    dz_um = (z - cz) * voxel_um[0]
    dz2 = (dz_um / sz) ** 2
    if math.isfinite(shape.bottom_um):
        dz2[dz_um < -shape.bottom_um * scale - 1e-9] = np.inf
    dy = ((np.arange(box[1].start, box[1].stop) - cy) * voxel_um[1])[:, None]
    dx = ((np.arange(box[2].start, box[2].stop) - cx) * voxel_um[2])[None, :]
    cos, sin = math.cos(shape.angle_rad), math.sin(shape.angle_rad)
    u = (cos * dx + sin * dy) / sa
    w = (-sin * dx + cos * dy) / sb
    if shape.harmonic_amp:
        h = _harmonics(np.arctan2(w, u), shape.harmonic_amp, shape.harmonic_phase)
        inv = 1.0 / (1.0 + np.clip(h, _H_MIN, _H_MAX)) ** 2
    else:
        inv = np.ones_like(u)
    lateral = ((u * u + w * w) * inv).astype(np.float32)
    return lateral[None, :, :] + (dz2.astype(np.float32)[:, None, None] * inv.astype(np.float32))
