"""Synthetic 3D+t acquisitions with exact ground truth: :func:`synthesize`.

Frame ``t`` is made in four steps: move the population (random walk with persistence,
contact repulsion, growth, divisions, cells entering at the border), render the label
volumes of that frame (touching irregular cells, nuclei strictly inside), draw the RNA
spots from those labels, then form the image (textured stains, PSF blur, spots,
illumination, camera noise). Everything is shifted by the global drift of the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import ndimage as ndi

from cellrna_pipeline.core.synth.config import SynthConfig
from cellrna_pipeline.core.synth.labels import (
    nucleus_centre_vox,
    render_cells,
    render_nuclei,
    render_spot_labels,
)
from cellrna_pipeline.core.synth.live import LiveSpots
from cellrna_pipeline.core.synth.optics import (
    Texture,
    add_gaussian_spots,
    background_noise_std_adu,
    blur,
    camera,
    illumination_field,
    psf_sigma_vox,
    sigma_um_to_vox,
)
from cellrna_pipeline.core.synth.population import Population
from cellrna_pipeline.core.synth.spots import KINDS, sample_spots
from cellrna_pipeline.core.types import ImageMeta, VoxelSize

#: Columns and dtypes of :attr:`SynthAcquisition.spot_table`.
SPOT_TABLE_SCHEMA: dict[str, pl.DataType] = {
    "timepoint": pl.Int32(),
    "channel": pl.String(),
    "spot_id": pl.UInt32(),
    "z": pl.Float64(),
    "y": pl.Float64(),
    "x": pl.Float64(),
    "z_um": pl.Float64(),
    "y_um": pl.Float64(),
    "x_um": pl.Float64(),
    "cell_id": pl.UInt32(),
    "compartment": pl.String(),
    "amplitude": pl.Float64(),
    "kind": pl.String(),
}
#: :data:`SPOT_TABLE_SCHEMA` plus ``track_id`` (u32, the spot's ground-truth track): the
#: spot table of a live-RNA acquisition (``config.live_rna`` set).
LIVE_SPOT_TABLE_SCHEMA: dict[str, pl.DataType] = {**SPOT_TABLE_SCHEMA, "track_id": pl.UInt32()}
#: Columns and dtypes of :attr:`SynthAcquisition.lineage` (Cell Tracking Challenge ``L B E P``).
LINEAGE_SCHEMA: dict[str, pl.DataType] = {
    "label": pl.UInt32(),
    "begin_t": pl.Int32(),
    "end_t": pl.Int32(),
    "parent_label": pl.UInt32(),
}
COMPARTMENTS = ("outside", "cytoplasm", "nucleus")

_TEXTURE_SIGMA_UM = (0.35, 0.3, 0.3)  # chromatin / cytoplasm granularity
_NUCLEOLUS_SIGMA_UM = (0.5, 0.5, 0.5)
_NUCLEOLUS_DEPTH = 0.6  # nucleoli dim the nuclear stain by up to 60 %
_MITOTIC_BRIGHTNESS = 1.6  # condensed chromatin just before and after a division
_CYTO_STAIN_IN_NUCLEUS = 0.3
# calibration images (see make_calibration_images)
_DARK_FRAMES = 8
_FLAT_PHOTONS = 4000.0  # e- per voxel of a uniform fluorescent slide
_BEAD_PHOTONS = 2000.0  # e- at the peak of a sub-resolution bead
_BEADS_PER_UM2 = 0.04  # lateral bead density


@dataclass(frozen=True)
class SynthAcquisition:
    """A synthetic acquisition and its ground truth.

    Attributes
    ----------
    image : ``(t, c, z, y, x)`` uint16 camera counts (``None`` when loaded without it).
    channel_names : ``("nucleus", "cytoplasm", "rna0"[, "rna1"])``.
    cells : ``(t, z, y, x)`` uint32 cell instance labels, one label per track (CTC).
    nuclei : ``(t, z, y, x)`` uint32; the nucleus of cell ``k`` has label ``k`` and lies
        strictly inside the cell mask.
    spots : ``(t, r, z, y, x)`` uint32 spot instance labels per RNA channel ``r``.
    spot_table : one row per spot, columns :data:`SPOT_TABLE_SCHEMA`; ``z, y, x`` are
        sub-voxel true centres in voxels, ``*_um`` the same in micrometres, ``amplitude``
        the expected peak above the local background in counts.
    lineage : one row per track, columns :data:`LINEAGE_SCHEMA` (parent 0: none).
    drift_zyx_um : ``(t, 3)`` float64 global drift of frame ``t`` relative to frame 0.
    voxel_size : physical voxel size (micrometres).
    frame_interval_s : time between frames in seconds.
    config : the configuration that made it.
    illumination : ``(z, y, x)`` float32 flat-field of mean 1 that multiplied every channel
        (vignetting, fixed to the camera); ``None`` if unknown.
    calibration_dark : ``(n, y, x)`` uint16 dark frames (offset + read noise, no light).
    calibration_flat : ``(c, y, x)`` uint16 image of a uniform fluorescent slide per channel.
    calibration_beads : ``(c, z, y, x)`` uint16 sub-resolution beads seen in every channel,
        each channel displaced by its chromatic shift. The three are ``None`` when
        ``config.calibration_images`` is false.
    """

    image: np.ndarray | None
    channel_names: tuple[str, ...]
    cells: np.ndarray
    nuclei: np.ndarray
    spots: np.ndarray
    spot_table: pl.DataFrame
    lineage: pl.DataFrame
    drift_zyx_um: np.ndarray
    voxel_size: VoxelSize
    frame_interval_s: float
    config: SynthConfig
    illumination: np.ndarray | None = None
    calibration_dark: np.ndarray | None = None
    calibration_flat: np.ndarray | None = None
    calibration_beads: np.ndarray | None = None

    @property
    def drift_zyx_px(self) -> np.ndarray:
        """``(t, 3)`` drift in voxels."""
        return self.drift_zyx_um / np.asarray(self.voxel_size.as_tuple())

    @property
    def channel_shifts_zyx_px(self) -> np.ndarray:
        """``(c, 3)`` chromatic shift of each channel in voxels: channel ``c`` shows the
        sample displaced by this much relative to the labels (and channel 0 when its shift
        is 0). Zeros when the config has none."""
        return channel_shifts_px(self.config)

    @property
    def flat_field_yx(self) -> np.ndarray | None:
        """``(y, x)`` float64 lateral flat-field of mean 1 (the vignetting), or ``None``."""
        if self.illumination is None:
            return None
        field = self.illumination.mean(axis=0, dtype=np.float64)
        return field / field.mean()

    @property
    def meta(self) -> ImageMeta:
        """Image metadata of :attr:`image`."""
        t, z, y, x = self.cells.shape
        return ImageMeta(
            shape_tczyx=(t, len(self.channel_names), z, y, x),
            dtype="uint16",
            voxel_size=self.voxel_size,
            channel_names=self.channel_names,
            frame_interval_s=self.frame_interval_s,
        )


def _borders(labels: np.ndarray) -> np.ndarray:
    """Voxels of a cell with a 6-neighbour of another label (membranes), bool zyx."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        diff = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    edge &= labels > 0
    return edge


def _slab(labels: np.ndarray, margin: int) -> slice:
    """The z range holding every labelled voxel, widened by ``margin`` slices."""
    occupied = np.flatnonzero(labels.any(axis=(1, 2)))
    if occupied.size == 0:
        return slice(0, 0)
    return slice(
        max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, labels.shape[0])
    )


def spot_table_schema(config: SynthConfig) -> dict[str, pl.DataType]:
    """The spot table's schema: :data:`LIVE_SPOT_TABLE_SCHEMA` in live-RNA mode, else
    :data:`SPOT_TABLE_SCHEMA`."""
    return LIVE_SPOT_TABLE_SCHEMA if config.live_rna is not None else SPOT_TABLE_SCHEMA


def channel_shifts_px(config: SynthConfig) -> np.ndarray:
    """``(c, 3)`` float64 chromatic shift per channel in voxels (zeros if none configured)."""
    n_c = len(config.channel_names)
    if not config.channel_shift_zyx_nm:
        return np.zeros((n_c, 3))
    return np.asarray(config.channel_shift_zyx_nm, dtype=np.float64) / (
        1000.0 * np.asarray(config.voxel_size_um)
    )


def _shifted(image: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """``image`` displaced by ``shift_px`` (cubic spline; unchanged if the shift is 0)."""
    if not np.any(shift_px):
        return image
    return ndi.shift(image, shift_px, order=3, mode="nearest").astype(np.float32, copy=False)


def _illumination(config: SynthConfig, tex_rng: np.random.Generator) -> np.ndarray:
    return illumination_field(config.shape_zyx, config.illumination_falloff, tex_rng)


def illumination_of(config: SynthConfig) -> np.ndarray:
    """The ``(z, y, x)`` flat-field that :func:`synthesize` uses for ``config`` (exactly)."""
    tex_rng = np.random.default_rng(config.seed).spawn(4)[2]
    return _illumination(config, tex_rng)


def make_calibration_images(
    config: SynthConfig, illum: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark frames, flat-field slide images and a bead volume for ``config``.

    Returns
    -------
    dark : ``(8, y, x)`` uint16, camera offset + read noise without light.
    flat : ``(c, y, x)`` uint16, a uniform slide (4000 e-) seen through the
        illumination's lateral profile, one image per channel.
    beads : ``(c, z, y, x)`` uint16, sub-resolution beads (PSF-sized, 2000 e- peak)
        over the background; channel ``c`` displaced by its chromatic shift.
    """
    c = config
    _, ny, nx = c.shape_zyx
    vox = c.voxel_size_um
    camera_kw = {
        "gain_adu_per_e": c.camera_gain_adu_per_e,
        "read_noise_e": c.read_noise_e,
        "offset_adu": c.camera_offset_adu,
    }
    dark = np.stack(
        [camera(np.zeros((ny, nx), np.float32), rng, **camera_kw) for _ in range(_DARK_FRAMES)]
    )
    field_yx = illum.mean(axis=0)
    field_yx /= field_yx.mean()
    flat = np.stack(
        [camera(field_yx * np.float32(_FLAT_PHOTONS), rng, **camera_kw) for _ in c.channel_names]
    )
    psf = psf_sigma_vox(c.psf_sigma_nm, vox)
    area_um2 = ny * vox[1] * nx * vox[2]
    n_beads = max(4, int(rng.poisson(_BEADS_PER_UM2 * area_um2)))
    lo = np.array([0.2, 0.05, 0.05]) * np.asarray(c.shape_zyx)
    hi = np.array([0.8, 0.95, 0.95]) * np.asarray(c.shape_zyx)
    centres = rng.uniform(lo, hi, (n_beads, 3))
    amplitudes = np.full(n_beads, _BEAD_PHOTONS) * rng.uniform(0.7, 1.3, n_beads)
    shifts = channel_shifts_px(c)
    background = illum * np.float32(c.background_photons)
    beads = np.empty((len(c.channel_names), *c.shape_zyx), dtype=np.uint16)
    for ch in range(len(c.channel_names)):
        photons = np.zeros(c.shape_zyx, dtype=np.float32)
        add_gaussian_spots(photons, centres + shifts[ch], amplitudes, psf)
        photons *= illum
        photons += background
        beads[ch] = camera(photons, rng, **camera_kw)
    return dark, flat, beads


def synthesize(config: SynthConfig) -> SynthAcquisition:
    """Make a synthetic ``(t, c, z, y, x)`` acquisition with exact ground truth.

    Deterministic: the same config gives bit-identical arrays and tables. Independent
    random streams drive geometry, spots, textures and camera noise, so changing e.g.
    ``snr`` or ``spots_per_cell`` leaves the cells, their motion and the drift unchanged.
    """
    c = config
    # a fifth stream for calibration images and a sixth for live-RNA spots: the first four
    # are those of earlier versions (spawned children do not depend on how many are
    # spawned), so acquisitions without the new options are bit-identical to theirs
    geo_rng, spot_rng, tex_rng, noise_rng, calib_rng, live_rng = np.random.default_rng(
        c.seed
    ).spawn(6)
    n_t, (nz, ny, nx) = c.timepoints, c.shape_zyx
    shape = c.shape_zyx
    vox = c.voxel_size_um
    voxel_volume = float(np.prod(vox))
    channel_names = c.channel_names
    n_rna = c.n_rna_channels

    drift = np.zeros((n_t, 3))
    if n_t > 1:
        drift[1:] = np.cumsum(
            geo_rng.normal(0.0, 1.0, (n_t - 1, 3)) * np.asarray(c.drift_um_per_frame), axis=0
        )
    population = Population(c, geo_rng)
    population.seed_cells()

    illum = _illumination(c, tex_rng)
    shifts_px = channel_shifts_px(c)
    texture = Texture(shape, sigma_um_to_vox(_TEXTURE_SIGMA_UM, vox))
    psf = psf_sigma_vox(c.psf_sigma_nm, vox)
    nucleolus_sigma = sigma_um_to_vox(_NUCLEOLUS_SIGMA_UM, vox)
    amplitude_adu = c.snr * background_noise_std_adu(
        c.background_photons, c.camera_gain_adu_per_e, c.read_noise_e
    )
    background = illum * np.float32(c.background_photons)
    live = LiveSpots(c, live_rng, amplitude_adu) if c.live_rna is not None else None
    # a slab keeps this many empty slices around the cells: blur and texture are exact
    margin = int(np.ceil(3.0 * max(psf[0], texture.sigma[0]))) + 2
    camera_kw = {
        "gain_adu_per_e": c.camera_gain_adu_per_e,
        "read_noise_e": c.read_noise_e,
        "offset_adu": c.camera_offset_adu,
    }

    image = np.zeros((n_t, len(channel_names), nz, ny, nx), dtype=np.uint16)
    cells_out = np.zeros((n_t, nz, ny, nx), dtype=np.uint32)
    nuclei_out = np.zeros_like(cells_out)
    spots_out = np.zeros((n_t, n_rna, nz, ny, nx), dtype=np.uint32)
    lineage: dict[int, list[int]] = {}
    tables: list[pl.DataFrame] = []
    table_schema = spot_table_schema(c)
    next_label = 1

    for t in range(n_t):
        if t > 0:
            population.step(drift[t])
        population.plan_divisions(drift[t], is_last_frame=t == n_t - 1)
        cells = population.cells
        labels, boxes, own_voxels = render_cells(cells, drift[t], vox, shape)
        visible = np.bincount(labels.ravel(), minlength=len(cells) + 1)[1:] > 0
        lut = np.zeros(len(cells) + 1, dtype=np.uint32)
        for i, cell in enumerate(cells):
            if not visible[i]:
                cell.divides = False
                continue
            if cell.label == 0:
                cell.label = next_label
                lineage[next_label] = [t, t, cell.parent_label]
                next_label += 1
            lineage[cell.label][1] = t
            lut[i + 1] = cell.label
        nuclei = render_nuclei(cells, labels, drift[t], vox, visible)
        fraction = np.array(
            [
                min(1.0, own_voxels[i] * voxel_volume / cell.shape.volume_um3(cell.growth))
                if visible[i]
                else 0.0
                for i, cell in enumerate(cells)
            ]
        )

        # --- stains, computed in the z slab that holds cells (zero elsewhere, exactly)
        slab = _slab(labels, margin)
        lab_s, nuc_s = labels[slab], nuclei[slab]
        bleach = np.float32((1.0 - c.bleach_per_frame) ** t)
        tex = texture.draw(tex_rng, n_slices=slab.stop - slab.start)
        tex *= np.float32(c.texture_contrast)
        tex += np.float32(1.0)
        np.maximum(tex, 0.0, out=tex)
        nuc_level = np.zeros(len(cells) + 1, dtype=np.float32)
        cyt_level = np.zeros(len(cells) + 1, dtype=np.float32)
        nucleoli = []
        for i, cell in enumerate(cells):
            if not visible[i]:
                continue
            mitotic = cell.divides or (cell.parent_label > 0 and cell.age == 1)
            nuc_level[i + 1] = (
                c.nucleus_stain_photons
                * cell.nucleus_brightness
                * (_MITOTIC_BRIGHTNESS if mitotic else 1.0)
            )
            cyt_level[i + 1] = c.cytoplasm_stain_photons * cell.cytoplasm_brightness
            nucleoli.append(
                nucleus_centre_vox(cell, drift[t], vox)
                + cell.nucleoli_um * cell.growth / np.asarray(vox)
            )
        nuc_level *= bleach
        cyt_level *= bleach
        # nuclear stain: chromatin texture, darker nucleoli
        nucleus_img = nuc_level[nuc_s]
        nucleus_img *= tex
        if nucleoli:
            dark = np.zeros(nucleus_img.shape, dtype=np.float32)
            centres = np.concatenate(nucleoli) - np.array([slab.start, 0, 0])
            add_gaussian_spots(
                dark, centres, np.full(len(centres), _NUCLEOLUS_DEPTH), nucleolus_sigma
            )
            np.minimum(dark, np.float32(0.9), out=dark)
            nucleus_img *= np.float32(1.0) - dark
        # cytoplasmic stain: textured, weaker in the nucleus, brighter membranes
        cyto_img = cyt_level[lab_s]
        cyto_img *= tex
        cyto_img[nuc_s > 0] *= np.float32(_CYTO_STAIN_IN_NUCLEUS)
        if c.membrane_contrast > 0:
            cyto_img += _borders(lab_s) * np.float32(
                c.membrane_contrast * c.cytoplasm_stain_photons * bleach
            )
        autofluo = (lab_s > 0).astype(np.float32)
        autofluo *= tex
        autofluo *= np.float32(c.autofluorescence_photons) * bleach
        del tex
        for img in (nucleus_img, cyto_img, autofluo):
            blur(img, psf)
        for ch, img in enumerate((nucleus_img, cyto_img)):
            photons = background.copy()
            img = _shifted(img, shifts_px[ch])  # chromatic shift: the optics, before the camera
            img *= illum[slab]
            photons[slab] += img
            image[t, ch] = camera(photons, noise_rng, **camera_kw)

        # --- RNA channels: spots over the cell's autofluorescence
        live_spots = (
            live.frame(
                cells=cells,
                boxes=boxes,
                visible_fraction=fraction,
                cell_labels=labels,
                nuclei=nuclei,
                drift_um=drift[t],
            )
            if live is not None
            else None
        )
        for r in range(n_rna):
            frame_spots = (
                live_spots[r]
                if live_spots is not None
                else sample_spots(
                    cells=cells,
                    boxes=boxes,
                    visible_fraction=fraction,
                    cell_labels=labels,
                    nuclei=nuclei,
                    channel=r,
                    config=c,
                    amplitude_adu=amplitude_adu,
                    rng=spot_rng,
                )
            )
            centres = frame_spots.centres_vox
            rna_img = np.zeros(shape, dtype=np.float32)
            rna_img[slab] = _shifted(autofluo, shifts_px[2 + r])
            add_gaussian_spots(
                rna_img,
                centres + shifts_px[2 + r],
                frame_spots.amplitudes_adu / c.camera_gain_adu_per_e,
                psf,
            )
            rna_img *= illum
            rna_img += background
            image[t, 2 + r] = camera(rna_img, noise_rng, **camera_kw)
            spots_out[t, r] = render_spot_labels(centres, psf, shape)

            idx = tuple(np.rint(centres).astype(np.int64).T)
            prov_cell, prov_nuc = labels[idx], nuclei[idx]
            compartment = np.where(prov_nuc > 0, 2, np.where(prov_cell > 0, 1, 0))
            n = len(centres)
            live_columns = (
                {"track_id": frame_spots.track_ids} if frame_spots.track_ids is not None else {}
            )
            tables.append(
                pl.DataFrame(
                    {
                        "timepoint": np.full(n, t),
                        "channel": [channel_names[2 + r]] * n,
                        "spot_id": np.arange(1, n + 1),
                        "z": centres[:, 0],
                        "y": centres[:, 1],
                        "x": centres[:, 2],
                        "z_um": centres[:, 0] * vox[0],
                        "y_um": centres[:, 1] * vox[1],
                        "x_um": centres[:, 2] * vox[2],
                        "cell_id": lut[prov_cell],
                        "compartment": [COMPARTMENTS[k] for k in compartment],
                        "amplitude": frame_spots.amplitudes_adu * illum[idx],
                        "kind": [KINDS[k] for k in frame_spots.kinds],
                        **live_columns,
                    },
                    schema=table_schema,
                    strict=False,
                )
            )

        cells_out[t] = lut[labels]
        nuclei_out[t] = lut[nuclei]
        # tracks end when a cell is no longer in view; unseen daughters are dropped
        population.cells = [
            cell
            for i, cell in enumerate(cells)
            if visible[i] or (cell.label == 0 and not cell.is_daughter)
        ]
        for cell in population.cells:
            cell.is_daughter = False

    calibration: tuple[np.ndarray | None, ...] = (None, None, None)
    if c.calibration_images:
        calibration = make_calibration_images(c, illum, calib_rng)
    spot_table = pl.concat(tables) if tables else pl.DataFrame(schema=table_schema)
    lineage_df = pl.DataFrame(
        {
            "label": list(lineage),
            "begin_t": [v[0] for v in lineage.values()],
            "end_t": [v[1] for v in lineage.values()],
            "parent_label": [v[2] for v in lineage.values()],
        },
        schema=LINEAGE_SCHEMA,
    ).sort("label")
    return SynthAcquisition(
        image=image,
        channel_names=channel_names,
        cells=cells_out,
        nuclei=nuclei_out,
        spots=spots_out,
        spot_table=spot_table,
        lineage=lineage_df,
        drift_zyx_um=drift,
        voxel_size=VoxelSize.from_um(vox),
        frame_interval_s=c.frame_interval_s,
        config=c,
        illumination=illum,
        calibration_dark=calibration[0],
        calibration_flat=calibration[1],
        calibration_beads=calibration[2],
    )
