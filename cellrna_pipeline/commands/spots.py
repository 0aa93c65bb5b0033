"""``cellrna spots detect IMAGE.tif --voxel-size-nm Z Y X [--spot-radius-nm Z Y X]
[--method log|maskrcnn] --out spots.csv``: RNA spots of one 2-D or 3-D channel as CSV.

The CSV has one row per spot: ``z, y, x`` (voxels, sub-voxel; ``z`` = 0 for 2-D), then
``intensity`` (amplitude above the local background, image units), ``score`` (0-1) and
``size_voxels`` (voxels of the spot's instance mask). The image is opened with
:func:`~cellrna_pipeline.core.io.open_source` (TIFF family or OME-Zarr) and read region by
region as the detector asks for it, never whole.
"""

from __future__ import annotations

import argparse
import sys
import time

from cellrna_pipeline.core.errors import InputError

DEFAULT_METHOD = "log"  # the benchmark winner (docs/benchmarks/spots.md)
CSV_COLUMNS = ("z", "y", "x", "intensity", "score", "size_voxels")


def _progress(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("spots", help="RNA spot detection on a single-channel image")
    sub = p.add_subparsers(dest="spots_command", required=True, parser_class=type(p))
    d = sub.add_parser(
        "detect",
        help="detect spots in a 2-D (y,x) or 3-D (z,y,x) TIFF and write a CSV",
        description="Detect diffraction-limited RNA spots in one channel. CSV columns: "
        + ", ".join(CSV_COLUMNS)
        + " (z,y,x in voxels, sub-voxel; z = 0 for 2-D images).",
    )
    d.add_argument("image", help="TIFF with one channel: (z, y, x) or (y, x)")
    d.add_argument(
        "--voxel-size-nm",
        nargs=3,
        type=float,
        required=True,
        metavar=("Z", "Y", "X"),
        help="voxel size in nm (Z is ignored for 2-D images)",
    )
    d.add_argument(
        "--spot-radius-nm",
        nargs=3,
        type=float,
        metavar=("Z", "Y", "X"),
        help="spot (PSF) Gaussian sigma in nm (default 350 150 150: diffraction-limited)",
    )
    d.add_argument(
        "--method",
        choices=("log", "maskrcnn"),
        default=DEFAULT_METHOD,
        help=f"classical 3D LoG detector or the tiny-object Mask R-CNN (default {DEFAULT_METHOD})",
    )
    d.add_argument("--model-dir", help="Mask R-CNN model folder (default: the shipped champion)")
    d.add_argument(
        "--threshold-sigma",
        type=float,
        help="log only: fixed threshold in noise sigmas (default: automatic)",
    )
    d.add_argument("--out", required=True, help="output CSV path")
    d.set_defaults(func=cmd_detect)


def cmd_detect(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from cellrna_pipeline.core.io import atomic_path, open_source
    from cellrna_pipeline.core.spots.config import DEFAULT_SPOT_RADIUS_NM, SpotDetectionConfig
    from cellrna_pipeline.core.types import VoxelSize

    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file name such as spots.csv")
    if out.suffix.lower() != ".csv":
        raise InputError(f"--out must end with .csv, got {out.name!r}")
    voxel = VoxelSize.from_nm(args.voxel_size_nm)
    radius = tuple(args.spot_radius_nm) if args.spot_radius_nm else DEFAULT_SPOT_RADIUS_NM
    if args.spot_radius_nm is not None:
        SpotDetectionConfig(spot_radius_nm=radius)  # validates (one-line InputError)
    start = time.perf_counter()
    # The same loader as `cellrna cells segment` and ingestion: a lazy source whose
    # channel_array reads only the regions the detector asks for (never the whole file).
    with open_source(args.image, voxel_size=voxel) as source:
        n_t, n_c, *_ = source.meta.shape_tczyx
        if n_t > 1 or n_c > 1:
            raise InputError(
                f"{args.image}: expected one channel (z, y, x) or (y, x), got (t, c, z, y, x) "
                f"{source.meta.shape_tczyx}; split the time/channel axes first"
            )
        image = source.channel_array(0, 0)
        _progress(f"{args.image}: {image.shape} {image.dtype}, method {args.method}")
        if args.method == "log":
            from cellrna_pipeline.core.spots import detect_spots

            config = SpotDetectionConfig(
                spot_radius_nm=radius, threshold_sigma=args.threshold_sigma
            )
            result = detect_spots(image, voxel_size=voxel, config=config, progress=_progress)
        else:
            from cellrna_pipeline.core.spots.maskrcnn import (
                DEFAULT_MODEL_DIR,
                detect_spots_maskrcnn,
                load_spot_model,
            )

            model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL_DIR
            model = load_spot_model(model_dir)
            result = detect_spots_maskrcnn(
                image, model=model, voxel_size=voxel, spot_radius_nm=radius, progress=_progress
            )
    table = result.table.select(list(CSV_COLUMNS))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.write_csv(tmp, float_precision=4)
    n = table.height
    size = int(np.prod(image.shape))
    print(
        f"wrote {out}: {n} spots ({args.method}) in {time.perf_counter() - start:.1f} s "
        f"({size / 1e6:.1f} Mvoxels)"
    )
    return 0
