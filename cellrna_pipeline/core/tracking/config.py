"""The tracker's typed configuration (:class:`TrackingConfig`) and its range checks.

Lengths are micrometres (``_um``), volumes cubic micrometres, times frames (``_frames``).
Costs are dimensionless: every cost term is a squared residual divided by the squared
spread (``sigma``) that the config gives for it, so a term of 1 is a one-sigma deviation
and the thresholds read like chi-square values.
"""

from __future__ import annotations

import math

from cellrna_pipeline.core.config import CheckedModel
from cellrna_pipeline.core.errors import InputError

__all__ = ["TrackingConfig"]


class TrackingConfig(CheckedModel):
    """Parameters of :func:`~cellrna_pipeline.core.tracking.track`; see ``docs/tracking.md``.

    Unknown keys and wrong types raise pydantic's ``ValidationError``; out-of-range values
    raise a one-line :class:`InputError`.

    Attributes
    ----------
    max_displacement_um : hard gate: the largest distance (um, image coordinates) an
        object may move between consecutive frames; over a gap of ``k`` frames the gate
        is ``k`` times larger. ``None``: one typical object length, the median
        ``extent_major_um`` of the detections.
    velocity_persistence : motion model ``v(t+1) = rho v(t) + noise``; 1 is a constant-
        velocity Kalman filter, 0 a random walk (Brownian) model.
    motion_sigma_um : per-axis standard deviation of the random part of one frame's motion
        (the prior); ``None``: ``max_displacement_um / 8``.
    adapt_motion : rescale the motion noise frame by frame from the residuals of the links
        made (between 0.5x and 16x the prior), so fast data are not forced into a slow
        model.
    position_sigma_um : per-axis measurement noise of an object's centroid; ``None``:
        ``max_displacement_um / 36``.
    estimate_drift : estimate and remove a global (stage) translation between frames, from
        the median residual of a first assignment.
    volume_log_sigma : spread of ``ln(volume ratio)`` between frames; ``None`` ignores volume.
    shape_log_sigma : spread of ``ln(principal extent ratio)`` between frames; ``None``
        ignores shape.
    intensity_log_sigma : spread of ``ln(mean intensity ratio)``; ``None`` ignores intensity.
    appearance_sigma : spread of the Euclidean distance between the unit appearance
        embeddings (column ``embedding``) of one object in consecutive frames; ``None``
        ignores appearance. The term is ``|e - e_last|^2 / appearance_sigma^2`` with
        ``e_last`` the embedding of the track's last detection.
    max_link_cost : a link is made only if its cost is below this (the price of ending one
        track and starting another).
    max_gap_frames : missing frames that gap closing may bridge (0: no gap closing).
    gap_cost_per_frame : extra cost per missing frame of a gap-closing link.
    gap_closing_at_border : allow gap closing for objects last seen touching the image
        border (they usually left the field and any return is a new object).
    divisions : detect divisions (one parent track ends, two daughter tracks start).
    division_max_cost : a division is accepted only if its cost is below this.
    division_volume_log_sigma : spread of ``ln((v1 + v2) / v_parent)`` (volume is
        conserved at division) and, doubled, of ``ln(v1 / v2)`` (daughters are alike).
    division_min_age_frames : a daughter cannot divide again until its track is this old.
    """

    max_displacement_um: float | None = None
    velocity_persistence: float = 0.5
    motion_sigma_um: float | None = None
    adapt_motion: bool = True
    position_sigma_um: float | None = None
    estimate_drift: bool = True
    volume_log_sigma: float | None = None
    shape_log_sigma: float | None = 0.4
    intensity_log_sigma: float | None = None
    appearance_sigma: float | None = None
    max_link_cost: float = 30.0
    max_gap_frames: int = 2
    gap_cost_per_frame: float = 4.0
    gap_closing_at_border: bool = False
    divisions: bool = True
    division_max_cost: float = 10.0
    division_volume_log_sigma: float = 0.25
    division_min_age_frames: int = 2

    def _check(self) -> None:
        _check_ranges(self)


def _check_ranges(c: TrackingConfig) -> None:
    def positive(name: str, value: float | None, *, optional: bool = False) -> None:
        if value is None and optional:
            return
        if value is None or not math.isfinite(value) or value <= 0:
            raise InputError(f"{name} must be a positive finite number, got {value!r}")

    positive("max_displacement_um", c.max_displacement_um, optional=True)
    if not (math.isfinite(c.velocity_persistence) and 0 <= c.velocity_persistence <= 1):
        raise InputError(f"velocity_persistence must be in [0, 1], got {c.velocity_persistence!r}")
    positive("motion_sigma_um", c.motion_sigma_um, optional=True)
    positive("position_sigma_um", c.position_sigma_um, optional=True)
    positive("volume_log_sigma", c.volume_log_sigma, optional=True)
    positive("shape_log_sigma", c.shape_log_sigma, optional=True)
    positive("intensity_log_sigma", c.intensity_log_sigma, optional=True)
    positive("appearance_sigma", c.appearance_sigma, optional=True)
    positive("max_link_cost", c.max_link_cost)
    if c.max_gap_frames < 0:
        raise InputError(f"max_gap_frames must be >= 0, got {c.max_gap_frames}")
    if not math.isfinite(c.gap_cost_per_frame) or c.gap_cost_per_frame < 0:
        raise InputError(f"gap_cost_per_frame must be >= 0, got {c.gap_cost_per_frame!r}")
    positive("division_max_cost", c.division_max_cost)
    positive("division_volume_log_sigma", c.division_volume_log_sigma)
    if c.division_min_age_frames < 1:
        raise InputError(f"division_min_age_frames must be >= 1, got {c.division_min_age_frames}")
