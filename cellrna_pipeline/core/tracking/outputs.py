"""Views of a :class:`TrackingResult`: relabelled masks, napari tracks, CTC tracks.

- :func:`relabel_frame` / :func:`relabel_masks`: label images whose ids are track ids.
- :func:`tracks_table`: the napari ``Tracks`` layer data (``track_id, t, z, y, x``) and
  :func:`napari_graph` its ``graph`` (daughter -> [parent]).
- :func:`ctc_tracks`: Cell Tracking Challenge labels: a track with missing frames is cut
  into pieces at each gap (the CTC format has no gaps), each piece the only "daughter" of
  the previous one.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.tracking.tracker import TrackingResult

__all__ = [
    "CTC_TRACKS_SCHEMA",
    "TRACKS_TABLE_SCHEMA",
    "ctc_tracks",
    "napari_graph",
    "relabel_frame",
    "relabel_masks",
    "tracks_table",
]

TRACKS_TABLE_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "track_id": pl.UInt32,
    "t": pl.Int32,
    "z": pl.Float64,
    "y": pl.Float64,
    "x": pl.Float64,
    "z_um": pl.Float64,
    "y_um": pl.Float64,
    "x_um": pl.Float64,
    "label": pl.UInt32,
    "volume_um3": pl.Float64,
}
"""napari-style tracks: ``z, y, x`` in voxels (point input without voxel columns: um);
``*_um`` in micrometres; ``label`` the object's id in the input mask of frame ``t``;
``volume_um3`` the object's volume (NaN for point input)."""

CTC_TRACKS_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "label": pl.UInt32,
    "begin_t": pl.Int32,
    "end_t": pl.Int32,
    "parent_label": pl.UInt32,
}
"""The CTC ``L B E P`` table (``res_track.txt``)."""


def _label_column(result: TrackingResult) -> pl.Series:
    if "label" not in result.detections.columns:
        raise InputError("the tracked detections have no 'label' column (point input)")
    return result.detections["label"]


def relabel_frame(labels: np.ndarray, result: TrackingResult, t: int) -> np.ndarray:
    """The label image of frame ``t`` with every object's id replaced by its track id.

    Parameters
    ----------
    labels : the integer label image ``(z, y, x)`` or ``(y, x)`` that was measured for frame
        ``t`` (its ids are the detections' ``label``).
    result : the tracking result.
    t : frame index.

    Returns
    -------
    np.ndarray of the same shape, uint32 track ids (0 = background; labels without a
    detection become 0).
    """
    _label_column(result)
    rows = result.detections.filter(pl.col("t") == t)
    return _map_labels(
        labels, rows["label"].to_numpy(), rows["track_id"].to_numpy(), what=f"frame {t}"
    )


def _map_labels(labels: np.ndarray, src: np.ndarray, dst: np.ndarray, *, what: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.dtype.kind not in "ui":
        raise InputError(f"{what}: labels must be integers, got {lab.dtype}")
    top = int(lab.max(initial=0))
    lut = np.zeros(max(top, int(src.max(initial=0))) + 1, dtype=np.uint32)
    lut[src.astype(np.int64)] = dst
    return lut[lab]


def relabel_masks(labels_tzyx: np.ndarray, result: TrackingResult) -> np.ndarray:
    """:func:`relabel_frame` for every frame of a ``(t, z, y, x)`` or ``(t, y, x)`` array."""
    return np.stack([relabel_frame(frame, result, t) for t, frame in enumerate(labels_tzyx)])


def tracks_table(result: TrackingResult) -> pl.DataFrame:
    """napari-compatible tracks: one row per detection, sorted by ``track_id`` then ``t``.

    Returns
    -------
    polars.DataFrame with :data:`TRACKS_TABLE_SCHEMA`. ``df.select("track_id", "t", "z",
    "y", "x").to_numpy()`` is the data of a napari Tracks layer (``scale`` = voxel size),
    or of a 2D+t layer without ``z``.
    """
    det = result.detections
    cols = {}
    for axis in ("z", "y", "x"):
        um = det[f"{axis}_um"] if f"{axis}_um" in det.columns else pl.Series(np.zeros(det.height))
        cols[f"{axis}_um"] = um.cast(pl.Float64)
        cols[axis] = (det[axis] if axis in det.columns else um).cast(pl.Float64)
    label = det["label"] if "label" in det.columns else pl.Series(np.zeros(det.height, np.uint32))
    volume = (
        det["volume_um3"] if "volume_um3" in det.columns else pl.Series(np.full(det.height, np.nan))
    )
    out = pl.DataFrame(
        {
            "track_id": det["track_id"],
            "t": det["t"].cast(pl.Int32),
            **{k: cols[k] for k in ("z", "y", "x", "z_um", "y_um", "x_um")},
            "label": label.cast(pl.UInt32),
            "volume_um3": volume.cast(pl.Float64),
        },
        schema=TRACKS_TABLE_SCHEMA,
    )
    return out.sort("track_id", "t")


def napari_graph(result: TrackingResult) -> dict[int, list[int]]:
    """The napari Tracks ``graph``: ``{daughter_track_id: [parent_track_id]}``."""
    rows = result.lineage.filter(pl.col("parent_track_id") > 0)
    return {
        int(c): [int(p)]
        for c, p in zip(rows["track_id"].to_list(), rows["parent_track_id"].to_list(), strict=True)
    }


def ctc_tracks(result: TrackingResult) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cell Tracking Challenge labels for a tracking result.

    Returns
    -------
    (assignment, tracks) :
        ``assignment``: one row per detection, ``t`` (i32), ``label`` (u32, the input mask
        id, when the detections have one), ``track_id`` (u32) and ``ctc_label`` (u32, >= 1):
        the id to write into ``mask<t>.tif``.
        ``tracks``: :data:`CTC_TRACKS_SCHEMA`, one row per CTC track, sorted by label. A
        gap-closed track becomes several CTC tracks (each piece's parent is the piece
        before the gap); daughters of a division have the parent's last piece as parent.
    """
    det = result.detections.select(
        [c for c in ("t", "label", "track_id") if c in result.detections.columns]
    ).with_row_index("_row")
    ordered = det.sort("track_id", "t")
    tid = ordered["track_id"].to_numpy().astype(np.int64)
    t = ordered["t"].to_numpy().astype(np.int64)
    new_piece = np.ones(len(tid), bool)
    new_piece[1:] = (tid[1:] != tid[:-1]) | (t[1:] - t[:-1] > 1)
    piece = np.cumsum(new_piece) - 1  # 0-based piece id, ordered by (track, time)
    n_pieces = int(piece[-1]) + 1 if len(piece) else 0
    first = np.flatnonzero(new_piece)
    last = np.r_[first[1:] - 1, len(tid) - 1] if n_pieces else first
    piece_track = tid[first]
    begin, end = t[first], t[last]
    # Parent of each piece: the previous piece of the same track, else (the first piece of
    # a daughter track) the last piece of the parent track.
    parent_piece = np.full(n_pieces, -1, np.int64)
    same = np.r_[False, piece_track[1:] == piece_track[:-1]]
    parent_piece[same] = np.flatnonzero(same) - 1
    last_piece_of_track = {int(tr): int(p) for p, tr in enumerate(piece_track)}  # last wins
    parents = dict(
        zip(
            result.lineage["track_id"].to_list(),
            result.lineage["parent_track_id"].to_list(),
            strict=True,
        )
    )
    for p in np.flatnonzero(~same):
        par = parents.get(int(piece_track[p]), 0)
        if par:
            parent_piece[p] = last_piece_of_track[par]
    labels = np.arange(1, n_pieces + 1, dtype=np.uint32)
    tracks = pl.DataFrame(
        {
            "label": labels,
            "begin_t": begin.astype(np.int32),
            "end_t": end.astype(np.int32),
            "parent_label": np.where(parent_piece >= 0, parent_piece + 1, 0).astype(np.uint32),
        },
        schema=CTC_TRACKS_SCHEMA,
    )
    assignment = (
        ordered.with_columns(pl.Series("ctc_label", labels[piece], dtype=pl.UInt32))
        .sort("_row")
        .drop("_row")
    )
    return assignment, tracks
