"""Classical baseline: threshold + seeded watershed on nuclei, cells grown within the cell stain.

The fallback when no model is wanted, and the reference the Mask R-CNN is benchmarked
against. Works in 3D with anisotropic voxels (the distance transform, smoothing and seed
spacing use the anisotropy), on 2D images, and on nucleus-only or cell-stain-only images.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage as ndi

from cellrna_pipeline.core.config import StrictModel
from cellrna_pipeline.core.segmentation.base import (
    CELL_TO_NUCLEUS_DIAMETER,
    CellSegmentation,
    assemble,
    normalize_percentile,
)


class ClassicalConfig(StrictModel):
    """Settings of :func:`segment_classical`, relative to the nucleus diameter ``d`` (px).

    Attributes
    ----------
    smoothing_fraction : Gaussian sigma as a fraction of ``d`` (at least 1 px laterally).
    seed_depth_fraction : a seed is a distance-transform maximum at least this fraction
        of ``d`` higher than the saddle to its neighbour (h-maxima).
    seed_min_depth_fraction : a seed must lie this fraction of ``d`` deep inside the mask.
    compactness : weight of the distance to the nucleus against the cell-stain intensity
        when cells are grown (compact watershed; per nucleus diameter).
    threshold_scale : multiplies the Otsu thresholds (< 1 segments more, > 1 less).
    min_size_fraction : objects under this fraction of a ``d``-sphere's volume are dropped.
    """

    smoothing_fraction: float = 0.06
    seed_depth_fraction: float = 0.1
    seed_min_depth_fraction: float = 0.12
    compactness: float = 0.5
    threshold_scale: float = 1.0
    min_size_fraction: float = 0.05


def _smooth(volume: np.ndarray, sigma_px: float, anisotropy: float) -> np.ndarray:
    sigma_z = sigma_px / anisotropy if volume.shape[0] > 1 else 0.0
    return ndi.gaussian_filter(volume, sigma=(sigma_z, sigma_px, sigma_px))


def _foreground(smooth: np.ndarray, scale: float) -> np.ndarray:
    from skimage.filters import threshold_otsu

    fg = smooth > threshold_otsu(smooth) * scale if scale > 0 else smooth > 0
    for z in range(fg.shape[0]):  # nucleoli / nuclei in the cell stain are dark holes
        fg[z] = ndi.binary_fill_holes(fg[z])
    return fg


def _sphere_volume(diameter_px: float, anisotropy: float, n_z: int) -> float:
    if n_z == 1:
        return float(np.pi * diameter_px**2 / 4.0)
    return float(np.pi / 6.0 * diameter_px**3 / anisotropy)


def _seeded_split(
    mask: np.ndarray, diameter_px: float, anisotropy: float, config: ClassicalConfig
) -> np.ndarray:
    """Split a binary mask into blobs of about ``diameter_px``.

    Seeds are the regional maxima of the (anisotropic) distance transform that stand
    ``seed_depth_fraction * d`` above their surroundings (h-maxima), at least
    ``seed_min_depth_fraction * d`` deep in the mask: a neck between two touching blobs
    splits them, a bumpy outline does not.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    dist = ndi.distance_transform_edt(mask, sampling=(anisotropy, 1.0, 1.0))
    sigma_z = 0.0 if mask.shape[0] == 1 else 1.0 / anisotropy
    dist = ndi.gaussian_filter(dist, sigma=(sigma_z, 1.0, 1.0)).astype(np.float32)
    peaks = h_maxima(dist, config.seed_depth_fraction * diameter_px).astype(bool)
    peaks &= dist >= config.seed_min_depth_fraction * diameter_px
    markers, n = ndi.label(peaks, structure=np.ones((3, 3, 3)))
    # Components too thin to hold a seed still count as one object each.
    comps, n_comp = ndi.label(mask)
    lone = np.setdiff1d(np.arange(1, n_comp + 1), np.unique(comps[markers > 0]))
    if len(lone):
        for k, pos in enumerate(ndi.maximum_position(dist, comps, lone), start=n + 1):
            markers[pos] = k
    return watershed(-dist, markers, mask=mask)


def _grow_cells(
    stain: np.ndarray, nuclei: np.ndarray, mask: np.ndarray, diameter_px: float, compactness: float
) -> np.ndarray:
    """Flood the cell foreground from the nuclei over the stain (bright membranes stop the
    flood); a compactness term keeps the texture inside a cell from deciding the border."""
    from skimage.segmentation import watershed

    return watershed(stain, markers=nuclei, mask=mask, compactness=compactness / diameter_px)


def segment_classical(
    nucleus: np.ndarray | None,
    cytoplasm: np.ndarray | None,
    *,
    diameter_px: float,
    anisotropy: float = 1.0,
    config: ClassicalConfig | None = None,
) -> CellSegmentation:
    """Threshold + seeded watershed.

    Nuclei: Otsu threshold of the smoothed nucleus stain, seeds at maxima of the
    (anisotropic) distance transform at least ``seed_distance_fraction * d`` apart,
    watershed on the negative distance. Cells: the cell-stain foreground (Otsu, plus the
    nuclei) is flooded from the nuclei along the stain intensity, so neighbouring cells
    meet on their bright membranes. Without a cell stain, each cell is its nucleus;
    without a nucleus stain, cells are split from their foreground like nuclei (seed
    spacing from the cell size) and have no nucleus.

    Parameters
    ----------
    nucleus, cytoplasm : ``(z, y, x)`` float32 stains (either may be ``None``, not both),
        already validated (see :func:`~cellrna_pipeline.core.segmentation.base.check_channel`).
    diameter_px : lateral nucleus diameter in pixels (cell diameter / 2 without nuclei).
    anisotropy : z step / lateral pixel size.
    config : :class:`ClassicalConfig`.

    Returns
    -------
    CellSegmentation (``info["method"] == "classical"``).
    """
    cfg = config or ClassicalConfig()
    start = time.perf_counter()
    ref = nucleus if nucleus is not None else cytoplasm
    if ref is None:
        raise ValueError("segment_classical needs a nucleus or a cell stain")
    n_z = ref.shape[0]
    sigma = max(1.0, cfg.smoothing_fraction * diameter_px)
    min_size = max(4, int(cfg.min_size_fraction * _sphere_volume(diameter_px, anisotropy, n_z)))

    nuclei = None
    if nucleus is not None:
        nuc_s = _smooth(normalize_percentile(nucleus), sigma, anisotropy)
        nuc_fg = _foreground(nuc_s, cfg.threshold_scale)
        nuc_fg = _remove_small(nuc_fg, min_size)
        nuclei = _seeded_split(nuc_fg, diameter_px, anisotropy, cfg)

    if cytoplasm is None:
        assert nuclei is not None
        cells = nuclei
        nucleus_mask = nuclei > 0
    else:
        cyt_s = _smooth(normalize_percentile(cytoplasm), sigma, anisotropy)
        cell_fg = _foreground(cyt_s, cfg.threshold_scale)
        if nuclei is not None:
            cell_fg |= nuclei > 0
            cells = _grow_cells(cyt_s, nuclei, cell_fg, diameter_px, cfg.compactness)
            nucleus_mask = nuclei > 0
        else:
            cell_fg = _remove_small(cell_fg, min_size * 4)
            cells = _seeded_split(cell_fg, diameter_px * CELL_TO_NUCLEUS_DIAMETER, anisotropy, cfg)
            nucleus_mask = None
    info = {
        "method": "classical",
        "diameter_px": round(float(diameter_px), 2),
        "anisotropy": round(float(anisotropy), 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return assemble(cells, nucleus_mask, min_cell_size=min_size, info=info)


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]
