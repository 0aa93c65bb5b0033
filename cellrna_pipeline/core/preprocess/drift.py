"""Drift of every timepoint relative to a reference timepoint (translation, sub-voxel).

Each timepoint's registration channel (the nuclear stain by default) is calibrated and
registered to the reference timepoint with
:func:`~cellrna_pipeline.core.preprocess.register.register_translation`, on a central crop
so that time and memory do not grow with the field of view.

What "drift" means here: the translation of the whole field. When cells move on their
own, the estimate is the translation that best aligns the field as a whole from one frame
to the next; with every cell moving independently that includes the cells' mean motion,
not the stage drift alone (no image-based method can tell them apart without fiducials).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.preprocess.config import RegistrationConfig
from cellrna_pipeline.core.preprocess.register import register_translation
from cellrna_pipeline.core.types import VoxelSize

__all__ = [
    "DRIFT_SCHEMA",
    "drift_of",
    "estimate_drift",
    "previous_timepoint",
    "registration_channel",
]

_ANCHOR_CORRELATION_SLACK = 0.05

#: Columns of the drift table (one row per timepoint).
DRIFT_SCHEMA: dict[str, pl.DataType] = {
    "timepoint": pl.Int32(),
    "reference_timepoint": pl.Int32(),
    "channel": pl.String(),
    "dz_px": pl.Float64(),
    "dy_px": pl.Float64(),
    "dx_px": pl.Float64(),
    "dz_um": pl.Float64(),
    "dy_um": pl.Float64(),
    "dx_um": pl.Float64(),
    "correlation": pl.Float64(),
    "converged": pl.Boolean(),
    "anchored": pl.Boolean(),
}


def registration_channel(channel_names: Sequence[str], wanted: str | None) -> int:
    """Index of the channel to register on: ``wanted``, else ``"nucleus"``, else 0."""
    names = list(channel_names)
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"registration channel {wanted!r} not among {names}")
        return names.index(wanted)
    return names.index("nucleus") if "nucleus" in names else 0


def previous_timepoint(t: int, reference_timepoint: int) -> int:
    """The neighbour of ``t`` towards the reference (the link of the chain)."""
    return t - 1 if t > reference_timepoint else t + 1 if t < reference_timepoint else t


def estimate_drift(
    read_volume: Callable[[int], np.ndarray],
    timepoints: Sequence[int],
    *,
    voxel_size: VoxelSize,
    channel_name: str = "",
    config: RegistrationConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """Drift of each timepoint relative to ``config.reference_timepoint``.

    ``strategy="chain"`` (default): each timepoint is registered to its neighbour towards
    the reference and the steps are summed, so every registration compares two
    volumes one frame apart (cells that move on their own change little between
    neighbours, a lot over many frames). The sum is then refined directly against the
    reference (Gauss-Newton only, starting from the sum) and re-anchored there when the
    two agree within ``anchor_tolerance_px`` per axis and the reference correlates with
    the frame about as well as its neighbour does: with static content the result is as
    exact as direct registration, with no error accumulating along the chain.
    ``strategy="reference"``: every timepoint registered directly to the reference.

    Parameters
    ----------
    read_volume : ``t -> (z, y, x)`` calibrated volume (or the same central crop of every
        timepoint) of the registration channel.
    timepoints : the experiment's timepoints (must include the reference).
    voxel_size : physical voxel size (um).
    channel_name : recorded in the table.
    config : :class:`RegistrationConfig`.
    progress : called with ``(done, total)`` after each timepoint.

    Returns
    -------
    polars DataFrame with :data:`DRIFT_SCHEMA`, sorted by timepoint; ``d*_px`` is where
    the reference content is in that timepoint (the reference row is 0), ``d*_um`` the
    same in micrometres; ``correlation`` of the registration that was kept; ``anchored``
    whether that was the direct one against the reference.
    """
    cfg = config or RegistrationConfig()
    ts = sorted({int(t) for t in timepoints})
    ref_t = cfg.reference_timepoint
    if ref_t not in ts:
        raise InputError(f"reference timepoint {ref_t} not among the timepoints 0..{max(ts)}")
    reference = np.asarray(read_volume(ref_t), dtype=np.float32)
    found: dict[int, tuple[np.ndarray, float, bool, bool]] = {ref_t: (np.zeros(3), 1.0, True, True)}
    # outwards from the reference, each side in order, so a neighbour is always done first
    after = [t for t in ts if t > ref_t]
    before = [t for t in reversed(ts) if t < ref_t]
    done = 1
    for side in (after, before):
        previous_volume = reference
        previous_t = ref_t
        for t in side:
            volume = np.asarray(read_volume(t), dtype=np.float32)
            if cfg.strategy == "reference":
                reg = register_translation(reference, volume, voxel_size=voxel_size, config=cfg)
                found[t] = (np.asarray(reg.shift_zyx_px), reg.correlation, reg.converged, True)
            else:
                if previous_t != previous_timepoint(t, ref_t):
                    raise InputError(f"timepoints must be consecutive, {t} follows {previous_t}")
                step = register_translation(
                    previous_volume, volume, voxel_size=voxel_size, config=cfg
                )
                chained = found[previous_t][0] + np.asarray(step.shift_zyx_px)
                kept = (chained, step.correlation, step.converged, False)
                if cfg.anchor_tolerance_px > 0:
                    direct = register_translation(
                        reference,
                        volume,
                        voxel_size=voxel_size,
                        config=cfg,
                        initial_shift_zyx_px=chained,
                    )
                    moved = np.abs(np.asarray(direct.shift_zyx_px) - chained)
                    # only where the reference looks like this frame (static content):
                    # a direct fit to a decorrelated reference is not more accurate
                    similar = direct.correlation >= step.correlation - _ANCHOR_CORRELATION_SLACK
                    if direct.converged and similar and moved.max() <= cfg.anchor_tolerance_px:
                        kept = (np.asarray(direct.shift_zyx_px), direct.correlation, True, True)
                found[t] = kept
            previous_volume, previous_t = volume, t
            done += 1
            if progress is not None:
                progress(done, len(ts))
    vox = np.asarray(voxel_size.as_tuple())
    rows = []
    for t in ts:
        shift, corr, converged, anchored = found[t]
        um = shift * vox
        rows.append(
            {
                "timepoint": t,
                "reference_timepoint": ref_t,
                "channel": channel_name,
                "dz_px": shift[0],
                "dy_px": shift[1],
                "dx_px": shift[2],
                "dz_um": um[0],
                "dy_um": um[1],
                "dx_um": um[2],
                "correlation": corr,
                "converged": converged,
                "anchored": anchored,
            }
        )
    return pl.DataFrame(rows, schema=DRIFT_SCHEMA)


def drift_of(table: pl.DataFrame, timepoint: int) -> tuple[float, float, float]:
    """``(dz, dy, dx)`` in voxels of one timepoint from a drift table."""
    row = table.filter(pl.col("timepoint") == int(timepoint))
    if row.height != 1:
        raise InputError(f"no drift for timepoint {timepoint} (materialize drift_shifts first)")
    dz, dy, dx = row.select("dz_px", "dy_px", "dx_px").row(0)
    return (float(dz), float(dy), float(dx))
