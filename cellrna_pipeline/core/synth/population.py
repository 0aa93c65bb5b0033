"""The cell population over time: placement, motion, growth, divisions, entering cells.

Positions are in micrometres in the sample ("world") frame, which is the image frame of
timepoint 0; frame ``t`` sees the world shifted by the global drift ``drift_um[t]``.
Cells lie on a coverslip: they move laterally only, and are cut flat at the coverslip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellrna_pipeline.core.synth.config import SynthConfig
from cellrna_pipeline.core.synth.shapes import Ellipsoid, random_harmonics

_HALF_VOLUME_SCALE = 2.0 ** (-1.0 / 3.0)  # linear size of a half-volume daughter
_CONTACT = 0.8  # cells push apart when centres are closer than this x (r_i + r_j)
_MIN_AGE_TO_DIVIDE = 2  # frames
_COVERSLIP_DEPTH = 0.35  # cell centre height above the coverslip / axial semi-axis
# cells grow from half to full volume over a cycle; a mid-cycle cell (3/4 volume) has the
# configured radius, so adults are this much larger
_ADULT_SCALE = 0.75 ** (-1.0 / 3.0)


@dataclass
class Cell:
    """One simulated cell (mutable simulation state, not part of the public API)."""

    uid: int
    centre_um: np.ndarray  # (3,) zyx, world frame
    velocity_um: np.ndarray  # (3,) zyx per frame
    shape: Ellipsoid
    nucleus: Ellipsoid
    nucleus_offset_um: np.ndarray  # (3,) nucleus centre - cell centre at scale 1
    nucleoli_um: np.ndarray  # (k, 3) nucleolus centres relative to the nucleus centre
    growth: float  # linear size factor; daughters start at 2**(-1/3)
    nucleus_brightness: float
    cytoplasm_brightness: float
    expression: np.ndarray  # (n_rna,) mean-1 factors of spots_per_cell
    n_transcription_sites: np.ndarray  # (n_rna,) int
    age: int = 0
    label: int = 0  # track label once seen; 0 while never in view
    parent_label: int = 0
    parent_uid: int = -1  # uid of the dividing parent (daughters only)
    is_daughter: bool = False  # born by division, not yet rendered
    divides: bool = False  # divides after the current frame (rendered as mitotic)

    @property
    def lateral_radius_um(self) -> float:
        return math.sqrt(self.shape.semi_axes_um[1] * self.shape.semi_axes_um[2]) * self.growth


class Population:
    """Cells of one acquisition and the rules that move them from frame to frame."""

    def __init__(self, config: SynthConfig, rng: np.random.Generator) -> None:
        self.config = config
        self.rng = rng
        vz, vy, vx = config.voxel_size_um
        nz, ny, nx = config.shape_zyx
        self.field_um = np.array([ny * vy, nx * vx])  # lateral field of view (y, x)
        self.stack_um = nz * vz
        r = _ADULT_SCALE * config.cell_radius_um
        # a cell's centre farther than this outside the field cannot be seen
        self.reach_um = (
            r * (1.0 + 3.0 * config.cell_radius_cv) * (1.0 + 2.5 * config.cell_irregularity) * 1.3
        )
        self.margin_um = self.reach_um + 1.5 * r if config.enter_leave else 0.0
        az = r * config.cell_z_aspect
        # the coverslip is placed so that the cell layer is centred in the stack
        self.coverslip_um = self.stack_um / 2.0 - (1.0 + _COVERSLIP_DEPTH) * az / 2.0
        self.density_per_um2 = config.n_cells / float(np.prod(self.field_um))
        self.cycle_frames = (
            1.0 / config.division_probability if config.division_probability > 0 else math.inf
        )
        self.cells: list[Cell] = []
        self._next_uid = 0

    # ---- creation -------------------------------------------------------------------

    def _new_cell(
        self, centre_yx: np.ndarray, growth: float, age: int, like: Cell | None = None
    ) -> Cell:
        """A new cell; ``like`` (a dividing parent) gives its adult size, not the outline."""
        c, rng = self.config, self.rng
        r = _ADULT_SCALE * c.cell_radius_um * math.exp(rng.normal(0.0, c.cell_radius_cv))
        elong = rng.uniform(1.0, 1.3)
        az = r * c.cell_z_aspect * rng.uniform(0.9, 1.1)
        if like is not None:
            r = math.sqrt(like.shape.semi_axes_um[1] * like.shape.semi_axes_um[2])
            az = like.shape.semi_axes_um[0]
        angle = float(rng.uniform(0.0, np.pi))
        amp, phase = random_harmonics(rng, c.cell_irregularity)
        shape = Ellipsoid(
            semi_axes_um=(az, r * math.sqrt(elong), r / math.sqrt(elong)),
            angle_rad=angle,
            harmonic_amp=amp,
            harmonic_phase=phase,
            bottom_um=_COVERSLIP_DEPTH * az,
        )
        nf = c.nucleus_fraction
        nr = r * nf * rng.uniform(0.9, 1.05)
        n_elong = rng.uniform(1.0, 1.25)
        naz = az * nf * 0.9
        angle = shape.angle_rad + float(rng.normal(0.0, 0.3))
        amp, phase = random_harmonics(rng, 0.3 * c.cell_irregularity)
        nucleus = Ellipsoid(
            semi_axes_um=(naz, nr * math.sqrt(n_elong), nr / math.sqrt(n_elong)),
            angle_rad=angle,
            harmonic_amp=amp,
            harmonic_phase=phase,
        )
        # nucleus rests a little above the coverslip, off-centre laterally
        lateral = rng.normal(0.0, 0.08 * r, 2).clip(-0.15 * r, 0.15 * r)
        nz_off = -_COVERSLIP_DEPTH * az + 0.12 * az + naz
        k = int(rng.integers(1, 4))
        u = rng.normal(size=(k, 3))
        u *= (rng.uniform(0.0, 0.5, k) / np.linalg.norm(u, axis=1))[:, None]
        n_rna = c.n_rna_channels
        if c.expression_cv > 0:
            shape_k = 1.0 / c.expression_cv**2
            expression = rng.gamma(shape_k, 1.0 / shape_k, n_rna)
        else:
            expression = np.ones(n_rna)
        ts = (
            rng.integers(1, c.transcription_sites + 1, n_rna)
            if c.transcription_sites > 0
            else np.zeros(n_rna, int)
        )
        cell = Cell(
            uid=self._next_uid,
            centre_um=np.array(
                [self.coverslip_um + _COVERSLIP_DEPTH * az * growth, centre_yx[0], centre_yx[1]]
            ),
            velocity_um=np.array([0.0, *rng.normal(0.0, c.motion_um_per_frame, 2)]),
            shape=shape,
            nucleus=nucleus,
            nucleus_offset_um=np.array([nz_off, lateral[0], lateral[1]]),
            nucleoli_um=u * np.array(nucleus.semi_axes_um),
            growth=growth,
            nucleus_brightness=math.exp(rng.normal(0.0, 0.2)),
            cytoplasm_brightness=math.exp(rng.normal(0.0, 0.2)),
            expression=expression,
            n_transcription_sites=np.asarray(ts, dtype=int),
            age=age,
        )
        self._next_uid += 1
        return cell

    def _best_candidate(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        outside_field_by: float | None,
        offset_yx: np.ndarray,
        n_candidates: int = 24,
    ) -> np.ndarray | None:
        """Mitchell's best candidate: of a few uniform draws, the farthest from all cells.

        With ``outside_field_by`` set, only draws that far outside the current field of
        view count (``offset_yx`` is the field's world origin); ``None`` if none is found,
        so a new cell never pops up inside the field.
        """
        cand = self.rng.uniform(lo, hi, size=(n_candidates, 2))
        if outside_field_by is not None:
            kept = []
            for _ in range(50):
                rel = cand - offset_yx
                gap = np.maximum(np.maximum(-rel, rel - self.field_um), 0.0).max(axis=1)
                kept.append(cand[gap >= outside_field_by])
                if sum(len(k) for k in kept) >= n_candidates // 2:
                    break
                cand = self.rng.uniform(lo, hi, size=(n_candidates, 2))
            cand = np.concatenate(kept)
            if len(cand) == 0:
                return None
        if not self.cells:
            return cand[0]
        pos = np.array([cell.centre_um[1:] for cell in self.cells])
        d = np.linalg.norm(cand[:, None, :] - pos[None, :, :], axis=2).min(axis=1)
        return cand[int(np.argmax(d))]

    def _add_unborn(self, yx: np.ndarray | None) -> None:
        """Add a cell not born by division here (random age and phase of its cycle)."""
        if yx is None:
            return
        growth = self.rng.uniform(_HALF_VOLUME_SCALE, 1.0)
        self.cells.append(self._new_cell(yx, growth, age=int(self.rng.integers(2, 100))))

    def seed_cells(self) -> None:
        """Place ``n_cells`` in the field (plus, with ``enter_leave``, cells around it)."""
        c = self.config
        inset = 0.6 * c.cell_radius_um if not c.enter_leave else 0.0
        inset = min(inset, 0.45 * float(self.field_um.min()))
        zero = np.zeros(2)
        for _ in range(c.n_cells):
            self._add_unborn(self._best_candidate(zero + inset, self.field_um - inset, None, zero))
        if c.enter_leave:
            lo, hi = zero - self.margin_um, self.field_um + self.margin_um
            ring = float(np.prod(hi - lo) - np.prod(self.field_um))
            for _ in range(round(self.density_per_um2 * ring)):
                self._add_unborn(self._best_candidate(lo, hi, self.reach_um, zero))
        self._relax(iterations=40, drift_um=np.zeros(3), pin_outside=True)

    # ---- dynamics -------------------------------------------------------------------

    def _relax(self, iterations: int, drift_um: np.ndarray, pin_outside: bool = False) -> None:
        """Push overlapping cells apart (contact inhibition); confine them if no enter/leave."""
        if not self.cells:
            return
        pos = np.array([cell.centre_um[1:] for cell in self.cells])
        rad = np.array([cell.lateral_radius_um for cell in self.cells])
        origin = -drift_um[1:]
        for _ in range(iterations):
            if len(self.cells) > 1:
                diff = pos[:, None, :] - pos[None, :, :]
                dist = np.linalg.norm(diff, axis=2)
                np.fill_diagonal(dist, np.inf)
                overlap = np.maximum(_CONTACT * (rad[:, None] + rad[None, :]) - dist, 0.0)
                if not overlap.any():
                    break
                safe = np.where(np.isfinite(dist) & (dist > 1e-6), dist, 1.0)
                push = (0.5 * overlap / safe)[:, :, None] * diff
                pos = pos + 0.5 * push.sum(axis=1)
            pos = self._confine(pos, rad, origin)
        if pin_outside and self.config.enter_leave:
            # cells seeded outside the field stay outside at t=0: n_cells are in view
            for i, cell in enumerate(self.cells):
                was_out = self._outside_gap(cell.centre_um[1:], origin) >= self.reach_um
                if was_out and self._outside_gap(pos[i], origin) < self.reach_um:
                    pos[i] = cell.centre_um[1:]
        for cell, p in zip(self.cells, pos, strict=True):
            cell.centre_um[1:] = p

    def _outside_gap(self, yx: np.ndarray, origin: np.ndarray) -> float:
        rel = yx - origin
        return float(np.maximum(np.maximum(-rel, rel - self.field_um), 0.0).max())

    def _confine(self, pos: np.ndarray, rad: np.ndarray, origin: np.ndarray) -> np.ndarray:
        if self.config.enter_leave:
            return pos
        # without enter/leave, centres stay in the current field of view
        inset = np.minimum(0.6 * rad, 0.45 * float(self.field_um.min()))[:, None]
        return np.clip(pos, origin + inset, origin + self.field_um - inset)

    def step(self, drift_um: np.ndarray) -> None:
        """Advance one frame: divisions decided last frame, motion, growth, new cells."""
        c, rng = self.config, self.rng
        cells: list[Cell] = []
        for cell in self.cells:
            if cell.divides:
                cells.extend(self._divide(cell))
            else:
                cells.append(cell)
        self.cells = cells
        rho = c.motion_persistence
        for cell in self.cells:
            kick = rng.normal(0.0, c.motion_um_per_frame, 2)
            cell.velocity_um[1:] = rho * cell.velocity_um[1:] + math.sqrt(1.0 - rho * rho) * kick
            cell.centre_um[1:] += cell.velocity_um[1:]
            if math.isfinite(self.cycle_frames):
                cell.growth = min(1.0, cell.growth * 2.0 ** (1.0 / (3.0 * self.cycle_frames)))
                # the flat bottom stays on the coverslip as the cell grows
                cell.centre_um[0] = self.coverslip_um + cell.shape.bottom_um * cell.growth
            cell.age += 1
        origin = -drift_um[1:]
        lo, hi = self._domain(drift_um)
        if not c.enter_leave:
            for cell in self.cells:
                before = cell.centre_um[1:].copy()
                cell.centre_um[1:] = self._confine(
                    before[None], np.array([cell.lateral_radius_um]), origin
                )[0]
                bounced = before != cell.centre_um[1:]
                cell.velocity_um[1:][bounced] *= -1.0
        self._relax(iterations=3, drift_um=drift_um)
        if c.enter_leave:
            # cells never seen that drifted out of the surrounding band are forgotten
            self.cells = [
                cell
                for cell in self.cells
                if cell.label > 0
                or bool(np.all((cell.centre_um[1:] >= lo) & (cell.centre_um[1:] <= hi)))
            ]
            inside = self._count_in(lo, hi)
            target = self.density_per_um2 * float(np.prod(hi - lo))
            for _ in range(max(0, round(target - inside))):
                self._add_unborn(self._best_candidate(lo, hi, self.reach_um, origin))

    def _divide(self, parent: Cell) -> list[Cell]:
        """Two daughters of half the parent's volume, apart along a random lateral axis."""
        rng = self.rng
        theta = rng.uniform(0.0, np.pi)
        axis = np.array([0.0, math.sin(theta), math.cos(theta)])
        half_gap = 0.5 * parent.lateral_radius_um
        daughters = []
        for sign in (-1.0, 1.0):
            d = self._new_cell(
                parent.centre_um[1:] + sign * half_gap * axis[1:],
                parent.growth * _HALF_VOLUME_SCALE,
                age=0,
                like=parent,
            )
            d.velocity_um = parent.velocity_um.copy()
            d.velocity_um[1:] += sign * 0.3 * half_gap * axis[1:]
            d.nucleus_brightness = parent.nucleus_brightness
            d.cytoplasm_brightness = parent.cytoplasm_brightness
            d.parent_label = parent.label
            d.parent_uid = parent.uid
            d.is_daughter = True
            daughters.append(d)
        return daughters

    def _domain(self, drift_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World ``(lo, hi)`` corners (y, x) of the field of view plus the margin."""
        origin = -drift_um[1:]
        return origin - self.margin_um, origin + self.field_um + self.margin_um

    def _count_in(self, lo: np.ndarray, hi: np.ndarray) -> int:
        return sum(
            bool(np.all((cell.centre_um[1:] >= lo) & (cell.centre_um[1:] <= hi)))
            for cell in self.cells
        )

    def plan_divisions(self, drift_um: np.ndarray, is_last_frame: bool) -> None:
        """Decide which cells divide after this frame (they render as mitotic now).

        Contact inhibition: the probability falls linearly from ``division_probability``
        at the initial density to 0 at ``confluence_limit`` times it.
        """
        c = self.config
        p = c.division_probability
        if p > 0 and self.density_per_um2 > 0:
            lo, hi = self._domain(drift_um)
            density = self._count_in(lo, hi) / (self.density_per_um2 * float(np.prod(hi - lo)))
            p *= float(
                np.clip((c.confluence_limit - density) / (c.confluence_limit - 1.0), 0.0, 1.0)
            )
        for cell in self.cells:
            cell.divides = (
                not is_last_frame
                and p > 0
                and cell.age >= _MIN_AGE_TO_DIVIDE
                and bool(self.rng.random() < p)
            )
