"""Live-RNA mode: RNA spots that persist over frames, with ground-truth track ids.

Used by :func:`~cellrna_pipeline.core.synth.synthesize` when ``config.live_rna`` is set
(in place of :func:`~cellrna_pipeline.core.synth.spots.sample_spots`, which draws every
frame's spots anew). Per RNA channel, each spot has a track id, an owner cell (or none:
non-specific spots stuck to the coverslip) and a position in the world frame (um). Frame
by frame:

1. **Carried by the cell**: a spot moves with its owner's centre and scales with its
   growth; when the owner divides, each spot goes to the daughter on its side of the
   division axis (transcription sites end: the daughters get their own).
2. **Own motion**: a Brownian step of ``sqrt(2 D dt)`` per axis (``D`` per spot,
   log-uniform in ``diffusion_um2_per_s``), or directed transport (``directed_fraction``
   of the spots) at a speed drawn per spot, changing direction with probability
   ``1 - direction_persistence`` per frame. A step that would leave the owner cell
   (transcription sites: the nucleus) is not taken (directed spots turn back); a spot
   that the cell's new outline leaves outside is pulled towards the centre.
3. **Deaths and births**: single molecules and non-specific spots end with probability
   ``1 / lifetime_frames`` per frame; each visible cell gains
   ``Poisson(spots_per_cell x expression x visible fraction / lifetime_frames)`` new
   ones (a cell seen for the first time starts with the static mode's count), so the mean
   count stays that of the static mode; each nucleus keeps its transcription sites.
4. **Brightness**: a per-spot base amplitude (lognormal, ``spot_amplitude_cv``; sites
   3-8x brighter) times a lognormal AR(1) fluctuation (``intensity_fluctuation_cv``,
   correlation 0.5 between frames; sites twice that, bursting).
5. **Shown or not**: a spot is dark in a frame with ``blink_probability``, and is not
   shown while out of the volume, outside its (visible) cell, or on a voxel taken by
   another spot; it keeps its track id, so its track has a gap there.

Dense clusters (``cluster_probability``) are not made in this mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cellrna_pipeline.core.synth.config import SynthConfig
from cellrna_pipeline.core.synth.labels import Box
from cellrna_pipeline.core.synth.population import Cell
from cellrna_pipeline.core.synth.spots import (
    KINDS,
    SINGLE,
    TRANSCRIPTION_SITE,
    FrameSpots,
    _Sampler,
    lognormal_amplitudes,
    nuclear_count,
    visible_cell_pools,
)

__all__ = ["LiveSpots"]

_FLUCTUATION_CORRELATION = 0.5  # of the log-brightness between consecutive frames
_SITE_FLUCTUATION = 2.0  # transcription sites fluctuate this much more (bursting)
_TS_BRIGHTNESS = (3.0, 8.0)
_PULL = 0.8  # a spot outside its cell is pulled towards the centre by this factor ...
_PULL_STEPS = 4  # ... at most this many times


@dataclass
class _Spots:
    """Per-channel spot state (one row per living spot)."""

    track_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # uid, -1 none
    pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # world um, zyx
    step_um: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Brownian, per axis
    vel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # directed, um/frame
    site: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # transcription site
    base: np.ndarray = field(default_factory=lambda: np.zeros(0))  # amplitude, counts
    fluct: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log-brightness state

    def keep(self, mask: np.ndarray) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name)[mask])

    def extend(self, other: _Spots) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))


class LiveSpots:
    """The spots of every RNA channel of a live acquisition, advanced frame by frame."""

    def __init__(self, config: SynthConfig, rng: np.random.Generator, amplitude_adu: float):
        if config.live_rna is None:
            raise ValueError("LiveSpots needs config.live_rna")
        self.config = config
        self.live = config.live_rna
        self.rng = rng
        self.amplitude_adu = amplitude_adu
        self.vox = np.asarray(config.voxel_size_um)
        self.shape = config.shape_zyx
        self.channels = [_Spots() for _ in range(config.n_rna_channels)]
        self.next_id = [1] * config.n_rna_channels
        self.started: list[set[int]] = [set() for _ in range(config.n_rna_channels)]
        self.previous: dict[int, tuple[np.ndarray, float]] = {}  # uid -> (centre, growth)
        self.death = 1.0 / self.live.lifetime_frames

    # ---- one frame ------------------------------------------------------------------------

    def frame(
        self,
        *,
        cells: Sequence[Cell],
        boxes: Sequence[Box | None],
        visible_fraction: np.ndarray,
        cell_labels: np.ndarray,
        nuclei: np.ndarray,
        drift_um: np.ndarray,
    ) -> list[FrameSpots]:
        """Advance every channel to this frame and return the spots shown, per channel.

        Parameters
        ----------
        cells, boxes, visible_fraction : this frame's population, each cell's bounding box
            and the fraction of its volume in view.
        cell_labels, nuclei : ``(z, y, x)`` provisional labels (``i + 1`` = ``cells[i]``).
        drift_um : ``(3,)`` global drift of this frame.
        """
        index = {cell.uid: i for i, cell in enumerate(cells)}
        out = []
        for r, spots in enumerate(self.channels):
            self._carry(spots, r, cells, index)
            shown = self._move(spots, cells, index, cell_labels, nuclei, drift_um)
            alive = spots.site | (self.rng.random(len(spots.owner)) >= self.death)
            spots.keep(alive)
            shown = shown[alive]
            out.append(
                self._show(
                    spots,
                    shown,
                    r,
                    cells,
                    boxes,
                    visible_fraction,
                    cell_labels,
                    nuclei,
                    drift_um,
                )
            )
        self.previous = {cell.uid: (cell.centre_um.copy(), cell.growth) for cell in cells}
        return out

    def _carry(self, spots: _Spots, r: int, cells: Sequence[Cell], index: dict[int, int]) -> None:
        """Move spots with their owner cell; hand a divided parent's spots to its daughters."""
        if len(spots.owner) == 0:
            return
        daughters: dict[int, list[Cell]] = {}
        for cell in cells:
            if cell.parent_uid >= 0 and cell.uid not in self.previous:
                daughters.setdefault(cell.parent_uid, []).append(cell)
        alive = np.ones(len(spots.owner), bool)
        for uid in np.unique(spots.owner):
            uid = int(uid)
            if uid < 0:
                continue  # stuck to the coverslip: moves with the drift only
            sel = np.flatnonzero(spots.owner == uid)
            if uid not in self.previous:
                alive[sel] = False
                continue
            c0, g0 = self.previous[uid]
            if uid in index:
                cell = cells[index[uid]]
                spots.pos[sel] = cell.centre_um + (spots.pos[sel] - c0) * (cell.growth / g0)
                continue
            kids = daughters.get(uid, [])
            if not kids:
                alive[sel] = False  # the cell left for good
                continue
            alive[sel[spots.site[sel]]] = False  # daughters get their own sites
            centres = np.array([k.centre_um for k in kids])
            spots.pos[sel] += centres.mean(axis=0) - c0
            # each spot goes to the daughter on its side: the nearest daughter centre
            d2 = ((spots.pos[sel, None, 1:] - centres[None, :, 1:]) ** 2).sum(axis=2)
            spots.owner[sel] = np.array([k.uid for k in kids])[np.argmin(d2, axis=1)]
            self.started[r].update(k.uid for k in kids)
        spots.keep(alive)

    def _image_vox(self, pos: np.ndarray, drift_um: np.ndarray) -> np.ndarray:
        vox = (pos + drift_um) / self.vox
        if self.shape[0] == 1:
            vox[:, 0] = 0.0  # a 2D acquisition: spots lie in the imaged plane
        return vox

    def _inside(
        self,
        spots: _Spots,
        pos: np.ndarray,
        index: dict[int, int],
        cell_labels: np.ndarray,
        nuclei: np.ndarray,
        drift_um: np.ndarray,
    ) -> np.ndarray:
        """Which spots at ``pos`` are in the volume and in their owner (sites: its nucleus)."""
        idx = np.rint(self._image_vox(pos, drift_um)).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
        want = np.array([index.get(int(u), -2) + 1 for u in spots.owner], np.int64)
        flat = tuple(np.where(ok[:, None], idx, 0).T)
        lab = np.where(spots.site, nuclei[flat], cell_labels[flat]).astype(np.int64)
        return ok & ((spots.owner < 0) | (lab == want))

    def _move(
        self,
        spots: _Spots,
        cells: Sequence[Cell],
        index: dict[int, int],
        cell_labels: np.ndarray,
        nuclei: np.ndarray,
        drift_um: np.ndarray,
    ) -> np.ndarray:
        """Each spot's own motion, kept inside its owner; returns which spots can be shown."""
        n = len(spots.owner)
        if n == 0:
            return np.zeros(0, bool)
        rng, live = self.rng, self.live
        step = rng.normal(0.0, 1.0, (n, 3)) * spots.step_um[:, None] + spots.vel
        if self.shape[0] == 1:
            step[:, 0] = 0.0
        step[spots.owner < 0] = 0.0
        moved = spots.pos + step
        ok = self._inside(spots, moved, index, cell_labels, nuclei, drift_um)
        spots.pos[ok] = moved[ok]
        spots.vel[~ok] *= -1.0  # directed transport turns back at the cell edge
        turn = np.flatnonzero(
            np.any(spots.vel != 0, axis=1) & (rng.random(n) >= live.direction_persistence)
        )
        if len(turn):
            speed = np.linalg.norm(spots.vel[turn], axis=1)
            spots.vel[turn] = self._directions(len(turn)) * speed[:, None]
        inside = self._inside(spots, spots.pos, index, cell_labels, nuclei, drift_um)
        # the cell's outline changed under the spot: pull it towards the centre
        for _ in range(_PULL_STEPS):
            out = np.flatnonzero(~inside & (spots.owner >= 0))
            out = out[[int(u) in index for u in spots.owner[out]]]
            if len(out) == 0:
                break
            centre = np.array(
                [self._centre(cells[index[int(spots.owner[i])]], bool(spots.site[i])) for i in out]
            )
            trial = centre + (spots.pos[out] - centre) * _PULL
            spots.pos[out] = trial
            inside[out] = self._inside(spots, spots.pos, index, cell_labels, nuclei, drift_um)[out]
        return inside

    @staticmethod
    def _centre(cell: Cell, site: bool) -> np.ndarray:
        return cell.centre_um + (cell.nucleus_offset_um * cell.growth if site else 0.0)

    def _directions(self, n: int) -> np.ndarray:
        d = self.rng.normal(size=(n, 3))
        if self.shape[0] == 1:
            d[:, 0] = 0.0
        return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)

    # ---- births, brightness, what is shown ------------------------------------------------

    def _new(self, r: int, world: np.ndarray, owner: int, site: bool) -> _Spots:
        n = len(world)
        rng, live, c = self.rng, self.live, self.config
        base = lognormal_amplitudes(rng, n, self.amplitude_adu, c.spot_amplitude_cv)
        if site:
            base *= rng.uniform(*_TS_BRIGHTNESS, n)
        lo, hi = np.log(live.diffusion_um2_per_s)
        diffusion = np.exp(rng.uniform(lo, hi, n))
        dt = c.frame_interval_s
        directed = (rng.random(n) < live.directed_fraction) & (not site) & (owner >= 0)
        speed = rng.uniform(*live.directed_speed_um_per_s, n) * dt
        vel = self._directions(n) * np.where(directed, speed, 0.0)[:, None]
        ids = np.arange(self.next_id[r], self.next_id[r] + n)
        self.next_id[r] += n
        return _Spots(
            track_id=ids,
            owner=np.full(n, owner, np.int64),
            pos=world,
            step_um=np.where(directed | site, 0.0, np.sqrt(2.0 * diffusion * dt))
            if owner >= 0
            else np.zeros(n),
            vel=vel,
            site=np.full(n, site),
            base=base,
            fluct=np.zeros(n),
        )

    def _show(
        self,
        spots: _Spots,
        shown: np.ndarray,
        r: int,
        cells: Sequence[Cell],
        boxes: Sequence[Box | None],
        visible_fraction: np.ndarray,
        cell_labels: np.ndarray,
        nuclei: np.ndarray,
        drift_um: np.ndarray,
    ) -> FrameSpots:
        rng, c = self.rng, self.config
        shape = self.shape
        sampler = _Sampler(shape, rng)
        # existing spots first, oldest first, one voxel each (a spot on a voxel already
        # taken is not shown this frame)
        order = np.flatnonzero(shown)
        shown = np.zeros(len(spots.owner), bool)
        if len(order):
            vox = np.rint(self._image_vox(spots.pos[order], drift_um)).astype(np.int64)
            flat = np.ravel_multi_index(tuple(vox.T), shape)
            _, first = np.unique(flat, return_index=True)
            shown[order[first]] = True
            sampler.occupied[flat[first]] = True

        def to_world(v: np.ndarray) -> np.ndarray:
            return v * self.vox - drift_um

        born: list[_Spots] = []
        pools = visible_cell_pools(cells, boxes, visible_fraction, cell_labels, nuclei)
        for i, cell, nuc_vox, cyt_vox in pools:
            have_sites = int(np.count_nonzero(spots.site & (spots.owner == cell.uid)))
            missing = int(cell.n_transcription_sites[r]) - have_sites if nuc_vox.size else 0
            picked = sampler.from_voxels(nuc_vox, missing)
            born.append(self._new(r, to_world(sampler.jittered(picked)), cell.uid, site=True))
            lam = c.spots_per_cell * float(cell.expression[r]) * float(visible_fraction[i])
            if cell.uid in self.started[r]:
                lam *= self.death
            self.started[r].add(cell.uid)
            n = int(rng.poisson(lam))
            n_nuc = nuclear_count(rng, n, c.nuclear_spot_fraction, nuc_vox, cyt_vox)
            for pool, k in ((nuc_vox, n_nuc), (cyt_vox, n - n_nuc)):
                picked = sampler.from_voxels(pool, k)
                born.append(self._new(r, to_world(sampler.jittered(picked)), cell.uid, site=False))
        lam = c.outside_spots_per_frame * (self.death if self.previous else 1.0)
        n_out = int(rng.poisson(lam)) if lam > 0 else 0
        if n_out:
            flat = rng.integers(0, cell_labels.size, 4 * n_out + 8)
            flat = flat[cell_labels.ravel()[flat] == 0]
            placed_out = sampler.place(sampler.jittered(flat), n_out)
            born.append(self._new(r, to_world(placed_out), -1, site=False))
        for b in born:
            if len(b.owner):
                spots.extend(b)
                shown = np.concatenate([shown, np.ones(len(b.owner), bool)])

        # brightness: lognormal AR(1) around the base amplitude
        cv = np.where(spots.site, _SITE_FLUCTUATION, 1.0) * self.live.intensity_fluctuation_cv
        sigma = np.sqrt(np.log1p(cv * cv))
        rho = _FLUCTUATION_CORRELATION
        spots.fluct = (
            rho * spots.fluct
            + np.sqrt(1.0 - rho * rho) * rng.normal(0.0, 1.0, len(spots.owner)) * sigma
        )
        amplitude = spots.base * np.exp(spots.fluct - 0.5 * sigma * sigma)
        shown &= rng.random(len(spots.owner)) >= self.live.blink_probability
        order = np.flatnonzero(shown)
        return FrameSpots(
            centres_vox=self._image_vox(spots.pos[order], drift_um),
            amplitudes_adu=amplitude[order],
            kinds=np.where(
                spots.site[order], KINDS.index(TRANSCRIPTION_SITE), KINDS.index(SINGLE)
            ).astype(np.int8),
            track_ids=spots.track_id[order].astype(np.uint32),
        )
