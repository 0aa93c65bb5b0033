"""``cellrna view EXPERIMENT``: open napari with the image, labels, spots and tracks."""

from __future__ import annotations

import argparse
from typing import Any

from cellrna_pipeline.core.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "view", help="open an experiment in napari (needs the 'view' extra and a display)"
    )
    p.add_argument("experiment")
    p.add_argument("--home", help="data root (default: $CELLRNA_HOME, else ./cellrna_home)")
    p.set_defaults(func=run)


def napari_layers(home: str | None, experiment: str) -> list[tuple[Any, dict[str, Any], str]]:
    """The layers as napari's ``(data, kwargs, layer_type)`` tuples (lazy dask image,
    labels per timepoint stacked lazily, spots as points, tracks with their lineage graph).
    Coordinates are in voxels with the physical voxel size as ``scale``."""
    import polars as pl

    from cellrna_pipeline.core.experiment import load_experiment
    from cellrna_pipeline.core.io import list_labels, open_image, read_image_meta
    from cellrna_pipeline.core.paths import DataRoot
    from cellrna_pipeline.integrations.warehouse import conform, read_partitions

    root = DataRoot.from_env(home)
    load_experiment(root, experiment)  # InputError for an unknown experiment
    path = (
        root.processed(experiment) if root.processed(experiment).exists() else root.raw(experiment)
    )
    if not path.exists():
        raise InputError(
            f"experiment {experiment!r} has no stored image yet; run 'cellrna materialize'"
        )
    meta = read_image_meta(path)
    scale = (1.0, *meta.voxel_size.as_tuple())
    image = open_image(path)
    layers: list[tuple[Any, dict[str, Any], str]] = [
        (image[:, c], {"name": name, "scale": scale, "blending": "additive"}, "image")
        for c, name in enumerate(meta.channel_names)
    ]
    for name in list_labels(path):
        labels = open_image(path / "labels" / name)
        layers.append(
            (labels[:, 0], {"name": name, "scale": scale, "visible": name != "tracks"}, "labels")
        )
    spots = read_partitions(root, "spots", experiment)
    if spots.height:
        points = spots.select("timepoint", "z", "y", "x").to_numpy()
        layers.append(
            (
                points,
                {"name": "spots", "scale": scale, "size": 3, "face_color": "magenta"},
                "points",
            )
        )
    tracks = conform("tracks", read_partitions(root, "tracks", experiment), experiment)
    if tracks.height:
        vox = meta.voxel_size
        data = (
            tracks.select(
                "track_id",
                "timepoint",
                pl.col("centroid_z_um") / vox.z_um,
                pl.col("centroid_y_um") / vox.y_um,
                pl.col("centroid_x_um") / vox.x_um,
            )
            .sort("track_id", "timepoint")
            .to_numpy()
        )
        lineage = conform("lineage", read_partitions(root, "lineage", experiment), experiment)
        graph = {
            int(r["track_id"]): [int(r["parent_track_id"])]
            for r in lineage.iter_rows(named=True)
            if r["parent_track_id"]
        }
        layers.append((data, {"name": "tracks", "scale": scale, "graph": graph}, "tracks"))
    return layers


def run(args: argparse.Namespace) -> int:
    layers = napari_layers(args.home, args.experiment)
    try:
        import napari
    except ImportError:
        raise InputError(
            "napari is not installed: pip install -e '.[view]' (and run on a machine with a display)"
        ) from None
    viewer = napari.Viewer(title=f"cellrna: {args.experiment}")
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    napari.run()
    return 0
