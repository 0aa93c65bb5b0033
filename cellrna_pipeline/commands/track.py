"""``cellrna track``: track cells given per-frame masks in the Cell Tracking Challenge format.

CTC in (``mask###.tif`` / ``man_seg###.tif`` / ``man_track###.tif``, one label image per
frame) -> CTC out (``mask###.tif`` relabelled by track + ``res_track.txt``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cellrna_pipeline.core.errors import InputError


def _progress(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "track",
        help="track cells in CTC masks; write CTC results (masks relabelled by track + res_track.txt)",
        description="Link the objects of per-frame label images (2D or 3D, CTC format) into "
        "tracks with divisions and write a CTC result folder.",
    )
    p.add_argument(
        "--ctc-masks",
        required=True,
        metavar="DIR",
        help="folder with one label image per frame: mask000.tif, ... (or man_seg/man_track)",
    )
    p.add_argument(
        "--out", required=True, metavar="RES_DIR", help="result folder (new, empty or a CTC result)"
    )
    p.add_argument(
        "--image-dir",
        metavar="DIR",
        help="raw images t000.tif, ... of the same frames: adds the mean-intensity cue",
    )
    p.add_argument(
        "--voxel-size-nm",
        nargs=3,
        type=float,
        metavar=("Z", "Y", "X"),
        help="voxel size in nm (default: 1000 1000 1000, i.e. distances in pixels)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import polars as pl

    from cellrna_pipeline.core.io.ctc import (
        list_ctc_frames,
        list_ctc_images,
        read_ctc_image,
        write_ctc_result,
    )
    from cellrna_pipeline.core.tracking import (
        TrackingConfig,
        ctc_tracks,
        measure_objects,
        track,
    )
    from cellrna_pipeline.core.types import VoxelSize

    start = time.perf_counter()
    masks_dir = Path(args.ctc_masks)
    out = Path(args.out)
    frames = list_ctc_frames(masks_dir)
    if out.exists() and out.resolve() == masks_dir.resolve():
        raise InputError(f"--out {out} is the input folder; choose another folder")
    voxel_size = (
        VoxelSize.from_nm(args.voxel_size_nm)
        if args.voxel_size_nm is not None
        else VoxelSize(1.0, 1.0, 1.0)
    )
    images = None
    if args.image_dir:
        images = list_ctc_images(args.image_dir)
        missing = [t for t in frames.frames if t not in images]
        if missing:
            raise InputError(
                f"{args.image_dir}: no image t{missing[0]:03d}.tif for mask frame {missing[0]}"
            )
    n_frames = len(frames.frames)
    if args.voxel_size_nm is None:
        _progress("no --voxel-size-nm: distances are in pixels (1 px = 1 um)")
    _progress(f"measuring objects in {n_frames} frames of {masks_dir} ({frames.kind} files)")
    tables = []
    shape = None
    for t in frames.frames:
        labels = frames.read(t)
        if shape is not None and labels.shape != shape:
            raise InputError(f"{frames.paths[t]}: shape {labels.shape}, frame 0 has {shape}")
        shape = labels.shape
        intensity = None
        if images is not None:
            intensity = read_ctc_image(images[t])
            if intensity.shape != labels.shape:
                raise InputError(
                    f"{images[t]}: shape {intensity.shape} differs from the mask {labels.shape}"
                )
        tables.append(measure_objects(labels, voxel_size=voxel_size, intensity=intensity, t=t))
    detections = pl.concat(tables)
    if detections.height == 0:
        raise InputError(f"{masks_dir}: every mask is empty; nothing to track")
    config = TrackingConfig(intensity_log_sigma=0.3 if images is not None else None)
    result = track(detections, config=config, n_frames=n_frames)
    assignment, tracks = ctc_tracks(result)
    n_div = int((result.lineage["parent_track_id"] > 0).sum()) // 2
    _progress(
        f"{detections.height} objects -> {result.lineage.height} tracks, {n_div} divisions "
        f"(gate {result.max_displacement_um:.2f} um/frame); writing {out}"
    )

    def relabelled():
        for t in frames.frames:
            labels = frames.read(t)
            rows = assignment.filter(pl.col("t") == t)
            lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.uint32)
            lut[rows["label"].to_numpy().astype(np.int64)] = rows["ctc_label"].to_numpy()
            yield lut[labels]

    write_ctc_result(out, relabelled(), tracks, n_frames=n_frames)
    print(
        f"wrote {out}: {n_frames} masks + res_track.txt ({tracks.height} CTC tracks, "
        f"{n_div} divisions) in {time.perf_counter() - start:.1f} s"
    )
    return 0
