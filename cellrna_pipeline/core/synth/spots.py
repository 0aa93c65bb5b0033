"""Where the RNA spots of one frame and one channel are, how bright, and of what kind.

Spots are drawn from the rendered label volumes, so a spot's compartment always agrees
with the ``nuclei``/``cells`` label at its rounded centre. No two spots of one
``(t, channel)`` share a voxel after rounding, so each keeps a non-empty label.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cellrna_pipeline.core.synth.config import SynthConfig
from cellrna_pipeline.core.synth.labels import Box
from cellrna_pipeline.core.synth.population import Cell

SINGLE, CLUSTER, TRANSCRIPTION_SITE = "single", "cluster", "transcription_site"
KINDS = (SINGLE, CLUSTER, TRANSCRIPTION_SITE)
_JITTER = 0.499  # sub-voxel offset bound: rounding a centre gives back its voxel
_CLUSTER_SIGMA_UM = 0.2
_CLUSTER_RADIUS_UM = 0.5
_CLUSTER_SIZE = (5, 15)
_TS_BRIGHTNESS = (3.0, 8.0)


@dataclass(frozen=True)
class FrameSpots:
    """Spots of one ``(t, channel)``: ``(n, 3)`` zyx voxel centres, amplitudes, kinds
    (and, in live-RNA mode, ground-truth track ids)."""

    centres_vox: np.ndarray
    amplitudes_adu: np.ndarray
    kinds: np.ndarray  # (n,) int index into KINDS
    track_ids: np.ndarray | None = None  # (n,) uint32, live-RNA mode only


class _Sampler:
    def __init__(self, shape_zyx: tuple[int, int, int], rng: np.random.Generator) -> None:
        self.shape = shape_zyx
        self.rng = rng
        self.occupied = np.zeros(int(np.prod(shape_zyx)), dtype=bool)
        self.centres: list[np.ndarray] = []
        self.amplitudes: list[np.ndarray] = []
        self.kinds: list[np.ndarray] = []

    def place(self, positions: np.ndarray, n: int) -> np.ndarray:
        """The first ``n`` of ``positions`` (zyx voxels, in the volume) on free voxels.

        Positions that round to a used voxel, or to one taken earlier in the list, are
        skipped; the kept ones mark their voxels used.
        """
        if n <= 0 or len(positions) == 0:
            return positions[:0]
        flat = np.ravel_multi_index(tuple(np.rint(positions).astype(np.int64).T), self.shape)
        _, first = np.unique(flat, return_index=True)
        order = np.sort(first)
        positions, flat = positions[order], flat[order]
        free = ~self.occupied[flat]
        positions, flat = positions[free][:n], flat[free][:n]
        self.occupied[flat] = True
        return positions

    def from_voxels(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """Up to ``n`` distinct free voxels drawn uniformly from flat ``candidates``."""
        if n <= 0 or candidates.size == 0:
            return candidates[:0]
        size = min(candidates.size, 2 * n + 8)
        picked = candidates[self.rng.choice(candidates.size, size=size, replace=False)]
        picked = picked[~self.occupied[picked]][:n]
        self.occupied[picked] = True
        return picked

    def add(self, centres: np.ndarray, amplitudes: np.ndarray, kind: str) -> None:
        if len(centres):
            self.centres.append(centres)
            self.amplitudes.append(amplitudes)
            self.kinds.append(np.full(len(centres), KINDS.index(kind), dtype=np.int8))

    def jittered(self, flat: np.ndarray) -> np.ndarray:
        zyx = np.stack(np.unravel_index(flat, self.shape), axis=1).astype(np.float64)
        return zyx + self.rng.uniform(-_JITTER, _JITTER, zyx.shape)


def _to_global(mask: np.ndarray, origin: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices in a volume of ``shape`` of the true voxels of a box at ``origin``."""
    zyx = np.stack(np.unravel_index(np.flatnonzero(mask), mask.shape), axis=1) + origin
    return np.ravel_multi_index(tuple(zyx.T), shape)


def visible_cell_pools(
    cells: Sequence[Cell],
    boxes: Sequence[Box | None],
    visible_fraction: np.ndarray,
    cell_labels: np.ndarray,
    nuclei: np.ndarray,
) -> Iterator[tuple[int, Cell, np.ndarray, np.ndarray]]:
    """``(i, cell, nucleus voxels, cytoplasm voxels)`` (flat indices) of each visible cell."""
    for i, (cell, box) in enumerate(zip(cells, boxes, strict=True)):
        if box is None or visible_fraction[i] <= 0:
            continue
        origin = np.array([b.start for b in box])
        in_cell = cell_labels[box] == i + 1
        in_nuc = nuclei[box] == i + 1
        if not in_cell.any():
            continue
        shape = cell_labels.shape
        yield (
            i,
            cell,
            _to_global(in_nuc, origin, shape),
            _to_global(in_cell & ~in_nuc, origin, shape),
        )


def nuclear_count(
    rng: np.random.Generator, n: int, fraction: float, nuc_vox: np.ndarray, cyt_vox: np.ndarray
) -> int:
    """How many of ``n`` single molecules of a cell go to its nucleus (all without a
    cytoplasm in view, none without a nucleus)."""
    n_nuc = int(rng.binomial(n, fraction)) if nuc_vox.size else 0
    return n if cyt_vox.size == 0 else n_nuc


def lognormal_amplitudes(
    rng: np.random.Generator, n: int, amplitude_adu: float, cv: float
) -> np.ndarray:
    """``n`` amplitudes, lognormal with mean ``amplitude_adu`` and coefficient of variation
    ``cv`` (all equal, drawing nothing, when ``cv`` is 0)."""
    if cv == 0:
        return np.full(n, amplitude_adu)
    sigma = np.sqrt(np.log1p(cv * cv))
    return amplitude_adu * np.exp(rng.normal(-0.5 * sigma * sigma, sigma, n))


def sample_spots(
    *,
    cells: Sequence[Cell],
    boxes: Sequence[Box | None],
    visible_fraction: np.ndarray,
    cell_labels: np.ndarray,
    nuclei: np.ndarray,
    channel: int,
    config: SynthConfig,
    amplitude_adu: float,
    rng: np.random.Generator,
) -> FrameSpots:
    """Draw the spots of one frame and RNA channel.

    Parameters
    ----------
    cells, boxes, visible_fraction : the population with each cell's bounding box and the
        fraction of its volume in view (spot counts scale with it).
    cell_labels, nuclei : ``(z, y, x)`` uint32 provisional labels (``i + 1`` = ``cells[i]``).
    amplitude_adu : mean single-molecule peak amplitude above background, in counts.

    Per visible cell: ``Poisson(spots_per_cell * expression * visible_fraction)`` single
    molecules split nucleus/cytoplasm by ``nuclear_spot_fraction``; its transcription sites
    (3-8x brighter) in the nucleus; with ``cluster_probability`` a cluster of 5-15
    molecules within 0.5 um. Plus ``Poisson(outside_spots_per_frame)`` spots outside cells.
    """
    c = config
    shape = cell_labels.shape
    vox = np.asarray(c.voxel_size_um)
    s = _Sampler(shape, rng)

    def amplitudes(n: int) -> np.ndarray:
        return lognormal_amplitudes(rng, n, amplitude_adu, c.spot_amplitude_cv)

    pools = visible_cell_pools(cells, boxes, visible_fraction, cell_labels, nuclei)
    for i, cell, nuc_vox, cyt_vox in pools:
        # transcription sites first: they are few and must find room in the nucleus
        n_ts = int(cell.n_transcription_sites[channel]) if nuc_vox.size else 0
        picked = s.from_voxels(nuc_vox, n_ts)
        brightness = rng.uniform(*_TS_BRIGHTNESS, len(picked))
        s.add(s.jittered(picked), amplitudes(len(picked)) * brightness, TRANSCRIPTION_SITE)

        lam = c.spots_per_cell * float(cell.expression[channel]) * float(visible_fraction[i])
        n = int(rng.poisson(lam))
        n_nuc = nuclear_count(rng, n, c.nuclear_spot_fraction, nuc_vox, cyt_vox)
        for pool, k in ((nuc_vox, n_nuc), (cyt_vox, n - n_nuc)):
            picked = s.from_voxels(pool, k)
            s.add(s.jittered(picked), amplitudes(len(picked)), SINGLE)

        if c.cluster_probability > 0 and rng.random() < c.cluster_probability:
            pool = cyt_vox if cyt_vox.size else nuc_vox
            target = int(rng.integers(_CLUSTER_SIZE[0], _CLUSTER_SIZE[1] + 1))
            centre = s.jittered(pool[rng.integers(0, pool.size, 1)])[0]
            kept: list[np.ndarray] = []
            for _ in range(4):  # a few rounds of rejection fill most clusters
                missing = target - sum(len(k) for k in kept)
                if missing <= 0:
                    break
                off = rng.normal(0.0, _CLUSTER_SIGMA_UM, (2 * missing + 4, 3))
                norm = np.linalg.norm(off, axis=1, keepdims=True)
                off *= np.minimum(1.0, _CLUSTER_RADIUS_UM / np.maximum(norm, 1e-12))
                pos = centre + off / vox
                rounded = np.rint(pos).astype(np.int64)
                ok = np.all((rounded >= 0) & (rounded < np.array(shape)), axis=1)
                pos, rounded = pos[ok], rounded[ok]
                pos = pos[cell_labels[tuple(rounded.T)] == i + 1]
                kept.append(s.place(pos, missing))
            cluster = np.concatenate(kept)
            s.add(cluster, amplitudes(len(cluster)), CLUSTER)

    n_out = int(rng.poisson(c.outside_spots_per_frame)) if c.outside_spots_per_frame > 0 else 0
    if n_out:
        flat = rng.integers(0, cell_labels.size, 4 * n_out + 8)
        flat = flat[cell_labels.ravel()[flat] == 0]
        placed = s.place(s.jittered(flat), n_out)
        s.add(placed, amplitudes(len(placed)), SINGLE)

    if not s.centres:
        return FrameSpots(np.zeros((0, 3)), np.zeros(0), np.zeros(0, dtype=np.int8))
    return FrameSpots(
        np.concatenate(s.centres), np.concatenate(s.amplitudes), np.concatenate(s.kinds)
    )
