"""Tracking benchmark: our tracker against laptrack, same process, same inputs, same scorer.

Inputs
------
* Generator sequences (``cellrna_pipeline.core.synth``): the ground-truth cell masks are
  the segmentation input of both trackers, so DET = SEG = 1 and TRA, CHOTA and the
  division scores measure the linking only. 2D+t and 3D+t (anisotropic voxels
  0.6 x 0.15 x 0.15 um), easy to crowded, fast motion, many divisions; stage drift and
  cells crossing the border as the generator makes them. "standard" is
  ``SynthConfig()`` (the generator's defaults). Test seeds differ from the tuning seeds
  (``--tune`` adds 100 to every seed).
* ``<data>/ctc_metric_fixture_tiny`` (when present): the scorer must give SEG = DET =
  TRA = 1.0 on the fixture's own result, and both trackers are run on its ground-truth
  masks and scored.
* Speed on laptrack's scale: 200 frames x 2,000 points (2D Brownian motion, point input),
  linking with gap closing and splitting enabled in both; link accuracy against the truth.
* Live-RNA spot tracking (``SPOT_SEQUENCES``): the generator's live-RNA mode (spots with
  ground-truth track ids; easy to crowded, SNR 10 to 3, fast transport), 3D+t, with the
  true spot positions and with the spots that the LoG detector finds. Ours with position
  only, + intensity, + the learnt appearance embedding (shipped model, or ``--embedding``),
  and laptrack, on the same points (gap closing over 2 frames in all). Scores: link
  precision / recall / F1 (consecutive detections of a track that are the same true spot;
  detections matched to true spots one-to-one within 3 voxels), track purity and
  completeness, and py-ctcmetrics (TRA, DET, CHOTA) with the spots drawn as small label
  masks (ellipsoids of 2 PSF sigma, truth and results alike). ``--tune-spots`` prints the
  settings' grid on the tuning seeds.

laptrack gets the objects' centroids in um (its input is points) and gates derived from
the same median object diameter as ours; its cutoffs were chosen by ``--tune`` on the
tuning seeds (grid below). Ours uses ``TrackingConfig()`` defaults (set with ``--tune``
on the same tuning seeds). Scores: ``py-ctcmetrics`` (Valid, DET, SEG, TRA, CHOTA) and
division precision/recall/F1 from its branching counts with no temporal tolerance
(``BC(0)``: the division frame must be exact).

Run (from the repository root; about an hour on 2 shared cores: scoring 3D masks with
py-ctcmetrics, laptrack on the crowded spot sequences and its 200 x 2,000 run take most
of it; ``--no-spots`` / ``--no-cells`` / ``--no-speed`` skip sections)::

    OMP_WAIT_POLICY=PASSIVE nice .venv/bin/python benchmarks/tracking.py

Needs the ``bench`` extra (laptrack, py-ctcmetrics).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellrna_pipeline.core.io.ctc import (  # noqa: E402
    check_ctc_result,
    list_ctc_frames,
    read_ctc_tracks,
    write_ctc_result,
)
from cellrna_pipeline.core.synth import SynthConfig, synthesize  # noqa: E402
from cellrna_pipeline.core.synth.optics import psf_sigma_vox  # noqa: E402
from cellrna_pipeline.core.tracking import (  # noqa: E402
    LINEAGE_SCHEMA,
    TrackingConfig,
    TrackingResult,
    ctc_tracks,
    detections_from_labels,
    track,
)
from cellrna_pipeline.core.types import VoxelSize  # noqa: E402

_2D = {"shape_zyx": (1, 256, 256), "voxel_size_um": (1.0, 0.15, 0.15)}
# name -> generator settings (test seeds)
SEQUENCES: dict[str, dict] = {
    "standard (defaults, 3D, 8 frames)": {},
    "3D easy, 20 frames": {"seed": 1, "timepoints": 20, "n_cells": 8},
    "3D many divisions": {"seed": 2, "timepoints": 20, "division_probability": 0.15},
    "3D crowded": {"seed": 3, "timepoints": 20, "n_cells": 30, "division_probability": 0.1},
    "3D fast motion": {"seed": 4, "timepoints": 20, "motion_um_per_frame": 2.5},
    "2D easy, 30 frames": {"seed": 5, "timepoints": 30, "n_cells": 8, **_2D},
    "2D crowded": {
        "seed": 6,
        "timepoints": 20,
        "n_cells": 30,
        "division_probability": 0.1,
        **_2D,
    },
    "2D fast, many divisions": {
        "seed": 7,
        "timepoints": 20,
        "motion_um_per_frame": 2.0,
        "division_probability": 0.15,
        **_2D,
    },
}
TUNE_SEED_OFFSET = 100

# laptrack cutoffs as multiples of the median object diameter (chosen by --tune)
LAPTRACK_LINK = 0.75
LAPTRACK_SPLIT = 1.0
LAPTRACK_GRID = [(c, s) for c in (0.5, 0.75, 1.0, 1.25) for s in (0.5, 0.75, 1.0, 1.25)]
METRICS = ["Valid", "DET", "SEG", "TRA", "CHOTA", "BC"]


# ----------------------------------------------------------------------------- helpers


@dataclass
class Score:
    valid: int
    det: float
    seg: float
    tra: float
    chota: float
    tp: int
    fp: int
    fn: int
    seconds: float

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else float("nan")


SEG_EVERY = 5  # SEG ground truth on every 5th frame, as sparse as CTC's own (scoring is slow)


def write_gt(cells: np.ndarray, lineage: pl.DataFrame, gt: Path) -> None:
    """Generator ground truth as a CTC GT folder (TRA: all frames; SEG: every 5th frame)."""
    (gt / "TRA").mkdir(parents=True)
    (gt / "SEG").mkdir()
    for t, frame in enumerate(cells):
        m = frame.astype(np.uint16)
        m = m[0] if m.shape[0] == 1 else m
        tifffile.imwrite(gt / "TRA" / f"man_track{t:03d}.tif", m, compression="zlib")
        if t % SEG_EVERY == 0:
            tifffile.imwrite(gt / "SEG" / f"man_seg{t:03d}.tif", m, compression="zlib")
    lines = "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in lineage.iter_rows())
    (gt / "TRA" / "man_track.txt").write_text(lines)


def score(res: Path, gt: Path, seconds: float) -> Score:
    from ctc_metrics.scripts.evaluate import calculate_metrics, load_data

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp, ref, traj, segm, _, valid = load_data(str(res), str(gt), True, True, threads=1)
        r = calculate_metrics(comp, ref, traj, segm, list(METRICS), valid)
    if not r.get("Valid"):
        return Score(0, *(float("nan"),) * 4, 0, 0, 0, seconds)
    return Score(
        valid=int(r["Valid"]),
        det=float(r["DET"]),
        seg=float(r["SEG"]),
        tra=float(r["TRA"]),
        chota=float(r["CHOTA"]),
        tp=int(r["tp_div(0)"]),
        fp=int(r["fp_div(0)"]),
        fn=int(r["fn_div(0)"]),
        seconds=seconds,
    )


def write_result(result: TrackingResult, cells: np.ndarray, out: Path) -> None:
    """Relabel the input masks with CTC labels and write the CTC result folder."""
    assignment, tracks = ctc_tracks(result)
    frames = []
    for t, frame in enumerate(cells):
        rows = assignment.filter(pl.col("t") == t)
        lut = np.zeros(int(frame.max(initial=0)) + 1, np.uint32)
        lut[rows["label"].to_numpy()] = rows["ctc_label"].to_numpy()
        frames.append(lut[frame])
    write_ctc_result(out, frames, tracks, n_frames=len(frames))
    problems = check_ctc_result(out)
    if problems:
        raise AssertionError(f"{out}: invalid CTC result: {problems[:3]}")


def run_ours(
    dets: pl.DataFrame, n_frames: int, config: TrackingConfig
) -> tuple[TrackingResult, float]:
    start = time.perf_counter()
    result = track(dets, config=config, n_frames=n_frames)
    return result, time.perf_counter() - start


def run_laptrack(
    dets: pl.DataFrame, n_frames: int, link: float, split: float, diameter: float, ndim: int
) -> tuple[TrackingResult, float]:
    """laptrack on the centroids; its tree converted to our result type."""
    from laptrack import LapTrack

    cols = ["y_um", "x_um"] if ndim == 2 else ["z_um", "y_um", "x_um"]
    frame = dets.select("t", "label", *cols).to_pandas()
    lt = LapTrack(
        cutoff=(link * diameter) ** 2,
        gap_closing_cutoff=(link * diameter) ** 2,
        gap_closing_max_frame_count=2,
        splitting_cutoff=(split * diameter) ** 2,
    )
    start = time.perf_counter()
    tdf, sdf, _ = lt.predict_dataframe(frame, cols, frame_col="t", only_coordinate_cols=False)
    seconds = time.perf_counter() - start
    return laptrack_to_result(tdf, sdf, diameter), seconds


def _track_spans(det: pl.DataFrame) -> pl.DataFrame:
    """Per ``track_id`` of detections ``(t, label, track_id)``: first and last frame and
    the number of detections, sorted by track."""
    return (
        det.group_by("track_id")
        .agg(
            pl.col("t").min().alias("begin_t"),
            pl.col("t").max().alias("end_t"),
            pl.len().alias("n_detections"),
        )
        .sort("track_id")
    )


def laptrack_to_result(tdf, sdf, gate: float) -> TrackingResult:
    tdf = tdf.reset_index(drop=True)
    det = pl.DataFrame(
        {
            "t": tdf["t"].to_numpy().astype(np.int32),
            "label": tdf["label"].to_numpy().astype(np.uint32)
            if "label" in tdf
            else np.zeros(len(tdf), np.uint32),
            "track_id": (tdf["track_id"].to_numpy() + 1).astype(np.uint32),
        }
    )
    spans = _track_spans(det)
    parent = (
        {
            int(c) + 1: int(p) + 1
            for p, c in zip(sdf["parent_track_id"], sdf["child_track_id"], strict=True)
        }
        if len(sdf)
        else {}
    )
    lineage = pl.DataFrame(
        {
            "track_id": spans["track_id"],
            "begin_t": spans["begin_t"],
            "end_t": spans["end_t"],
            "parent_track_id": [parent.get(int(x), 0) for x in spans["track_id"]],
            "n_detections": spans["n_detections"],
        },
        schema=LINEAGE_SCHEMA,
    )
    return TrackingResult(det, lineage, np.zeros((1, 3)), gate, TrackingConfig())


# ------------------------------------------------------------------------- sequences


@dataclass
class Sequence:
    name: str
    cells: np.ndarray
    lineage: pl.DataFrame
    dets: pl.DataFrame
    diameter: float
    ndim: int
    n_divisions: int


def make_sequence(name: str, settings: dict, seed_offset: int = 0) -> Sequence:
    config = SynthConfig(**{**settings, "seed": settings.get("seed", 0) + seed_offset})
    acq = synthesize(config)
    dets = detections_from_labels(acq.cells, voxel_size=acq.voxel_size)
    parents = acq.lineage.filter(pl.col("parent_label") > 0).group_by("parent_label").len()
    return Sequence(
        name=name,
        cells=acq.cells,
        lineage=acq.lineage,
        dets=dets,
        diameter=float(dets["equivalent_diameter_um"].median()),  # type: ignore[arg-type]
        ndim=2 if acq.cells.shape[1] == 1 else 3,
        n_divisions=int(parents.filter(pl.col("len") == 2).height),
    )


def evaluate(seq: Sequence, runner: Callable[[Sequence], tuple[TrackingResult, float]]) -> Score:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_gt(seq.cells, seq.lineage, root / "GT")
        result, seconds = runner(seq)
        write_result(result, seq.cells, root / "RES")
        return score(root / "RES", root / "GT", seconds)


def ours(config: TrackingConfig) -> Callable[[Sequence], tuple[TrackingResult, float]]:
    return lambda s: run_ours(s.dets, s.cells.shape[0], config)


def laptrack(link: float, split: float) -> Callable[[Sequence], tuple[TrackingResult, float]]:
    return lambda s: run_laptrack(s.dets, s.cells.shape[0], link, split, s.diameter, s.ndim)


# ---------------------------------------------------------------------------- fixture


def fixture_check(data: Path) -> list[str]:
    folder = data / "ctc_metric_fixture_tiny"
    if not folder.is_dir():
        return [f"(skipped: {folder} not found)"]
    lines = []
    s = score(folder / "res", folder / "GT", 0.0)
    lines.append(
        f"| scorer on the fixture's own result | {s.valid} | {s.seg:.3f} | {s.det:.3f} | {s.tra:.3f} | {s.chota:.3f} |"
    )
    frames = list_ctc_frames(folder / "GT" / "SEG")  # complete masks of every frame
    cells = np.stack([frames.read(t) for t in frames.frames])
    lineage = read_ctc_tracks(folder / "GT" / "TRA" / "man_track.txt")
    dets = detections_from_labels(cells, voxel_size=VoxelSize(1.0, 1.0, 1.0))
    seq = Sequence(
        "fixture",
        cells,
        lineage,
        dets,
        float(dets["equivalent_diameter_um"].median()),  # type: ignore[arg-type]
        2 if cells.shape[1] == 1 else 3,
        0,
    )
    for name, runner in (
        ("ours on the fixture's GT masks", ours(TrackingConfig())),
        ("laptrack on the fixture's GT masks", laptrack(LAPTRACK_LINK, LAPTRACK_SPLIT)),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            result, seconds = runner(seq)
            write_result(result, cells, Path(tmp) / "RES")
            s = score(Path(tmp) / "RES", folder / "GT", seconds)
        lines.append(
            f"| {name} | {s.valid} | {s.seg:.3f} | {s.det:.3f} | {s.tra:.3f} | {s.chota:.3f} |"
        )
    return lines


# ------------------------------------------------------------------------------ speed


def speed(n_frames: int, n_points: int, seed: int = 0) -> list[str]:
    """Point input on laptrack's scale: Brownian motion, spacing ~22 um, step 1.5 um/axis."""
    rng = np.random.default_rng(seed)
    box = 1000.0
    pos = rng.uniform(0, box, (n_points, 2))
    frames = []
    for t in range(n_frames):
        frames.append(
            pl.DataFrame(
                {
                    "t": np.full(n_points, t, np.int32),
                    "truth": np.arange(n_points),
                    "y_um": pos[:, 0],
                    "x_um": pos[:, 1],
                }
            )
        )
        pos = pos + rng.normal(0, 1.5, pos.shape)
    dets = pl.concat(frames)
    gate = 8.0

    def link_accuracy(result: TrackingResult) -> float:
        # fraction of true (t, t+1) links that the result reproduces (same track, adjacent)
        d = result.detections.sort("truth", "t")
        same_truth = d["truth"].to_numpy()[1:] == d["truth"].to_numpy()[:-1]
        same_track = d["track_id"].to_numpy()[1:] == d["track_id"].to_numpy()[:-1]
        return float((same_truth & same_track).sum() / same_truth.sum())

    start = time.perf_counter()
    # the data are Brownian: ours with its random-walk motion model (laptrack has no model)
    config = TrackingConfig(max_displacement_um=gate, velocity_persistence=0.0)
    mine = track(dets, config=config, n_frames=n_frames)
    t_ours = time.perf_counter() - start

    from laptrack import LapTrack

    frame = dets.to_pandas()
    lt = LapTrack(
        cutoff=gate**2,
        gap_closing_cutoff=gate**2,
        gap_closing_max_frame_count=2,
        splitting_cutoff=gate**2,
    )
    start = time.perf_counter()
    tdf, sdf, _ = lt.predict_dataframe(
        frame, ["y_um", "x_um"], frame_col="t", only_coordinate_cols=False
    )
    t_lt = time.perf_counter() - start
    theirs = laptrack_to_result(tdf, sdf, gate)
    theirs = TrackingResult(
        theirs.detections.with_columns(
            pl.Series("truth", tdf.reset_index(drop=True)["truth"].to_numpy())
        ),
        theirs.lineage,
        theirs.drift_zyx_um,
        gate,
        theirs.config,
    )
    n = n_frames * n_points
    return [
        f"| ours | {t_ours:.1f} | {n / t_ours / 1000:.0f}k | {link_accuracy(mine):.4f} | {int((mine.lineage['parent_track_id'] > 0).sum()) // 2} |",
        f"| laptrack | {t_lt:.1f} | {n / t_lt / 1000:.0f}k | {link_accuracy(theirs):.4f} | {len(sdf) // 2} |",
        f"| ratio laptrack / ours | {t_lt / t_ours:.1f}x | | | |",
    ]


# ------------------------------------------------------------- live-RNA spot tracking

# name -> generator settings on top of live_rna_config() (a volume every 2 s, slow cells,
# no divisions); test seeds, --tune-spots adds 100. 3D, 15 x 32 x 256 x 256.
SPOT_SEQUENCES: dict[str, dict] = {
    "easy: 8 cells, 20 spots/cell, SNR 10": {
        "seed": 11,
        "n_cells": 8,
        "spots_per_cell": 20.0,
        "snr": 10.0,
        "live_rna": {},
    },
    "standard: 40 spots/cell, SNR 6": {
        "seed": 12,
        "spots_per_cell": 40.0,
        "snr": 6.0,
        "live_rna": {},
    },
    "crowded: 120 spots/cell, SNR 6": {
        "seed": 13,
        "spots_per_cell": 120.0,
        "snr": 6.0,
        "live_rna": {},
    },
    "crowded, low SNR: 120 spots/cell, SNR 3": {
        "seed": 14,
        "spots_per_cell": 120.0,
        "snr": 3.0,
        "live_rna": {},
    },
    "fast: D 0.01-0.1 um2/s, 40 % directed": {
        "seed": 15,
        "spots_per_cell": 40.0,
        "snr": 6.0,
        "live_rna": {
            "diffusion_um2_per_s": (0.01, 0.1),
            "directed_fraction": 0.4,
            "directed_speed_um_per_s": (0.2, 0.5),
        },
    },
}
SPOT_MATCH_VOX = 3.0  # detections match true spots one-to-one within 3 voxels
SPOT_MAX_GAP = 2  # gap closing over 2 missing frames, in every method
# laptrack's cutoff for spots (um per frame, chosen by --tune-spots)
LAPTRACK_SPOT_CUTOFF_UM = 1.0
LAPTRACK_SPOT_GRID = (0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass
class SpotSequence:
    name: str
    volumes: np.ndarray  # (t, z, y, x) float32, channel rna0
    truth: pl.DataFrame  # true spots of rna0 (t, spot_id, positions, intensity, gt)
    voxel_size: VoxelSize
    psf_sigma_vox: tuple[float, float, float]
    detected: pl.DataFrame | None = None


def make_spot_sequence(name: str, settings: dict, seed_offset: int = 0) -> SpotSequence:
    from cellrna_pipeline.core.synth import live_rna_config

    config = live_rna_config(
        **{
            "timepoints": 15,
            "calibration_images": False,
            **settings,
            "seed": settings["seed"] + seed_offset,
        }
    )
    acq = synthesize(config)
    assert acq.image is not None
    truth = (
        acq.spot_table.filter(pl.col("channel") == "rna0")
        .rename({"timepoint": "t", "amplitude": "intensity"})
        .with_columns(pl.col("track_id").alias("gt"))
        .drop("track_id")
    )
    return SpotSequence(
        name=name,
        volumes=acq.image[:, 2].astype(np.float32),
        truth=truth,
        voxel_size=acq.voxel_size,
        psf_sigma_vox=psf_sigma_vox(acq.config.psf_sigma_nm, acq.config.voxel_size_um),
    )


def detect_sequence(seq: SpotSequence) -> pl.DataFrame:
    """LoG detections of every frame, each matched to a true spot (``gt``, 0 = none)."""
    from cellrna_pipeline.core.spots import detect_spots, match_spots

    vox = np.asarray(seq.voxel_size.as_tuple())
    frames = []
    for t, volume in enumerate(seq.volumes):
        det = detect_spots(volume, voxel_size=seq.voxel_size).table
        pred = det.select("z", "y", "x").to_numpy()
        rows = seq.truth.filter(pl.col("t") == t)
        m = match_spots(pred, rows.select("z", "y", "x").to_numpy(), max_distance=SPOT_MATCH_VOX)
        gt = np.zeros(len(pred), np.int64)
        gt[m.pairs[:, 0]] = rows["gt"].to_numpy()[m.pairs[:, 1]]
        frames.append(
            det.select("spot_id", "z", "y", "x", "intensity").with_columns(
                pl.lit(t, dtype=pl.Int32).alias("t"),
                *(
                    pl.col(a).mul(float(v)).alias(f"{a}_um")
                    for a, v in zip("zyx", vox, strict=True)
                ),
                pl.Series("gt", gt),
            )
        )
    return pl.concat(frames)


def with_embeddings(dets: pl.DataFrame, seq: SpotSequence, embedder) -> pl.DataFrame:
    parts = []
    for t, volume in enumerate(seq.volumes):
        rows = dets.filter(pl.col("t") == t)
        vectors = embedder.embed(volume, rows.select("z", "y", "x").to_numpy())
        parts.append(rows.with_columns(pl.Series("embedding", vectors)))
    return pl.concat(parts)


def run_ours_spots(
    dets: pl.DataFrame, n_frames: int, config: TrackingConfig
) -> tuple[pl.DataFrame, float]:
    from cellrna_pipeline.core.tracking import track_spots

    start = time.perf_counter()
    out = track_spots(dets, config=config, n_frames=n_frames)
    return out.select("t", "spot_id", "track_id"), time.perf_counter() - start


def run_laptrack_spots(dets: pl.DataFrame, cutoff_um: float) -> tuple[pl.DataFrame, float]:
    from laptrack import LapTrack

    frame = dets.select("t", "spot_id", "z_um", "y_um", "x_um").to_pandas()
    lt = LapTrack(
        cutoff=cutoff_um**2,
        gap_closing_cutoff=cutoff_um**2,
        gap_closing_max_frame_count=SPOT_MAX_GAP,
        splitting_cutoff=False,
    )
    start = time.perf_counter()
    tdf, _, _ = lt.predict_dataframe(
        frame, ["z_um", "y_um", "x_um"], frame_col="t", only_coordinate_cols=False
    )
    seconds = time.perf_counter() - start
    tdf = tdf.reset_index(drop=True)
    out = pl.DataFrame(
        {
            "t": tdf["t"].to_numpy().astype(np.int32),
            "spot_id": tdf["spot_id"].to_numpy().astype(np.uint32),
            "track_id": (tdf["track_id"].to_numpy() + 1).astype(np.uint32),
        }
    )
    return out, seconds


@dataclass
class LinkScore:
    correct: int
    predicted: int
    true: int
    purity: float
    completeness: float
    tra: float = float("nan")
    det: float = float("nan")
    chota: float = float("nan")
    seconds: float = 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        return self.correct / self.true if self.true else float("nan")

    @property
    def f1(self) -> float:
        d = self.predicted + self.true
        return 2 * self.correct / d if d else float("nan")


def _consecutive(track: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Indices i (into rows sorted by track, t) where rows i, i+1 are one link."""
    return np.flatnonzero((track[1:] == track[:-1]) & (t[1:] - t[:-1] <= SPOT_MAX_GAP + 1))


def link_score(dets: pl.DataFrame, result: pl.DataFrame) -> LinkScore:
    """Links (consecutive detections of a track, up to SPOT_MAX_GAP missing frames) that
    join two detections of the same true spot; purity and completeness of the tracks."""
    d = result.join(dets.select("t", "spot_id", "gt"), on=["t", "spot_id"], how="left").sort(
        "track_id", "t"
    )
    tid, t, gt = (d[c].to_numpy().astype(np.int64) for c in ("track_id", "t", "gt"))
    i = _consecutive(tid, t)
    correct = int(((gt[i] == gt[i + 1]) & (gt[i] > 0)).sum())
    g = dets.filter(pl.col("gt") > 0).sort("gt", "t")
    true_links = len(_consecutive(g["gt"].to_numpy(), g["t"].to_numpy()))
    matched = d.filter(pl.col("gt") > 0)
    counts = matched.group_by("track_id", "gt").len()
    purity = float(counts.group_by("track_id").agg(pl.col("len").max())["len"].sum()) / max(
        matched.height, 1
    )
    completeness = float(counts.group_by("gt").agg(pl.col("len").max())["len"].sum()) / max(
        matched.height, 1
    )
    return LinkScore(correct, len(i), true_links, purity, completeness)


def result_from_tracks(tracks: pl.DataFrame) -> TrackingResult:
    """A TrackingResult (no divisions) from ``t, spot_id, track_id`` rows (for ctc_tracks)."""
    det = tracks.select(
        pl.col("t").cast(pl.Int32),
        pl.col("spot_id").cast(pl.UInt32).alias("label"),
        pl.col("track_id").cast(pl.UInt32),
    )
    spans = _track_spans(det)
    lineage = spans.select(
        "track_id",
        "begin_t",
        "end_t",
        pl.lit(0, dtype=pl.UInt32).alias("parent_track_id"),
        pl.col("n_detections").cast(pl.Int32),
    ).cast(LINEAGE_SCHEMA)  # type: ignore[arg-type]
    return TrackingResult(det, lineage, np.zeros((1, 3)), 0.0, TrackingConfig())


def _ctc_folder(result: TrackingResult, masks: list[np.ndarray], out: Path, *, gt: bool) -> None:
    assignment, tracks = ctc_tracks(result)
    frames = []
    for t, frame in enumerate(masks):
        rows = assignment.filter(pl.col("t") == t)
        lut = np.zeros(int(max(frame.max(initial=0), rows["label"].max() or 0)) + 1, np.uint16)
        lut[rows["label"].to_numpy().astype(np.int64)] = rows["ctc_label"].to_numpy()
        frames.append(lut[frame])
    if gt:
        (out / "TRA").mkdir(parents=True)
        for t, m in enumerate(frames):
            tifffile.imwrite(out / "TRA" / f"man_track{t:03d}.tif", m, compression="zlib")
        lines = "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in tracks.iter_rows())
        (out / "TRA" / "man_track.txt").write_text(lines)
    else:
        write_ctc_result(out, frames, tracks, n_frames=len(frames))


SPOT_MASK_SIGMAS = 2.0  # CTC masks of spots: ellipsoids of 2 PSF sigma, for truth and results


def spot_masks(seq: SpotSequence, rows: pl.DataFrame) -> list[np.ndarray]:
    """Per frame, label masks of the spots in ``rows`` (label = ``spot_id``)."""
    from cellrna_pipeline.core.spots import rasterize_spots

    sigma = tuple(SPOT_MASK_SIGMAS * s for s in seq.psf_sigma_vox)
    masks = []
    for t in range(len(seq.volumes)):
        r = rows.filter(pl.col("t") == t)
        lab = rasterize_spots(
            r.select("z", "y", "x").to_numpy(), seq.volumes.shape[1:], sigma_vox=sigma, labels=True
        ).labels
        assert lab is not None
        lut = np.zeros(r.height + 1, np.uint32)
        lut[1:] = r["spot_id"].to_numpy()
        masks.append(lut[lab])
    return masks


def _drawn_spots(masks: list[np.ndarray]) -> pl.DataFrame:
    """``(t, spot_id)`` of the spots that have at least one voxel in ``masks``."""
    return pl.concat(
        [
            pl.DataFrame({"t": t, "spot_id": np.unique(m[m > 0]).astype(np.int64)})
            for t, m in enumerate(masks)
        ]
    )


def ctc_score(gt: Path, masks: list[np.ndarray], result: pl.DataFrame) -> dict:
    """py-ctcmetrics of a spot tracking result against the CTC folder ``gt`` (see
    :func:`spot_masks`; the result's masks are ``masks``, labels = ``spot_id``)."""
    from ctc_metrics.scripts.evaluate import calculate_metrics, load_data

    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "RES"
        _ctc_folder(result_from_tracks(result), masks, res, gt=False)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comp, ref, traj, segm, _, valid = load_data(str(res), str(gt), True, False, threads=1)
            return calculate_metrics(comp, ref, traj, segm, ["Valid", "DET", "TRA", "CHOTA"], valid)


def spot_methods(embedder, sigma: float | None = None) -> dict[str, Callable]:
    """name -> runner(dets, n_frames) for the spot section (same detections for all)."""
    from cellrna_pipeline.core.tracking import SPOT_APPEARANCE_SIGMA, spot_tracking_config

    a = sigma if sigma is not None else SPOT_APPEARANCE_SIGMA
    methods: dict[str, Callable] = {
        "ours, position": lambda d, n: run_ours_spots(
            d, n, spot_tracking_config(intensity_log_sigma=None)
        ),
        "ours, position + intensity": lambda d, n: run_ours_spots(d, n, spot_tracking_config()),
    }
    if embedder is not None:
        methods["ours, position + embedding"] = lambda d, n: run_ours_spots(
            d, n, spot_tracking_config(intensity_log_sigma=None, appearance_sigma=a)
        )
        methods["ours, position + intensity + embedding"] = lambda d, n: run_ours_spots(
            d, n, spot_tracking_config(appearance_sigma=a)
        )
    methods["laptrack"] = lambda d, n: run_laptrack_spots(d, LAPTRACK_SPOT_CUTOFF_UM)
    return methods


def spot_section(names: list[str], embedder, *, with_ctc: bool = True) -> list[str]:
    lines = [
        "| sequence | input | method | link P | link R | link F1 | purity | completeness | TRA | DET | CHOTA | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pooled: dict[tuple[str, str], list[LinkScore]] = {}
    for name in names:
        seq = make_spot_sequence(name, SPOT_SEQUENCES[name])
        n = len(seq.volumes)
        tmp = tempfile.TemporaryDirectory()
        gt = Path(tmp.name) / "GT"
        if with_ctc:  # the true spots' tracks as a CTC ground truth, written once
            truth = seq.truth.select("t", "spot_id", pl.col("gt").alias("track_id"))
            _ctc_folder(result_from_tracks(truth), spot_masks(seq, seq.truth), gt, gt=True)
        inputs = {"true positions": seq.truth, "detected (LoG)": detect_sequence(seq)}
        per_frame = seq.truth.height / n
        det_f1 = (
            2
            * int((inputs["detected (LoG)"]["gt"] > 0).sum())
            / (inputs["detected (LoG)"].height + seq.truth.height)
        )
        for input_name, dets in inputs.items():
            if embedder is not None:
                dets = with_embeddings(dets, seq, embedder)
            masks = spot_masks(seq, dets) if with_ctc else []
            # two detections on one voxel leave one of them no mask voxel: the CTC result
            # (for every method alike) keeps the spots that have one
            drawn = _drawn_spots(masks) if with_ctc else None
            for method, runner in spot_methods(embedder).items():
                result, seconds = runner(dets, n)
                sc = link_score(dets, result)
                sc.seconds = seconds
                if with_ctc:
                    keep = drawn.cast(
                        {"t": result.schema["t"], "spot_id": result.schema["spot_id"]}
                    )
                    r = ctc_score(gt, masks, result.join(keep, on=["t", "spot_id"], how="semi"))
                    if r.get("Valid") != 1:  # py-ctcmetrics gives no scores then
                        print(f"warning: invalid CTC result: {name} / {input_name} / {method}")
                    sc.tra, sc.det, sc.chota = (
                        float("nan") if r.get(k) is None else float(r[k])
                        for k in ("TRA", "DET", "CHOTA")
                    )
                pooled.setdefault((input_name, method), []).append(sc)
                row = (
                    f"| {name} ({n} x 32 x 256 x 256, {per_frame:.0f} spots/frame, detection F1 {det_f1:.2f}) | {input_name} | {method} | "
                    f"{sc.precision:.4f} | {sc.recall:.4f} | {sc.f1:.4f} | {sc.purity:.4f} | {sc.completeness:.4f} | "
                    f"{sc.tra:.4f} | {sc.det:.3f} | {sc.chota:.4f} | {sc.seconds:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
        tmp.cleanup()
    lines += [
        "",
        "| pooled over sequences | input | link P | link R | link F1 | mean TRA |",
        "|---|---|---|---|---|---|",
    ]
    for (input_name, method), scores in pooled.items():
        total = LinkScore(
            sum(s.correct for s in scores),
            sum(s.predicted for s in scores),
            sum(s.true for s in scores),
            0,
            0,
        )
        tra = statistics.mean(s.tra for s in scores)
        lines.append(
            f"| {method} | {input_name} | {total.precision:.4f} | {total.recall:.4f} | {total.f1:.4f} | {tra:.4f} |"
        )
    return lines


def tune_spots(names: list[str], embedder) -> None:
    """Our spot settings and laptrack's cutoff on the tuning seeds (seed + 100), by pooled
    link F1 over true and detected positions."""
    from cellrna_pipeline.core.tracking import spot_tracking_config

    seqs = [make_spot_sequence(n, SPOT_SEQUENCES[n], TUNE_SEED_OFFSET) for n in names]
    inputs = []
    for seq in seqs:
        for dets in (seq.truth, detect_sequence(seq)):
            inputs.append(
                (with_embeddings(dets, seq, embedder) if embedder else dets, len(seq.volumes))
            )

    def pooled(runner) -> float:
        scores = [link_score(d, runner(d, n)[0]) for d, n in inputs]
        c, p, t = (sum(getattr(s, k) for s in scores) for k in ("correct", "predicted", "true"))
        return 2 * c / (p + t)

    print("laptrack cutoff (um): pooled link F1")
    for cutoff in LAPTRACK_SPOT_GRID:
        print(
            f"  {cutoff}: {pooled(lambda d, n, c=cutoff: run_laptrack_spots(d, c)):.4f}", flush=True
        )
    print("ours, SPOT_TRACKING_DEFAULTS and one setting changed: pooled link F1")
    grid = [
        {},
        {"max_displacement_um": 1.0},
        {"max_displacement_um": 2.0},
        {"velocity_persistence": 0.5},
        {"motion_sigma_um": 0.15},
        {"motion_sigma_um": 0.35},
        {"adapt_motion": True},
        {"position_sigma_um": 0.05},
        {"intensity_log_sigma": None},
        {"intensity_log_sigma": 0.2},
        {"intensity_log_sigma": 0.5},
        {"max_link_cost": 25.0},
        {"max_link_cost": 38.0},
        {"gap_cost_per_frame": 4.0},
        {"gap_cost_per_frame": 10.0},
    ]
    for extra in grid:
        f = pooled(lambda d, n, e=extra: run_ours_spots(d, n, spot_tracking_config(**e)))
        print(f"  {extra}: {f:.4f}", flush=True)
    if embedder is not None:
        for sigma in (0.3, 0.4, 0.5, 0.6, 0.8):
            f = pooled(
                lambda d, n, s=sigma: run_ours_spots(d, n, spot_tracking_config(appearance_sigma=s))
            )
            print(f"  appearance_sigma {sigma}: {f:.4f}", flush=True)


# ------------------------------------------------------------------------------- main


def table(rows: list[tuple[str, str, Score]]) -> list[str]:
    out = [
        "| sequence | method | TRA | CHOTA | DET | SEG | div P | div R | div F1 (tp/fp/fn) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq, method, s in rows:
        out.append(
            f"| {seq} | {method} | {s.tra:.4f} | {s.chota:.4f} | {s.det:.3f} | {s.seg:.3f} | "
            f"{s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} ({s.tp}/{s.fp}/{s.fn}) | {s.seconds:.2f} |"
        )
    return out


def _edges_truth(lineage: pl.DataFrame) -> tuple[set, dict]:
    """Ground-truth links ((t, label) -> (t', label')) and divisions {parent: {daughters}}."""
    ends = dict(zip(lineage["label"].to_list(), lineage["end_t"].to_list(), strict=True))
    links, divisions = set(), {}
    for label, begin, end, parent in lineage.iter_rows():
        links |= {((t, label), (t + 1, label)) for t in range(begin, end)}
        if parent:
            node = (ends[parent], parent)
            links.add((node, (begin, label)))
            divisions.setdefault(node, set()).add((begin, label))
    return links, {k: frozenset(v) for k, v in divisions.items() if len(v) == 2}


def _edges_result(result: TrackingResult) -> tuple[set, dict]:
    d = result.detections.sort("track_id", "t")
    tid, t, lab = (d[c].to_list() for c in ("track_id", "t", "label"))
    links = {
        ((t[i], lab[i]), (t[i + 1], lab[i + 1]))
        for i in range(len(tid) - 1)
        if tid[i] == tid[i + 1]
    }
    first, last = {}, {}
    for i, k in enumerate(tid):
        first.setdefault(k, (t[i], lab[i]))
        last[k] = (t[i], lab[i])
    divisions: dict = {}
    for track_id, _, _, parent, _ in result.lineage.iter_rows():
        if parent:
            links.add((last[parent], first[track_id]))
            divisions.setdefault(last[parent], set()).add(first[track_id])
    return links, {k: frozenset(v) for k, v in divisions.items() if len(v) == 2}


def proxy_score(seqs: list[Sequence], runner) -> tuple[float, float]:
    """For tuning only (fast, exact here because the input masks are the ground truth):
    link error (1.5 x missed + 1 x wrong links, over true links, like TRA's weights) and
    pooled exact division F1."""
    missed = wrong = total = tp = fp = fn = 0
    for seq in seqs:
        result, _ = runner(seq)
        links, divisions = _edges_truth(seq.lineage)
        ours_links, ours_div = _edges_result(result)
        missed += len(links - ours_links)
        wrong += len(ours_links - links)
        total += len(links)
        hits = {k for k, v in ours_div.items() if divisions.get(k) == v}
        tp += len(hits)
        fp += len(ours_div) - len(hits)
        fn += len(divisions) - len(hits)
    return (1.5 * missed + wrong) / total, 2 * tp / max(2 * tp + fp + fn, 1)


def tune(names: list[str]) -> None:
    """Choose laptrack's cutoffs on the tuning seeds (seed + 100) with the fast proxy."""
    seqs = [make_sequence(n, SEQUENCES[n], TUNE_SEED_OFFSET) for n in names]
    print(
        "laptrack grid (link, split as multiples of the median diameter): link error, division F1"
    )
    best = None
    for link, split in LAPTRACK_GRID:
        err, f1 = proxy_score(seqs, laptrack(link, split))
        print(
            f"  link {link:.2f} split {split:.2f}: link error {err:.4f}, division F1 {f1:.3f}",
            flush=True,
        )
        if best is None or f1 - err > best[0]:
            best = (f1 - err, link, split)
    assert best is not None
    print(f"  best: LAPTRACK_LINK = {best[1]}, LAPTRACK_SPLIT = {best[2]}")
    err, f1 = proxy_score(seqs, ours(TrackingConfig()))
    print(f"ours, TrackingConfig(): link error {err:.4f}, division F1 {f1:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--sequences", nargs="*", help="cell sequence names (default: all)")
    p.add_argument("--spot-sequences", nargs="*", help="live-RNA sequence names (default: all)")
    p.add_argument("--speed-frames", type=int, default=200)
    p.add_argument("--speed-points", type=int, default=2000)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-cells", action="store_true", help="skip the cell sections")
    p.add_argument("--no-spots", action="store_true", help="skip the live-RNA spot section")
    p.add_argument(
        "--embedding",
        type=Path,
        help="spot embedding model folder (default: the shipped model_registry/spot-embedding)",
    )
    p.add_argument(
        "--tune", action="store_true", help="grid-search laptrack's cutoffs on the tuning seeds"
    )
    p.add_argument(
        "--tune-spots",
        action="store_true",
        help="spot settings (ours, laptrack) on the live-RNA tuning seeds",
    )
    p.add_argument("--out", type=Path, help="also write the markdown tables here")
    args = p.parse_args()
    names = args.sequences or list(SEQUENCES)
    spot_names = args.spot_sequences or list(SPOT_SEQUENCES)
    embedder = None
    if not args.no_spots or args.tune_spots:
        from cellrna_pipeline.core.device import configure_cpu_threads
        from cellrna_pipeline.core.tracking import load_spot_embedder

        embedder = load_spot_embedder(args.embedding, device="cpu")
        configure_cpu_threads(1)
    if args.tune:
        tune(names)
        return 0
    if args.tune_spots:
        tune_spots(spot_names, embedder)
        return 0

    lines: list[str] = []
    if not args.no_cells:
        lines += cell_sections(names, args.data)
    if not args.no_spots:
        lines += [
            "",
            "## Live-RNA spot tracking (ours with and without the appearance embedding, laptrack)",
            "",
        ]
        lines += spot_section(spot_names, embedder)
    if not args.no_speed:
        lines += [
            "",
            f"## Linking speed: {args.speed_frames} frames x {args.speed_points} points (2D, gap closing + splitting on)",
            "",
            "| method | seconds | points/s | link accuracy | divisions |",
            "|---|---|---|---|---|",
        ]
        lines += speed(args.speed_frames, args.speed_points)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def cell_sections(names: list[str], data: Path) -> list[str]:
    lines = ["## Generator sequences (GT masks as segmentation input)", ""]
    rows = []
    for name in names:
        seq = make_sequence(name, SEQUENCES[name])
        s_ours = evaluate(seq, ours(TrackingConfig()))
        s_lt = evaluate(seq, laptrack(LAPTRACK_LINK, LAPTRACK_SPLIT))
        label = (
            f"{name} ({seq.cells.shape[0]} x {tuple(seq.cells.shape[1:])}, {seq.n_divisions} div.)"
        )
        rows += [(label, "ours", s_ours), (label, "laptrack", s_lt)]
        print(*table(rows[-2:])[2:], sep="\n", flush=True)
    lines += table(rows)
    tp = {m: sum(s.tp for _, mm, s in rows if mm == m) for m in ("ours", "laptrack")}
    fp = {m: sum(s.fp for _, mm, s in rows if mm == m) for m in ("ours", "laptrack")}
    fn = {m: sum(s.fn for _, mm, s in rows if mm == m) for m in ("ours", "laptrack")}
    lines += [
        "",
        "| pooled over sequences | div P | div R | div F1 | mean TRA |",
        "|---|---|---|---|---|",
    ]
    for m in ("ours", "laptrack"):
        s = Score(1, 0, 0, 0, 0, tp[m], fp[m], fn[m], 0)
        mean_tra = statistics.mean(x.tra for _, mm, x in rows if mm == m)
        lines.append(f"| {m} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | {mean_tra:.4f} |")

    lines += [
        "",
        "## CTC fixture (scorer sanity check)",
        "",
        "| run | Valid | SEG | DET | TRA | CHOTA |",
        "|---|---|---|---|---|---|",
    ]
    lines += fixture_check(data)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
