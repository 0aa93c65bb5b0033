"""``cellrna cells segment IMAGE.tif --out DIR``: cell and nucleus instance masks.

Writes ``DIR/nuclei.tif``, ``DIR/cells.tif`` (instance ids, the input's shape without its
channel axis) and ``DIR/semantic.tif`` (0 background, 1 nucleus, 2 cytoplasm).
"""

from __future__ import annotations

import argparse
import sys
import time

from cellrna_pipeline.core.errors import InputError


def _channel(value: str) -> int | None:
    if value.lower() in ("none", "-1", ""):
        return None
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"channel must be an index or 'none', got {value!r}"
        ) from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"channel must be >= 0 or 'none', got {index}")
    return index


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cells", help="cell and nucleus segmentation")
    sub = p.add_subparsers(dest="cells_command", required=True, parser_class=type(p))
    s = sub.add_parser(
        "segment",
        help="segment cells and nuclei in a 2D/3D TIFF (writes DIR/nuclei.tif, DIR/cells.tif)",
        description="Segment cells and nuclei. IMAGE: a TIFF/OME-TIFF with a nucleus stain and/or "
        "a cell (cytoplasm/membrane) stain, 2D or 3D, any integer or float dtype. Without a voxel "
        "size the object scale is estimated from the image (nuclei of ~10-100 px); "
        "--diameter-px overrides it. Without a cell stain every cell is its nucleus.",
    )
    s.add_argument("image", help="input TIFF (axes from its metadata; a plain 3D TIFF is z, y, x)")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument(
        "--nucleus-channel",
        type=_channel,
        default=0,
        help="nucleus stain channel index, or 'none' (default 0)",
    )
    s.add_argument(
        "--cell-channel",
        type=_channel,
        default=None,
        help="cell stain channel index, or 'none' (default: 1 if the image has >= 2 channels)",
    )
    s.add_argument(
        "--voxel-size-nm",
        nargs=3,
        type=float,
        metavar=("Z", "Y", "X"),
        help="voxel size in nm (overrides the file)",
    )
    s.add_argument(
        "--diameter-px",
        type=float,
        help="typical nucleus diameter in pixels (cell diameter without a nucleus stain)",
    )
    s.add_argument("--method", choices=("maskrcnn", "classical"), default="maskrcnn")
    s.add_argument(
        "--model", help="a model folder (default: the registry's champion, else the shipped model)"
    )
    s.add_argument(
        "--home", help="data root whose MLflow registry holds the champion (default: $CELLRNA_HOME)"
    )
    s.set_defaults(func=run_segment)


def _progress(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def load_cell_model(model: str | None, home: str | None):
    """The cell Mask R-CNN and a description of where it came from.

    ``model`` (a folder) wins; else the champion of the data root's registry when that
    registry exists; else the folder shipped in ``model_registry/`` (nothing is written).
    """
    from pathlib import Path

    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.core.segmentation.model import load_model_folder

    if model:
        return load_model_folder(model), f"folder {model}"
    root = DataRoot.from_env(home)
    if (root.mlruns / "mlflow.db").exists():
        from cellrna_pipeline.integrations.mlflow_registry import CELL_MODEL, MlflowRegistry

        loaded = MlflowRegistry.for_data_root(root).load_model_folder(CELL_MODEL)
        return load_model_folder(loaded.path), f"{CELL_MODEL} v{loaded.version.version} (champion)"
    from cellrna_pipeline.integrations.mlflow_registry import CELL_MODEL, shipped_model_folder

    folder = shipped_model_folder(CELL_MODEL)
    return load_model_folder(folder), f"shipped {Path(folder).name}"


def run_segment(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import tifffile

    from cellrna_pipeline.core.io import atomic_path, open_source
    from cellrna_pipeline.core.segmentation import CellSegmentationConfig, segment_cells
    from cellrna_pipeline.core.types import VoxelSize

    if args.diameter_px is not None and not args.diameter_px > 0:
        raise InputError(f"--diameter-px must be positive, got {args.diameter_px}")
    voxel = VoxelSize.from_nm(args.voxel_size_nm) if args.voxel_size_nm else None
    # The same loader as `cellrna spots detect` and ingestion; without a voxel size (given
    # or in the file) the object scale is estimated from the image instead.
    with open_source(args.image, voxel_size=voxel, voxel_size_required=False) as source:
        meta = source.meta
        voxel_known = bool(meta.extra["voxel_size_known"])
        t_n, c_n, z_n, _, _ = meta.shape_tczyx
        nuc_c = args.nucleus_channel
        cell_c = (
            args.cell_channel
            if args.cell_channel is not None
            else (1 if c_n >= 2 and nuc_c != 1 else None)
        )
        if args.cell_channel is None and c_n >= 2 and nuc_c == 1:
            cell_c = 0
        for name, c in (("--nucleus-channel", nuc_c), ("--cell-channel", cell_c)):
            if c is not None and c >= c_n:
                raise InputError(f"{name} {c} is out of range: {args.image} has {c_n} channel(s)")
        if nuc_c is None and cell_c is None:
            raise InputError("no stain chosen: give --nucleus-channel or --cell-channel")
        if nuc_c is not None and nuc_c == cell_c:
            raise InputError(f"--nucleus-channel and --cell-channel are both {nuc_c}")
        model = None
        if args.method == "maskrcnn":
            model, origin = load_cell_model(args.model, args.home)
            _progress(f"model: {origin}")
        config = CellSegmentationConfig(method=args.method, diameter_px=args.diameter_px)
        results = []
        for t in range(t_n):
            volume = source.read_timepoint(t)
            seg = segment_cells(
                volume[nuc_c] if nuc_c is not None else None,
                volume[cell_c] if cell_c is not None else None,
                voxel_size=meta.voxel_size if voxel_known else None,
                config=config,
                model=model,
                progress=None,
            )
            _progress(
                f"t={t}: {seg.n_cells} cells, diameter {seg.info.get('diameter_px')} px "
                f"({seg.info.get('diameter_source')}), {seg.info.get('seconds')} s"
            )
            results.append(seg)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    axes = str(meta.extra.get("axes", "")).upper()
    keep_t = t_n > 1
    keep_z = z_n > 1 or "Z" in axes.replace("S", "")
    for name in ("nuclei", "cells", "semantic"):
        stack = np.stack([getattr(r, name) for r in results])  # (t, z, y, x)
        if not keep_z:
            stack = stack[:, 0]
        if not keep_t:
            stack = stack[0]
        if name != "semantic":
            stack = stack.astype(np.uint16 if stack.max(initial=0) < 2**16 else np.uint32)
        with atomic_path(out / f"{name}.tif") as tmp:
            tifffile.imwrite(
                tmp,
                stack,
                compression="zlib",
                metadata={"axes": ("T" if keep_t else "") + ("Z" if keep_z else "") + "YX"},
            )
    n = sum(r.n_cells for r in results)
    print(
        f"wrote {out / 'nuclei.tif'} and {out / 'cells.tif'}: {n} cells in {t_n} timepoint(s), method {args.method}"
    )
    return 0
