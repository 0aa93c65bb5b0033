"""Spot tracking (live-RNA): the appearance term, track_spots, the spot embedding."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.synth import live_rna_config, synthesize
from cellrna_pipeline.core.tracking import (
    SPOT_TRACKS_SCHEMA,
    SpotEmbeddingConfig,
    TrackingConfig,
    spot_tracking_config,
    track,
    track_spots,
)
from cellrna_pipeline.core.tracking.embedding import (
    DEFAULT_EMBEDDING_DIR,
    build_embedding_net,
    extract_patches,
    load_spot_embedder,
)


@pytest.fixture(scope="module")
def live():
    return synthesize(
        live_rna_config(
            seed=3,
            timepoints=6,
            shape_zyx=(10, 96, 96),
            voxel_size_um=(0.6, 0.2, 0.2),
            n_cells=4,
            cell_radius_um=4.0,
            n_rna_channels=2,
            enter_leave=False,
            calibration_images=False,
        )
    )


def _link_accuracy(truth: pl.DataFrame, tracks: pl.DataFrame) -> float:
    """Share of true (t, t+1) links of one spot that the tracks reproduce."""
    d = truth.join(
        tracks.select("channel", "t", "spot_id", pl.col("track_id").alias("ours")),
        left_on=["channel", "timepoint", "spot_id"],
        right_on=["channel", "t", "spot_id"],
    ).sort("channel", "track_id", "timepoint")
    same_truth = (d["track_id"][1:] == d["track_id"][:-1]).to_numpy() & (
        (d["timepoint"][1:] - d["timepoint"][:-1]) == 1
    ).to_numpy()
    same_ours = (d["ours"][1:] == d["ours"][:-1]).to_numpy()
    return float((same_truth & same_ours).sum() / same_truth.sum())


def test_appearance_term_resolves_an_ambiguous_swap():
    # Two points swap places between frames (each moves 0.6 um towards the other): position
    # alone links each to the nearer point; distinct embeddings keep the identities.
    frame = pl.DataFrame(
        {
            "t": [0, 0, 1, 1],
            "y_um": [0.0, 0.0, 0.0, 0.0],
            "x_um": [0.0, 1.0, 0.6, 0.4],
            "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]],
        }
    ).with_columns(pl.col("t").cast(pl.Int32))
    cfg = TrackingConfig(
        max_displacement_um=2.0, motion_sigma_um=0.3, position_sigma_um=0.1, divisions=False
    )
    position_only = track(frame.drop("embedding"), config=cfg).detections["track_id"].to_list()
    assert position_only[0] == position_only[3]  # the nearer one: wrong
    with_appearance = track(frame, config=cfg.model_copy(update={"appearance_sigma": 0.3}))
    ids = with_appearance.detections["track_id"].to_list()
    assert ids[0] == ids[2] and ids[1] == ids[3]


def test_appearance_sigma_needs_embeddings_and_valid_vectors():
    frame = pl.DataFrame({"t": [0, 1], "y_um": [0.0, 0.1], "x_um": [0.0, 0.0]})
    cfg = TrackingConfig(max_displacement_um=1.0, appearance_sigma=0.3)
    with pytest.raises(InputError, match="embedding"):
        track(frame.with_columns(pl.col("t").cast(pl.Int32)), config=cfg)
    bad = frame.with_columns(
        pl.col("t").cast(pl.Int32), pl.Series("embedding", [[1.0, 0.0], [float("nan"), 1.0]])
    )
    with pytest.raises(InputError, match="embedding"):
        track(bad, config=cfg)
    with pytest.raises(InputError, match="appearance_sigma"):
        TrackingConfig(appearance_sigma=0.0)


def test_track_spots_on_live_ground_truth(live):
    truth = live.spot_table
    tracks = track_spots(truth, n_frames=live.cells.shape[0])
    assert tracks.drop("embedding", strict=False).schema == pl.Schema(SPOT_TRACKS_SCHEMA)
    assert tracks.height == truth.height
    # channels are tracked apart; ids are unique over channels
    per = tracks.group_by("track_id").agg(pl.col("channel").n_unique())
    assert (per["channel"] == 1).all()
    assert set(tracks["channel"].unique()) == {"rna0", "rna1"}
    assert _link_accuracy(truth, tracks) > 0.9
    # z, y, x are voxels; *_um micrometres
    row = tracks.row(0, named=True)
    assert row["y_um"] == pytest.approx(row["y"] * 0.2)


def test_track_spots_refuses_bad_settings(live):
    with pytest.raises(InputError, match="divide"):
        track_spots(live.spot_table, config=spot_tracking_config(divisions=True))
    with pytest.raises(InputError, match="max_displacement_um"):
        track_spots(live.spot_table, config=spot_tracking_config(max_displacement_um=None))
    with pytest.raises(InputError, match="no spots"):
        track_spots(live.spot_table.clear())
    with pytest.raises(InputError, match="timepoint"):
        track_spots(live.spot_table.drop("timepoint"))


def test_extract_patches_are_normalised_and_centred():
    vol = np.full((5, 20, 20), 100.0, np.float32)
    vol[2, 10, 10] = 300.0
    vol[2, 3, 15] = 200.0
    patches = extract_patches(vol, np.array([[2.0, 10.2, 9.8], [2.0, 3.0, 15.0]]), (3, 5, 5))
    assert patches.shape == (2, 3, 5, 5) and patches.dtype == np.float32
    # background 0; the median spot peak (150 above background) is 1
    assert patches[0, 1, 2, 2] == pytest.approx(200 / 150)
    assert patches[1, 1, 2, 2] == pytest.approx(100 / 150)
    assert patches[0, 0, 0, 0] == 0.0
    # near the border the edge value is repeated
    edge = extract_patches(vol, np.array([[0.0, 0.0, 0.0]]), (3, 5, 5))
    assert np.isfinite(edge).all()
    with pytest.raises(InputError):
        extract_patches(vol, np.array([[np.nan, 0.0, 0.0]]), (3, 5, 5))


def test_embedding_net_gives_unit_vectors():
    import torch

    config = SpotEmbeddingConfig(dim=8)
    net = build_embedding_net(config)
    out = net(torch.randn(4, 1, *config.patch_zyx))
    assert out.shape == (4, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.skipif(
    not (DEFAULT_EMBEDDING_DIR / "weights.pt").exists(), reason="no shipped spot embedding"
)
def test_shipped_embedding_tells_spots_apart(live):
    embedder = load_spot_embedder(device="cpu")
    assert embedder.config.dim > 0 and 0 < embedder.config.appearance_sigma < 2
    truth = live.spot_table.filter(pl.col("channel") == "rna0")
    same, other = [], []
    for t in range(live.cells.shape[0] - 1):
        a = truth.filter(pl.col("timepoint") == t)
        b = truth.filter(pl.col("timepoint") == t + 1)
        ea = embedder.embed(live.image[t, 2], a.select("z", "y", "x").to_numpy())
        eb = embedder.embed(live.image[t + 1, 2], b.select("z", "y", "x").to_numpy())
        assert np.allclose(np.linalg.norm(ea, axis=1), 1.0, atol=1e-4)
        d = ((ea[:, None, :] - eb[None, :, :]) ** 2).sum(axis=2)
        match = a["track_id"].to_numpy()[:, None] == b["track_id"].to_numpy()[None, :]
        same.append(d[match])
        other.append(d[~match])
    assert np.median(np.concatenate(same)) < 0.5 * np.median(np.concatenate(other))
