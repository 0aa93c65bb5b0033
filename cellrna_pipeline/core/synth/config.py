"""The generator's typed configuration (:class:`SynthConfig`) and its range checks.

Lengths are micrometres (``_um``) or nanometres (``_nm``), times seconds (``_s``), light
levels photons per voxel (``_photons``), camera values counts (``_adu``) or electrons
(``_e``). Every ``zyx`` tuple is in ``(z, y, x)`` order.
"""

from __future__ import annotations

import math
from typing import Any

from cellrna_pipeline.core.config import CheckedModel
from cellrna_pipeline.core.errors import InputError

_MAX_CHANNEL_SHIFT_NM = 5000.0
# live-RNA mode: the largest rms step per axis and frame that a spot may take (um)
_MAX_LIVE_STEP_UM = 2.0


class LiveRnaConfig(CheckedModel):
    """Live-RNA mode of the generator: spots persist over frames with an identity.

    Each spot moves with its cell (and the cell's growth), plus its own motion:
    diffusion with a coefficient drawn per spot (log-uniform in ``diffusion_um2_per_s``)
    or, for ``directed_fraction`` of them, directed transport at a speed drawn in
    ``directed_speed_um_per_s`` in a direction kept with probability
    ``direction_persistence`` per frame. Spots are born and die (mean lifetime
    ``lifetime_frames``; births keep each cell's mean count at the static mode's),
    fluctuate in brightness (lognormal, ``intensity_fluctuation_cv`` per frame,
    correlation 0.5 between frames; transcription sites twice that: bursting) and are
    dark in a frame with ``blink_probability``. See ``docs/generator.md``.
    """

    diffusion_um2_per_s: tuple[float, float] = (0.002, 0.05)
    directed_fraction: float = 0.2
    directed_speed_um_per_s: tuple[float, float] = (0.1, 0.4)
    direction_persistence: float = 0.9
    lifetime_frames: float = 30.0
    blink_probability: float = 0.05
    intensity_fluctuation_cv: float = 0.2

    def _check(self) -> None:
        lo, hi = self.diffusion_um2_per_s
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise InputError(
                f"live_rna.diffusion_um2_per_s must be 0 < low <= high, got {[lo, hi]}"
            )
        lo, hi = self.directed_speed_um_per_s
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise InputError(
                f"live_rna.directed_speed_um_per_s must be 0 <= low <= high, got {[lo, hi]}"
            )
        for name in ("directed_fraction", "direction_persistence", "blink_probability"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise InputError(f"live_rna.{name} must be in [0, 1], got {value!r}")
        if self.blink_probability >= 1:
            raise InputError("live_rna.blink_probability must be < 1 (spots would never show)")
        if not (math.isfinite(self.lifetime_frames) and self.lifetime_frames >= 1):
            raise InputError(f"live_rna.lifetime_frames must be >= 1, got {self.lifetime_frames!r}")
        cv = self.intensity_fluctuation_cv
        if not (math.isfinite(cv) and 0 <= cv <= 2):
            raise InputError(f"live_rna.intensity_fluctuation_cv must be in [0, 2], got {cv!r}")


class SynthConfig(CheckedModel):
    """Everything that decides one synthetic acquisition; same config -> same bytes.

    Range errors raise :class:`InputError` (one line); unknown keys and wrong types raise
    pydantic's ``ValidationError``. See ``docs/generator.md`` for each parameter.
    """

    seed: int = 0
    timepoints: int = 8
    shape_zyx: tuple[int, int, int] = (32, 256, 256)
    voxel_size_um: tuple[float, float, float] = (0.6, 0.15, 0.15)
    frame_interval_s: float = 300.0

    # cells
    n_cells: int = 12
    cell_radius_um: float = 6.0
    cell_radius_cv: float = 0.12
    cell_z_aspect: float = 0.6
    cell_irregularity: float = 0.12
    nucleus_fraction: float = 0.5

    # RNA
    n_rna_channels: int = 1
    spots_per_cell: float = 30.0
    expression_cv: float = 0.4
    nuclear_spot_fraction: float = 0.3
    cluster_probability: float = 0.3
    transcription_sites: int = 2
    outside_spots_per_frame: float = 2.0
    spot_amplitude_cv: float = 0.25

    # optics and camera
    psf_sigma_nm: tuple[float, float, float] = (350.0, 150.0, 150.0)
    snr: float = 8.0
    background_photons: float = 100.0
    illumination_falloff: float = 0.3
    nucleus_stain_photons: float = 400.0
    cytoplasm_stain_photons: float = 120.0
    membrane_contrast: float = 1.0
    autofluorescence_photons: float = 15.0
    texture_contrast: float = 0.3
    bleach_per_frame: float = 0.01
    camera_offset_adu: float = 100.0
    camera_gain_adu_per_e: float = 1.0
    read_noise_e: float = 2.0
    # chromatic aberration: channel c is imaged displaced by channel_shift_zyx_nm[c]
    # (z, y, x) relative to the labels and the spot table; () = no shift
    channel_shift_zyx_nm: tuple[tuple[float, float, float], ...] = ()
    # also make calibration images: dark frames, a flat-field slide, a bead volume
    calibration_images: bool = True

    # dynamics
    motion_um_per_frame: float = 1.0
    motion_persistence: float = 0.5
    drift_um_per_frame: tuple[float, float, float] = (0.2, 1.0, 1.0)
    division_probability: float = 0.08
    confluence_limit: float = 2.0
    enter_leave: bool = True

    # live-RNA mode (None: every frame's spots are drawn anew, without identity)
    live_rna: LiveRnaConfig | None = None

    def _check(self) -> None:
        _check_ranges(self)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """``("nucleus", "cytoplasm", "rna0"[, "rna1"])``."""
        return ("nucleus", "cytoplasm", *(f"rna{r}" for r in range(self.n_rna_channels)))


LIVE_RNA_DEFAULTS: dict[str, Any] = {
    "frame_interval_s": 2.0,
    "motion_um_per_frame": 0.1,
    "drift_um_per_frame": (0.05, 0.2, 0.2),
    "division_probability": 0.0,
}
"""Settings of a live-RNA movie that :func:`live_rna_config` starts from: a volume every
2 s, cells and stage moving accordingly slowly, no divisions during the movie."""


def live_rna_config(**overrides: Any) -> SynthConfig:
    """A live-RNA :class:`SynthConfig`: :data:`LIVE_RNA_DEFAULTS`, ``live_rna=LiveRnaConfig()``
    and ``overrides`` (``live_rna`` may be a dict of :class:`LiveRnaConfig` fields)."""
    live = overrides.pop("live_rna", None)
    if not isinstance(live, LiveRnaConfig):
        live = LiveRnaConfig(**(live or {}))
    return SynthConfig(**{**LIVE_RNA_DEFAULTS, **overrides, "live_rna": live})


def _check_ranges(c: SynthConfig) -> None:
    def finite(name: str, value: float) -> None:
        if not math.isfinite(value):
            raise InputError(f"{name} must be finite, got {value!r}")

    def positive(name: str, value: float) -> None:
        finite(name, value)
        if value <= 0:
            raise InputError(f"{name} must be > 0, got {value!r}")

    def non_negative(name: str, value: float) -> None:
        finite(name, value)
        if value < 0:
            raise InputError(f"{name} must be >= 0, got {value!r}")

    def fraction(name: str, value: float, *, below_one: bool = False) -> None:
        finite(name, value)
        if value < 0 or value > 1 or (below_one and value >= 1):
            bound = "[0, 1)" if below_one else "[0, 1]"
            raise InputError(f"{name} must be in {bound}, got {value!r}")

    if c.seed < 0:
        raise InputError(f"seed must be >= 0, got {c.seed}")
    if c.timepoints < 1:
        raise InputError(f"timepoints must be >= 1, got {c.timepoints}")
    if any(s < 1 for s in c.shape_zyx):
        raise InputError(f"shape_zyx must be positive, got {list(c.shape_zyx)}")
    if min(c.shape_zyx[1:]) < 8:
        raise InputError(f"shape_zyx y and x must be >= 8 voxels, got {list(c.shape_zyx)}")
    for name, values in (
        ("voxel_size_um", c.voxel_size_um),
        ("psf_sigma_nm", c.psf_sigma_nm),
    ):
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise InputError(f"{name} must be positive and finite, got {list(values)}")
    if any(not math.isfinite(v) or v < 0 for v in c.drift_um_per_frame):
        raise InputError(
            f"drift_um_per_frame must be >= 0 and finite, got {list(c.drift_um_per_frame)}"
        )
    positive("frame_interval_s", c.frame_interval_s)
    if c.n_cells < 0:
        raise InputError(f"n_cells must be >= 0, got {c.n_cells}")
    positive("cell_radius_um", c.cell_radius_um)
    fraction("cell_radius_cv", c.cell_radius_cv)
    if not (0.1 <= c.cell_z_aspect <= 1.0):
        raise InputError(f"cell_z_aspect must be in [0.1, 1], got {c.cell_z_aspect!r}")
    if not (0 <= c.cell_irregularity <= 0.3):
        raise InputError(f"cell_irregularity must be in [0, 0.3], got {c.cell_irregularity!r}")
    if not (0.1 <= c.nucleus_fraction <= 0.8):
        raise InputError(f"nucleus_fraction must be in [0.1, 0.8], got {c.nucleus_fraction!r}")
    if c.n_rna_channels not in (1, 2):
        raise InputError(f"n_rna_channels must be 1 or 2, got {c.n_rna_channels}")
    non_negative("spots_per_cell", c.spots_per_cell)
    non_negative("expression_cv", c.expression_cv)
    fraction("nuclear_spot_fraction", c.nuclear_spot_fraction)
    fraction("cluster_probability", c.cluster_probability)
    if not (0 <= c.transcription_sites <= 8):
        raise InputError(f"transcription_sites must be in 0..8, got {c.transcription_sites}")
    non_negative("outside_spots_per_frame", c.outside_spots_per_frame)
    non_negative("spot_amplitude_cv", c.spot_amplitude_cv)
    positive("snr", c.snr)
    non_negative("background_photons", c.background_photons)
    fraction("illumination_falloff", c.illumination_falloff, below_one=True)
    non_negative("nucleus_stain_photons", c.nucleus_stain_photons)
    non_negative("cytoplasm_stain_photons", c.cytoplasm_stain_photons)
    non_negative("membrane_contrast", c.membrane_contrast)
    non_negative("autofluorescence_photons", c.autofluorescence_photons)
    fraction("texture_contrast", c.texture_contrast)
    fraction("bleach_per_frame", c.bleach_per_frame, below_one=True)
    non_negative("camera_offset_adu", c.camera_offset_adu)
    positive("camera_gain_adu_per_e", c.camera_gain_adu_per_e)
    non_negative("read_noise_e", c.read_noise_e)
    if c.channel_shift_zyx_nm:
        n_channels = len(c.channel_names)
        if len(c.channel_shift_zyx_nm) != n_channels:
            raise InputError(
                f"channel_shift_zyx_nm needs one (z, y, x) shift per channel ({n_channels}), "
                f"got {len(c.channel_shift_zyx_nm)}"
            )
        for shift in c.channel_shift_zyx_nm:
            if any(not math.isfinite(v) or abs(v) > _MAX_CHANNEL_SHIFT_NM for v in shift):
                raise InputError(
                    f"channel_shift_zyx_nm values must be finite and within "
                    f"+-{_MAX_CHANNEL_SHIFT_NM:g} nm, got {list(shift)}"
                )
    if c.background_photons == 0 and c.read_noise_e == 0:
        raise InputError("background_photons and read_noise_e are both 0: snr is undefined")
    non_negative("motion_um_per_frame", c.motion_um_per_frame)
    fraction("motion_persistence", c.motion_persistence, below_one=True)
    fraction("division_probability", c.division_probability)
    finite("confluence_limit", c.confluence_limit)
    if c.confluence_limit <= 1:
        raise InputError(f"confluence_limit must be > 1, got {c.confluence_limit!r}")
    if c.live_rna is not None:
        dt = c.frame_interval_s
        step = max(
            math.sqrt(2.0 * c.live_rna.diffusion_um2_per_s[1] * dt),
            c.live_rna.directed_speed_um_per_s[1] * dt,
        )
        if step > _MAX_LIVE_STEP_UM:
            raise InputError(
                f"live_rna: spots would move up to {step:.2g} um per frame at frame_interval_s="
                f"{dt:g}; lower frame_interval_s (live imaging: about 1-5 s) or the spot motion"
            )
