"""Physical unit names found in OME-XML, ImageJ and NGFF metadata, converted to um and s."""

from __future__ import annotations

from cellrna_pipeline.core.errors import InputError

__all__ = ["length_to_um", "time_to_s"]

# Micrometres per unit. Keys are lower-case; NGFF names, OME-XML symbols, ImageJ spellings.
_UM_PER_UNIT: dict[str, float] = {
    "angstrom": 1e-4,
    "å": 1e-4,
    "picometer": 1e-6,
    "pm": 1e-6,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "µm": 1.0,  # micro sign U+00B5
    "μm": 1.0,  # greek mu U+03BC
    "um": 1.0,
    "\\u00b5m": 1.0,  # ImageJ writes the escape literally
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "m": 1e6,
}

# Seconds per unit.
_S_PER_UNIT: dict[str, float] = {
    "nanosecond": 1e-9,
    "ns": 1e-9,
    "microsecond": 1e-6,
    "µs": 1e-6,
    "us": 1e-6,
    "millisecond": 1e-3,
    "ms": 1e-3,
    "second": 1.0,
    "sec": 1.0,
    "s": 1.0,
    "minute": 60.0,
    "min": 60.0,
    "hour": 3600.0,
    "h": 3600.0,
    "day": 86400.0,
    "d": 86400.0,
}


def length_to_um(value: float, unit: str | None, *, what: str = "length") -> float:
    """Convert a length to micrometres.

    Parameters
    ----------
    value : the length in ``unit``.
    unit : unit name (``"nm"``, ``"µm"``, ``"micrometer"``, ``"micron"``, ``"mm"``, ...);
        ``None`` or ``""`` means micrometres (the OME-XML default).
    what : used in the error message.

    Returns
    -------
    float, micrometres.

    Raises
    ------
    InputError
        Unknown unit.
    """
    key = (unit or "micrometer").strip().lower()
    if key not in _UM_PER_UNIT:
        raise InputError(f"unsupported length unit {unit!r} for {what}")
    return float(value) * _UM_PER_UNIT[key]


def time_to_s(value: float, unit: str | None, *, what: str = "time") -> float:
    """Convert a duration to seconds; ``None`` or ``""`` means seconds. See :func:`length_to_um`."""
    key = (unit or "s").strip().lower()
    if key not in _S_PER_UNIT:
        raise InputError(f"unsupported time unit {unit!r} for {what}")
    return float(value) * _S_PER_UNIT[key]
