"""Small RGB previews of volumes and labels (for asset metadata and QC reports)."""

from __future__ import annotations

import base64

import numpy as np
import polars as pl

# Channel colours for a composite: nucleus blue, cytoplasm green, RNA magenta/yellow.
_COLOURS = np.array(
    [[0.2, 0.4, 1.0], [0.1, 0.9, 0.2], [1.0, 0.1, 0.9], [1.0, 0.9, 0.1]], dtype=np.float32
)


def composite_mip(volume_czyx: np.ndarray, *, max_size: int = 256) -> np.ndarray:
    """Maximum-intensity projection over z of each channel, blended into one RGB image.

    Parameters
    ----------
    volume_czyx : array (c, z, y, x), any real dtype.
    max_size : longest side of the output in pixels (strided down-sampling).

    Returns
    -------
    uint8 array (y', x', 3).
    """
    if volume_czyx.ndim != 4:
        raise ValueError(f"expected (c, z, y, x), got shape {volume_czyx.shape}")
    step = max(1, int(np.ceil(max(volume_czyx.shape[2:]) / max_size)))
    mip = volume_czyx[:, :, ::step, ::step].max(axis=1).astype(np.float32)
    rgb = np.zeros((*mip.shape[1:], 3), dtype=np.float32)
    for c, plane in enumerate(mip):
        lo, hi = np.percentile(plane, (1.0, 99.8))
        scaled = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb += scaled[..., None] * _COLOURS[c % len(_COLOURS)]
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 (y, x, 3) image as PNG."""
    import imageio.v3 as iio

    return bytes(iio.imwrite("<bytes>", rgb, extension=".png"))


def markdown_png(png: bytes, alt: str = "preview") -> str:
    """A markdown image with the PNG inlined as a data URI (renders in the Dagster UI)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def markdown_image(rgb: np.ndarray, alt: str = "preview") -> str:
    """:func:`markdown_png` of a uint8 (y, x, 3) image."""
    return markdown_png(png_bytes(rgb), alt)


def markdown_table(df: pl.DataFrame, *, max_rows: int = 50) -> str:
    """A small frame as a markdown table (floats to 4 significant digits)."""
    if df.height == 0:
        return "empty"
    rows = [
        [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        for row in df.head(max_rows).rows()
    ]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
