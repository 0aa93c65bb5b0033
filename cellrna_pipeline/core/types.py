"""Small shared value types: physical voxel sizes and image metadata.

Axis order is ``tczyx`` for acquisitions and ``zyx`` for one volume; sizes are in
micrometres unless a name says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cellrna_pipeline.core.errors import InputError

AXES_TCZYX = ("t", "c", "z", "y", "x")


@dataclass(frozen=True)
class VoxelSize:
    """Physical size of one voxel, in micrometres, in ``zyx`` order."""

    z_um: float
    y_um: float
    x_um: float

    def __post_init__(self) -> None:
        for name, value in zip(("z", "y", "x"), self.as_tuple(), strict=True):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InputError(
                    f"voxel size {name} must be a positive finite number, got {value!r}"
                )

    @classmethod
    def from_nm(cls, zyx_nm: Sequence[float]) -> VoxelSize:
        """Build from ``(z, y, x)`` in nanometres (the command-line unit)."""
        if len(zyx_nm) != 3:
            raise InputError(f"voxel size needs 3 values Z Y X in nm, got {len(zyx_nm)}")
        for v in zyx_nm:
            if not math.isfinite(float(v)) or float(v) <= 0:
                raise InputError(f"voxel size must be positive and finite, got {list(zyx_nm)} nm")
        return cls(*(float(v) / 1000.0 for v in zyx_nm))

    @classmethod
    def from_um(cls, zyx_um: Sequence[float]) -> VoxelSize:
        """Build from ``(z, y, x)`` in micrometres."""
        if len(zyx_um) != 3:
            raise InputError(f"voxel size needs 3 values Z Y X in um, got {len(zyx_um)}")
        return cls(*(float(v) for v in zyx_um))

    def as_tuple(self) -> tuple[float, float, float]:
        """``(z_um, y_um, x_um)``."""
        return (self.z_um, self.y_um, self.x_um)

    def as_nm(self) -> tuple[float, float, float]:
        """``(z_nm, y_nm, x_nm)``."""
        return (self.z_um * 1000.0, self.y_um * 1000.0, self.x_um * 1000.0)

    @property
    def anisotropy(self) -> float:
        """Ratio of axial to lateral voxel size (``z_um / x_um``)."""
        return self.z_um / self.x_um


@dataclass(frozen=True)
class ImageMeta:
    """What a reader needs to know about a ``tczyx`` image.

    Attributes
    ----------
    shape_tczyx : the full-resolution shape.
    dtype : numpy dtype name, e.g. ``"uint16"``.
    voxel_size : physical voxel size (micrometres).
    channel_names : one name per channel, e.g. ``("nucleus", "cytoplasm", "rna0")``.
    frame_interval_s : time between timepoints in seconds, if known.
    """

    shape_tczyx: tuple[int, int, int, int, int]
    dtype: str
    voxel_size: VoxelSize
    channel_names: tuple[str, ...]
    frame_interval_s: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def n_timepoints(self) -> int:
        return self.shape_tczyx[0]

    @property
    def n_channels(self) -> int:
        return self.shape_tczyx[1]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.shape_tczyx[2], self.shape_tczyx[3], self.shape_tczyx[4]

    def channel_index(self, name: str) -> int:
        """Index of a channel by name; :class:`InputError` naming the channels if absent."""
        if name not in self.channel_names:
            raise InputError(f"missing channel {name!r}; the image has {list(self.channel_names)}")
        return self.channel_names.index(name)
