"""Shared pieces of cell segmentation: result type, input checks, normalization, object
scale, and the clean-up that turns cell instances + a nucleus mask into consistent
``cells``, ``nuclei`` and ``semantic`` volumes.

Axis order is ``zyx`` (a 2D image is handled as one z-slice). Lateral sizes are in pixels
of the input; the z axis enters through the anisotropy ``voxel z / voxel x`` (1 when the
voxel size is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.types import VoxelSize

SEMANTIC_BACKGROUND = 0
SEMANTIC_NUCLEUS = 1
SEMANTIC_CYTOPLASM = 2
SEMANTIC_CLASSES = ("background", "nucleus", "cytoplasm")

CANONICAL_NUCLEUS_DIAMETER_PX = 24.0
"""Nucleus diameter (as measured by :func:`estimate_diameter_px`) that models see:
inputs are rescaled laterally so that their nuclei have this size."""

CELL_TO_NUCLEUS_DIAMETER = 2.0
"""Assumed cell / nucleus diameter ratio, used when only a cell stain is given (the
estimate then measures cells)."""


@dataclass(frozen=True)
class CellSegmentation:
    """Cell and nucleus instances of one volume.

    Attributes
    ----------
    cells : ``(z, y, x)`` uint32 cell ids (0 = background); every id is one 6-connected
        object.
    nuclei : ``(z, y, x)`` uint32; the nucleus of cell ``k`` has id ``k`` and lies inside
        it (a cell may have no nucleus).
    semantic : ``(z, y, x)`` uint8: 0 background, 1 nucleus, 2 cytoplasm (cell minus
        nucleus); consistent with ``cells`` and ``nuclei``.
    info : how it was made (method, diameter used, timings, model version, ...).
    """

    cells: np.ndarray
    nuclei: np.ndarray
    semantic: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(len(np.unique(self.cells)) - (1 if (self.cells == 0).any() else 0))


def check_channel(data: Any, *, name: str) -> np.ndarray:
    """Validate one image channel and return it as ``(z, y, x)`` float32.

    Parameters
    ----------
    data : ``(y, x)`` or ``(z, y, x)`` array of integers or floats, any range.
    name : used in error messages (e.g. ``"nucleus channel"``).

    Raises
    ------
    InputError
        Wrong number of dimensions, unsupported dtype, empty, NaN/inf, or constant.
    """
    arr = np.asarray(data)
    if arr.dtype.kind not in "uif":
        raise InputError(f"{name}: unsupported dtype {arr.dtype} (expected integers or floats)")
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise InputError(f"{name}: expected a (y, x) or (z, y, x) image, got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape[1:]) < 8:
        raise InputError(f"{name}: image too small {arr.shape} (y and x need >= 8 pixels)")
    arr = arr.astype(np.float32, copy=False)
    if not bool(np.isfinite(arr).all()):
        raise InputError(f"{name}: {int((~np.isfinite(arr)).sum())} NaN or infinite value(s)")
    if float(arr.max()) == float(arr.min()):
        raise InputError(f"{name}: the image is constant ({float(arr.min())}); nothing to segment")
    return arr


def normalize_percentile(
    volume: np.ndarray,
    *,
    low: float = 1.0,
    high: float = 99.8,
    clip: tuple[float, float] = (-0.5, 3.0),
) -> np.ndarray:
    """Scale intensities so that the ``low``/``high`` percentiles map to 0 and 1.

    Computed over the whole volume (not per slice), so an empty slice stays dark instead
    of having its noise stretched. Returns float32 of the same shape, clipped to ``clip``.
    """
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(vol, (low, high))
    if hi <= lo:
        hi = float(vol.max())
        lo = float(vol.min())
    out = (vol - lo) / max(float(hi - lo), 1e-6)
    return np.clip(out, *clip).astype(np.float32, copy=False)


def anisotropy_of(voxel_size: VoxelSize | None) -> float:
    """``voxel z / voxel x`` (lateral pixels per z step); 1.0 when unknown."""
    if voxel_size is None:
        return 1.0
    return float(voxel_size.z_um / ((voxel_size.y_um + voxel_size.x_um) / 2.0))


_SIZE_SMOOTHING_LADDER_PX = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIN_DIAMETER_PER_SIGMA = 4.0
_MIN_MEASURED_DIAMETER_PX = 6.0  # objects are >= 2 px in radius: blobs of 4-5 px are noise
_OBJECT_ELASTICITY = 0.5  # noise blobs grow like the smoothing (d log d / d log s ~ 1)


def estimate_diameter_px(
    volume: np.ndarray, *, max_slices: int = 8, search_scale: bool = True
) -> float:
    """Typical lateral diameter (pixels) of the bright objects of an image.

    A size model without training. At one smoothing scale ``s``: smooth (Gaussian ``s``
    px laterally), threshold halfway between the background and Otsu's threshold (so that
    textured objects are not cut into pieces), fill holes, and take twice the median over
    connected objects of the largest inscribed radius (maximum of the Euclidean distance
    transform), on the z-slices with the most foreground. For a disk this is its
    diameter; for an ellipse, its short axis. Touching objects count as one but still
    give about one object's radius.

    Noise makes blobs whose size grows with ``s`` (``d ~ s``), clumps of touching objects
    merge as ``s`` grows, objects themselves keep their size: the measure is taken over a
    ladder of scales ``s`` and the answer is the finest scale past the noise, where the
    measure grows at most half as fast as ``s`` (``|d log d / d log s| <= 0.5`` to the
    next scale; only scales at least 4 ``s`` and 6 px below the measure count; if none,
    the scale where the measure changes least). At high SNR this is the 1-px measure; at low SNR
    (nucleus photons ~ 3 x the noise) it is not fooled by noise blobs. On 24 dense-nuclei
    volumes of the training distribution (development seeds) the median error is 15 %
    (1-px measure alone: 16 %) and none is off by more than 1.5x (alone: 3, by 3-4x).

    Parameters
    ----------
    volume : ``(y, x)`` or ``(z, y, x)``, any real dtype (a nucleus or cell stain).
    max_slices : at most this many slices are measured.
    search_scale : ``False``: the 1-px measure only. Use it for cell stains: confluent
        cells merge into sheets as the smoothing grows, which the search would measure.

    Raises
    ------
    InputError
        No object to measure (blank image).
    """
    vol = check_channel(volume, name="image")
    ladder = np.asarray(_SIZE_SMOOTHING_LADDER_PX if search_scale else (1.0,))
    d = np.array([_median_diameter_px(vol, s, max_slices) for s in ladder])
    found = np.isfinite(d)
    if not found.any():
        raise InputError("no objects found to estimate their size; give a diameter hint")
    best, flattest = float(d[found][0]), np.inf
    for k in range(len(ladder) - 1):
        floor = max(_MIN_DIAMETER_PER_SIGMA * ladder[k], _MIN_MEASURED_DIAMETER_PX)
        if not (found[k] and found[k + 1]) or d[k] < floor:
            continue
        elasticity = abs(np.log(d[k + 1] / d[k]) / np.log(ladder[k + 1] / ladder[k]))
        if elasticity <= _OBJECT_ELASTICITY:
            return float(d[k])  # the finest scale past the noise: clumps merge further up
        if elasticity < flattest:
            best, flattest = float(d[k]), elasticity
    return best


def _median_diameter_px(vol: np.ndarray, sigma_px: float, max_slices: int) -> float:
    """:func:`estimate_diameter_px` at one smoothing scale (NaN: no object)."""
    from skimage.filters import threshold_otsu

    smooth = ndi.gaussian_filter(vol, sigma=(0, sigma_px, sigma_px))
    otsu = threshold_otsu(smooth)
    background = float(np.median(smooth[smooth <= otsu]))
    fg = smooth > background + 0.5 * (otsu - background)
    frac = fg.mean(axis=(1, 2))
    candidates = np.nonzero(frac >= 0.5 * frac.max())[0]
    if len(candidates) > max_slices:
        candidates = candidates[np.linspace(0, len(candidates) - 1, max_slices).round().astype(int)]
    radii: list[np.ndarray] = []
    for z in candidates:
        mask = ndi.binary_fill_holes(ndi.binary_opening(fg[z], iterations=1))
        lab, n = ndi.label(mask)
        if n == 0:
            continue
        dist = ndi.distance_transform_edt(mask)
        peak = np.asarray(ndi.maximum(dist, lab, np.arange(1, n + 1)))
        radii.append(peak[peak >= 2.0])
    found = np.concatenate(radii) if radii else np.empty(0)
    return 2.0 * float(np.median(found)) if found.size else float("nan")


def z_context_stack(volume_czyx: np.ndarray, z: int, k: int) -> np.ndarray:
    """The network input of slice ``z``: per channel the slices ``z - k .. z + k``
    (repeating the first/last slice beyond the ends), channel-major.

    Parameters
    ----------
    volume_czyx : ``(C, Z, H, W)`` array.
    z, k : slice index and context on each side (0: just slice ``z``).

    Returns
    -------
    ``(C * (2k + 1), H, W)`` array (a view when ``k == 0``).
    """
    if k == 0:
        return volume_czyx[:, z]
    idx = np.clip(np.arange(z - k, z + k + 1), 0, volume_czyx.shape[1] - 1)
    return volume_czyx[:, idx].reshape(-1, *volume_czyx.shape[2:])


def split_disconnected(labels: np.ndarray, *, min_size: int = 1) -> np.ndarray:
    """Give every 6-connected piece of every id its own id; drop pieces under ``min_size``.

    Returns uint32 labels numbered 1..n in raster order of first appearance.
    """
    from skimage.measure import label

    out = label(labels, background=0, connectivity=1).astype(np.uint32)
    if min_size > 1 and out.max() > 0:
        sizes = np.bincount(out.ravel())
        small = sizes < min_size
        small[0] = False
        out[small[out]] = 0
        out = relabel_sequential(out)
    return out


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber ids to 1..n keeping their order; uint32."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    return lut[labels]


def largest_piece_per_id(labels: np.ndarray) -> np.ndarray:
    """Keep, for every id, only its largest 6-connected piece (others become 0)."""
    from skimage.measure import label

    # On an id image, skimage's label separates touching pieces of different ids too.
    pieces = label(labels, background=0, connectivity=1)
    n = int(pieces.max())
    if n == 0:
        return np.zeros_like(labels)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)
    flat_p, flat_l = pieces.ravel(), labels.ravel()
    owner[flat_p] = flat_l
    order = np.argsort(-sizes[1:], kind="stable") + 1
    best: dict[int, int] = {}
    for p in order:
        best.setdefault(int(owner[p]), int(p))
    keep = np.zeros(n + 1, dtype=bool)
    keep[list(best.values())] = True
    return np.where(keep[pieces], labels, 0).astype(labels.dtype)


def assemble(
    cells: np.ndarray,
    nucleus_mask: np.ndarray | None,
    *,
    min_cell_size: int = 1,
    fill_nuclei: bool = True,
    info: dict[str, Any] | None = None,
) -> CellSegmentation:
    """Make consistent ``cells``, ``nuclei`` and ``semantic`` from cell ids and a nucleus mask.

    Parameters
    ----------
    cells : ``(z, y, x)`` integer cell ids (0 background), from any method.
    nucleus_mask : ``(z, y, x)`` bool, where nuclei are; ``None`` when unknown (no
        nucleus stain): then ``nuclei`` is empty.
    min_cell_size : cells (after splitting disconnected pieces) under this many voxels are
        dropped.
    fill_nuclei : fill holes of each nucleus per z-slice (nucleoli are dark).

    Returns
    -------
    CellSegmentation whose cell ids are 1..n, each one 6-connected object; nucleus ``k``
    is the largest piece of ``cells == k`` inside the nucleus mask.
    """
    cells = split_disconnected(np.asarray(cells), min_size=min_cell_size)
    if nucleus_mask is None:
        nuclei = np.zeros_like(cells)
    else:
        nuclei = np.where(np.asarray(nucleus_mask, bool) & (cells > 0), cells, 0).astype(np.uint32)
        if fill_nuclei and nuclei.any():
            nuclei = _fill_per_slice(nuclei, cells)
        nuclei = largest_piece_per_id(nuclei)
    semantic = np.zeros(cells.shape, dtype=np.uint8)
    semantic[cells > 0] = SEMANTIC_CYTOPLASM
    semantic[nuclei > 0] = SEMANTIC_NUCLEUS
    return CellSegmentation(cells=cells, nuclei=nuclei, semantic=semantic, info=dict(info or {}))


def _fill_per_slice(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Fill holes of every nucleus in every z-slice, staying inside its own cell."""
    out = nuclei.copy()
    for z in range(nuclei.shape[0]):
        sl = nuclei[z]
        if not sl.any():
            continue
        for obj, box in enumerate(ndi.find_objects(sl), start=1):
            if box is None:
                continue
            filled = ndi.binary_fill_holes(sl[box] == obj)
            region = out[z][box]
            add = filled & (region == 0) & (cells[z][box] == obj)
            region[add] = obj
    return out
