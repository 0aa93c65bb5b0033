"""Tests of the tracker: assignment, measurements, linking, gaps, divisions, drift, outputs."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth import SynthConfig, synthesize
from cellrna_pipeline.core.tracking import (
    TRACKS_TABLE_SCHEMA,
    TrackingConfig,
    ctc_tracks,
    detections_from_labels,
    division_problems,
    measure_objects,
    napari_graph,
    relabel_frame,
    relabel_masks,
    track,
    track_jumps,
    track_labels,
    tracks_table,
)
from cellrna_pipeline.core.tracking._assign import assign
from cellrna_pipeline.core.types import VoxelSize

UM = VoxelSize(1.0, 1.0, 1.0)


def points(rows: list[tuple[int, float, float]], **extra: list) -> pl.DataFrame:
    """Detections from (t, y_um, x_um) rows (2D+t point input)."""
    t, y, x = zip(*rows, strict=True)
    return pl.DataFrame({"t": list(t), "y_um": list(y), "x_um": list(x), **extra}).with_columns(
        pl.col("t").cast(pl.Int32)
    )


def same_track(result, a: int, b: int) -> bool:
    ids = result.detections["track_id"].to_list()
    return ids[a] == ids[b]


# ----------------------------------------------------------------------------- config


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        TrackingConfig(max_displacment_um=5.0)  # typo
    for bad in (
        {"max_displacement_um": 0.0},
        {"max_displacement_um": float("nan")},
        {"velocity_persistence": 1.5},
        {"max_gap_frames": -1},
        {"volume_log_sigma": -0.1},
        {"division_min_age_frames": 0},
    ):
        with pytest.raises(InputError):
            TrackingConfig(**bad)
    assert TrackingConfig(max_displacement_um=3.0).max_displacement_um == 3.0


# ------------------------------------------------------------------------- assignment


def _brute_force(n: int, m: int, cost: np.ndarray, max_cost: float) -> float:
    """Optimal total of links + max_cost/2 per unmatched row or column, by enumeration."""
    best = (n + m) * max_cost / 2
    for k in range(1, min(n, m) + 1):
        for rows in itertools.combinations(range(n), k):
            for cols in itertools.permutations(range(m), k):
                c = sum(cost[r, c] for r, c in zip(rows, cols, strict=True))
                best = min(best, c + (n + m - 2 * k) * max_cost / 2)
    return best


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    m=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    density=st.floats(0.2, 1.0),
)
def test_assign_is_optimal(n, m, seed, density):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0, 12, (n, m))
    cost[rng.random((n, m)) > density] = np.inf  # gated out
    rows, cols = np.nonzero(np.isfinite(cost))
    chosen = assign(rows, cols, cost[rows, cols], max_cost=10.0)
    r, c = rows[chosen], cols[chosen]
    assert len(set(r)) == len(r) and len(set(c)) == len(c)  # one-to-one
    total = cost[r, c].sum() + (n + m - 2 * len(r)) * 5.0
    assert total == pytest.approx(_brute_force(n, m, np.where(np.isfinite(cost), cost, 1e9), 10.0))


def test_assign_prefers_global_optimum_over_greedy():
    # greedy would take the 1.0 pair and leave the other row unmatched
    rows = np.array([0, 0, 1])
    cols = np.array([0, 1, 0])
    cost = np.array([1.0, 2.0, 1.5])
    chosen = assign(rows, cols, cost, max_cost=10.0)
    assert sorted(zip(rows[chosen], cols[chosen], strict=True)) == [(0, 1), (1, 0)]
    assert len(assign(rows, cols, cost + 20, max_cost=10.0)) == 0


# ----------------------------------------------------------------------- measurements


def test_measure_objects_physical_units_and_border():
    labels = np.zeros((4, 10, 12), np.uint16)
    labels[1:3, 2:6, 3:5] = 7  # 2 x 4 x 2 voxels, inside
    labels[:, 0:2, 10:12] = 3  # touches the border
    vs = VoxelSize(2.0, 0.5, 0.25)
    image = np.zeros(labels.shape, np.float32)
    image[labels == 7] = 10.0
    df = measure_objects(labels, voxel_size=vs, intensity=image, t=5)
    assert df["label"].to_list() == [3, 7]
    row = df.filter(pl.col("label") == 7).row(0, named=True)
    assert row["t"] == 5
    assert row["volume_um3"] == pytest.approx(16 * 2.0 * 0.5 * 0.25)
    assert (row["z"], row["y"], row["x"]) == pytest.approx((1.5, 3.5, 3.5))
    assert (row["z_um"], row["y_um"], row["x_um"]) == pytest.approx((3.0, 1.75, 0.875))
    assert row["mean_intensity"] == pytest.approx(10.0)
    assert not row["touches_border"]
    assert df.filter(pl.col("label") == 3)["touches_border"][0]
    # extents are physical: the longest axis is y (4 x 0.5 um) ... z (2 x 2 um) is longer
    assert row["extent_major_um"] >= row["extent_mid_um"] >= row["extent_minor_um"] > 0


def test_measure_objects_2d_and_errors():
    labels = np.zeros((8, 8), np.int32)
    labels[2:4, 2:4] = 1
    df = measure_objects(labels, voxel_size=UM)
    assert df.height == 1 and df["z"][0] == 0.0
    assert df["equivalent_diameter_um"][0] == pytest.approx(2 * np.sqrt(4 / np.pi))
    assert measure_objects(np.zeros((5, 5), np.uint8), voxel_size=UM).height == 0
    with pytest.raises(InputError, match="integer"):
        measure_objects(labels.astype(float), voxel_size=UM)
    with pytest.raises(InputError, match="2D"):
        measure_objects(np.zeros((2, 2, 2, 2), np.uint8), voxel_size=UM)
    with pytest.raises(InputError, match=">= 0"):
        measure_objects(-labels, voxel_size=UM)
    with pytest.raises(InputError, match="shape"):
        measure_objects(labels, voxel_size=UM, intensity=np.zeros((3, 3)))
    with pytest.raises(InputError, match="NaN"):
        measure_objects(labels, voxel_size=UM, intensity=np.full((8, 8), np.nan))


# ---------------------------------------------------------------------------- linking


def test_constant_velocity_crossing_is_resolved_by_prediction():
    # Two objects move towards each other, pass at 1.6 um and go on: position alone (nearest
    # neighbour from the last position) would swap them after the crossing; the
    # constant-velocity prediction keeps them apart.
    rows = []
    for t in range(8):
        rows.append((t, 10.0, 0.0 + 2.0 * t))
        rows.append((t, 11.6, 14.0 - 2.0 * t))
    cfg = TrackingConfig(
        max_displacement_um=4.0,
        velocity_persistence=1.0,
        motion_sigma_um=0.3,
        position_sigma_um=0.2,
        divisions=False,
    )
    result = track(points(rows), config=cfg)
    assert result.lineage.height == 2
    ids = result.detections["track_id"].to_list()
    assert ids[0::2] == [ids[0]] * 8 and ids[1::2] == [ids[1]] * 8


def test_gap_closing_bridges_missing_frames_and_ctc_splits_at_gaps():
    rows = [(t, 5.0 + t, 5.0) for t in range(6) if t != 2]  # frame 2 missing
    rows += [(t, 40.0, 40.0 - t) for t in range(6)]
    df = points(rows)
    result = track(df, config=TrackingConfig(max_displacement_um=3.0))
    assert result.lineage.height == 2
    first = result.detections.filter(pl.col("x_um") == 5.0)
    assert first["track_id"].n_unique() == 1
    assert first["t"].to_list() == [0, 1, 3, 4, 5]
    no_gap = track(df, config=TrackingConfig(max_displacement_um=3.0, max_gap_frames=0))
    assert no_gap.lineage.height == 3
    # CTC has no gaps: the gap-closed track becomes two CTC tracks, the second the only
    # daughter of the first.
    assignment, ctc = ctc_tracks(result)
    assert ctc.height == 3
    gap_piece = ctc.filter(pl.col("begin_t") == 3)
    assert gap_piece["parent_label"][0] == ctc.filter(pl.col("end_t") == 1)["label"][0]
    assert assignment.height == df.height


def _loose(gate: float) -> TrackingConfig:
    """A config whose costs accept any move within the gate: only the gate decides."""
    return TrackingConfig(max_displacement_um=gate, motion_sigma_um=10.0, estimate_drift=False)


def test_gap_closing_gate_grows_with_the_gap():
    rows = [(0, 0.0, 0.0), (1, 0.0, 2.5), (3, 0.0, 7.5)]  # 2.5 um/frame, one frame missing
    assert track(points(rows), config=_loose(3.0)).lineage.height == 1
    far = [(0, 0.0, 0.0), (1, 0.0, 2.5), (3, 0.0, 8.7)]  # 6.2 um in 2 frames > 2 x 3 um gate
    assert track(points(far), config=_loose(3.0)).lineage.height == 2


def test_objects_beyond_the_gate_are_not_linked():
    rows = [(0, 0.0, 0.0), (1, 0.0, 5.0)]
    assert track(points(rows), config=_loose(4.9)).lineage.height == 2
    assert track(points(rows), config=_loose(5.1)).lineage.height == 1
    # with the default spreads (motion sigma = gate / 8), a move of most of the gate costs
    # more than a new track: the gate is a hard limit, typical moves are well inside it
    assert track(points(rows), config=TrackingConfig(max_displacement_um=5.1)).lineage.height == 2


def _division_frames(volumes: bool) -> pl.DataFrame:
    """One cell (volume 400) for 4 frames, then two daughters of ~200 either side of it."""
    rows = [(t, 20.0, 20.0 + 0.5 * t) for t in range(4)]
    rows += [(t, 20.0 - 3.0, 22.0 + 0.5 * (t - 4)) for t in range(4, 7)]
    rows += [(t, 20.0 + 3.0, 22.0 + 0.5 * (t - 4)) for t in range(4, 7)]
    rows += [(t, 60.0, 60.0) for t in range(7)]  # a bystander
    vol = [400.0] * 4 + [190.0] * 3 + [210.0] * 3 + [300.0] * 7
    return points(rows, **({"volume_um3": vol} if volumes else {}))


def test_division_one_parent_two_daughters():
    df = _division_frames(volumes=True)
    result = track(df, config=TrackingConfig(max_displacement_um=8.0))
    lin = result.lineage
    assert lin.height == 4
    parent = lin.filter(pl.col("begin_t") == 0, pl.col("end_t") == 3)
    daughters = lin.filter(pl.col("parent_track_id") > 0)
    assert parent.height == 1 and daughters.height == 2
    assert set(daughters["parent_track_id"].to_list()) == {parent["track_id"][0]}
    assert daughters["begin_t"].to_list() == [4, 4]
    assert division_problems(lin) == []
    assert napari_graph(result) == {
        int(d): [int(parent["track_id"][0])] for d in daughters["track_id"]
    }
    # the CTC view keeps the division
    _, ctc = ctc_tracks(result)
    assert (ctc["parent_label"] > 0).sum() == 2
    # without divisions the parent simply continues into one daughter
    flat = track(df, config=TrackingConfig(max_displacement_um=8.0, divisions=False))
    assert (flat.lineage["parent_track_id"] == 0).all()


def test_division_rejected_when_volumes_do_not_add_up():
    df = _division_frames(volumes=True).with_columns(
        pl.when(pl.col("t") >= 4, pl.col("y_um") > 20.5, pl.col("x_um") < 50)
        .then(pl.lit(1500.0))  # a "daughter" much bigger than its parent: not a division
        .otherwise(pl.col("volume_um3"))
        .alias("volume_um3")
    )
    result = track(df, config=TrackingConfig(max_displacement_um=8.0))
    assert (result.lineage["parent_track_id"] == 0).all()


def test_stage_drift_is_estimated_and_removed():
    # A grid of 16 objects (10 um apart) with small own motion, moved together by the
    # stage by 3.5 um per frame in a random direction (no persistence the velocity model
    # could learn). The gate (5 um, image coordinates) admits the moves; the costs only
    # accept them once the drift is removed.
    rng = np.random.default_rng(0)
    base = np.array([(y, x) for y in range(4) for x in range(4)], float) * 10.0
    angles = rng.uniform(0, 2 * np.pi, 6)
    steps = 3.5 * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    steps[0] = 0.0
    drift = np.cumsum(steps, axis=0)
    rows = []
    for t in range(6):
        pos = base + drift[t] + rng.normal(0, 0.2, base.shape)
        rows += [(t, float(p[0]), float(p[1])) for p in pos]
    cfg = TrackingConfig(max_displacement_um=5.0, divisions=False)
    result = track(points(rows), config=cfg)
    assert result.lineage.height == 16
    assert result.drift_zyx_um[:, 1:] == pytest.approx(drift, abs=0.3)
    fixed = track(points(rows), config=cfg.model_copy(update={"estimate_drift": False}))
    assert fixed.lineage.height > 16
    assert np.all(fixed.drift_zyx_um == 0)


def test_anisotropic_voxels_are_gated_in_physical_units():
    # One object moves one voxel along z per frame. With 2 um z voxels that is 2 um per
    # frame, beyond a 1.5 um gate; with 1 um voxels it is within it.
    labels = np.zeros((3, 6, 12, 12), np.uint8)
    for t in range(3):
        labels[t, t + 1, 4:8, 4:8] = 1
    cfg = TrackingConfig(max_displacement_um=1.5, max_gap_frames=0, divisions=False)
    aniso = track_labels(labels, voxel_size=VoxelSize(2.0, 0.5, 0.5), config=cfg)
    iso = track_labels(labels, voxel_size=VoxelSize(1.0, 0.5, 0.5), config=cfg)
    assert aniso.lineage.height == 3
    assert iso.lineage.height == 1
    assert aniso.detections["z_um"].to_list() == [2.0, 4.0, 6.0]


@pytest.mark.parametrize("two_d", [False, True])
def test_generator_sequence_with_divisions_is_tracked(two_d):
    extra = {"shape_zyx": (1, 96, 96), "voxel_size_um": (1.0, 0.3, 0.3)} if two_d else {}
    cfg = SynthConfig(
        **{
            "seed": 4,
            "timepoints": 8,
            "shape_zyx": (10, 96, 96),
            "voxel_size_um": (0.6, 0.3, 0.3),
            "n_cells": 5,
            "cell_radius_um": 4.0,
            "division_probability": 0.25,
            "enter_leave": False,
            "drift_um_per_frame": (0.0, 0.5, 0.5),
            "calibration_images": False,
            **extra,
        }
    )
    acq = synthesize(cfg)
    result = track_labels(acq.cells, voxel_size=acq.voxel_size)
    tracked = relabel_masks(acq.cells, result)
    # every ground-truth track maps to one track, and vice versa
    pairs = {(int(g), int(r)) for g, r in zip(acq.cells.ravel(), tracked.ravel(), strict=True) if g}
    assert len(pairs) == acq.lineage.height == result.lineage.height
    # the divisions are the ground truth's
    gt_div = acq.lineage.filter(pl.col("parent_label") > 0)
    ours = result.lineage.filter(pl.col("parent_track_id") > 0)
    to_ours = dict(pairs)
    assert gt_div.height > 0
    assert {
        (to_ours[int(c)], to_ours[int(p)])
        for c, p in gt_div.select("label", "parent_label").iter_rows()
    } == {(int(c), int(p)) for c, p in ours.select("track_id", "parent_track_id").iter_rows()}


# ---------------------------------------------------------------------------- outputs


def test_relabel_and_tracks_table():
    labels = np.zeros((2, 1, 20, 20), np.uint16)
    labels[0, 0, 2:5, 2:5] = 4
    labels[1, 0, 3:6, 2:5] = 9
    labels[1, 0, 15:18, 15:18] = 2
    result = track_labels(labels, voxel_size=UM, config=TrackingConfig(max_displacement_um=3.0))
    out = relabel_masks(labels, result)
    assert out.dtype == np.uint32 and out.shape == labels.shape
    assert out[0, 0, 3, 3] == out[1, 0, 4, 3] != out[1, 0, 16, 16]
    assert set(np.unique(relabel_frame(labels[1], result, 1))) == {0, 1, 2}
    table = tracks_table(result)
    assert list(table.schema) == list(TRACKS_TABLE_SCHEMA)
    assert table.height == 3 and table["volume_um3"].to_list()[0] == 9.0
    assert table.sort("track_id", "t").rows() == table.rows()


def test_track_jumps_and_division_problems_catch_bad_tables():
    tracks = pl.DataFrame(
        {
            "track_id": [1, 1, 1, 2],
            "t": [0, 1, 3, 4],
            "z_um": [0.0] * 4,
            "y_um": [0.0, 2.0, 5.0, 20.0],
            "x_um": [0.0] * 4,
        }
    )
    lineage = pl.DataFrame(
        {"track_id": [1, 2], "begin_t": [0, 4], "end_t": [3, 4], "parent_track_id": [0, 1]}
    )
    assert track_jumps(tracks, lineage, max_displacement_um=3.0)["t_to"].to_list() == [4]
    assert track_jumps(tracks, lineage, max_displacement_um=15.0).height == 0
    problems = division_problems(lineage)
    assert len(problems) == 1 and "1 daughter" in problems[0]
    ok = pl.DataFrame(
        {
            "track_id": [1, 2, 3],
            "begin_t": [0, 4, 4],
            "end_t": [3, 5, 5],
            "parent_track_id": [0, 1, 1],
        }
    )
    assert division_problems(ok) == []


def test_bad_detections_are_refused():
    with pytest.raises(InputError, match="lack"):
        track(pl.DataFrame({"t": [0], "y_um": [1.0]}))
    with pytest.raises(InputError, match="no detections"):
        track(
            pl.DataFrame(
                {"t": [], "y_um": [], "x_um": []},
                schema={"t": pl.Int32, "y_um": pl.Float64, "x_um": pl.Float64},
            )
        )
    with pytest.raises(InputError, match="NaN"):
        track(points([(0, float("nan"), 0.0)]), config=TrackingConfig(max_displacement_um=1.0))
    with pytest.raises(InputError, match="max_displacement_um"):
        track(points([(0, 0.0, 0.0)]))  # points carry no object size: the gate must be given
    with pytest.raises(InputError, match="integer"):
        track(pl.DataFrame({"t": [0.5], "y_um": [0.0], "x_um": [0.0]}))
    with pytest.raises(InputError, match="n_frames"):
        track(points([(3, 0.0, 0.0)]), config=TrackingConfig(max_displacement_um=1.0), n_frames=2)
    with pytest.raises(InputError, match="shape"):
        detections_from_labels(
            [np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)], voxel_size=UM
        )


def test_track_labels_counts_trailing_empty_frames():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0, 2:4, 2:4] = 1
    labels[1, 2:4, 3:5] = 1
    result = track_labels(
        iter(list(labels)), voxel_size=UM, config=TrackingConfig(max_displacement_um=2.0)
    )
    assert result.drift_zyx_um.shape == (4, 3)  # frames 2 and 3 are empty but counted
    assert result.lineage.height == 1
    with pytest.raises(InputError, match="empty"):
        track_labels(np.zeros((3, 8, 8), np.uint8), voxel_size=UM)


def test_division_volume_cost_at_the_border():
    from cellrna_pipeline.core.tracking.tracker import _division_volume_cost

    inside = (False, False, False)
    # alike daughters that add up: cheap anywhere
    assert _division_volume_cost(2.0, 1.0, 1.0, inside, 0.25) == pytest.approx(0.0)
    # a daughter mostly out of view (cut, 5 % of its sibling) while the other holds half
    # the parent: the asymmetry is the border's doing, only the sum counts
    cut = (True, True, True)
    assert _division_volume_cost(2.0, 1.0, 0.05, cut, 0.25) == pytest.approx(
        np.log(1.05 / 2.0) ** 2 / 0.25**2
    )
    # a sliver entering next to a cell that carries on at full volume is not let off
    sliver = _division_volume_cost(2.0, 1.95, 0.05, cut, 0.25)
    assert sliver > 10.0
    # inside the field the same asymmetry costs the full symmetry term (4x the weight
    # it has when only the parent is cut)
    full = _division_volume_cost(2.0, 1.0, 0.05, inside, 0.25)
    part = _division_volume_cost(2.0, 1.0, 0.05, (True, False, False), 0.25)
    total = np.log(1.05 / 2.0) ** 2 / 0.25**2
    assert full - total == pytest.approx(4 * (part - total))
