"""``cellrna``: the command line. Heavy libraries are imported inside each command so that
``cellrna --help`` answers at once.

Exit codes: 0 success, 1 a run failed, 2 bad input (one line on stderr naming the problem).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cellrna_pipeline.core.errors import InputError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _progress(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _voxel_size(values: Sequence[float] | None):
    from cellrna_pipeline.core.types import VoxelSize

    return VoxelSize.from_nm(values) if values is not None else None


def _root(args: argparse.Namespace):
    from cellrna_pipeline.core.paths import DataRoot

    return DataRoot.from_env(getattr(args, "home", None))


def _instance(root):
    """The Dagster instance of a data root (``$CELLRNA_HOME/dagster``), created on first use."""
    from dagster import DagsterInstance

    home = root.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    template = Path(__file__).resolve().parents[1] / "dagster.yaml"
    if template.exists() and not (home / "dagster.yaml").exists():
        shutil.copyfile(template, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return DagsterInstance.get()


# --- commands ------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from cellrna_pipeline.core.io import atomic_dir
    from cellrna_pipeline.core.synth import SynthConfig, synthesize, write_acquisition

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty; choose a new folder")
    fields = {
        "seed": args.seed,
        "timepoints": args.timepoints,
        "shape_zyx": tuple(args.shape) if args.shape else None,
        "voxel_size_um": tuple(v / 1000 for v in args.voxel_size_nm)
        if args.voxel_size_nm
        else None,
        "n_cells": args.cells,
        "n_rna_channels": args.rna_channels,
        "snr": args.snr,
        "spots_per_cell": args.spots_per_cell,
        "division_probability": args.division_probability,
    }
    try:
        config = SynthConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise InputError(f"bad generator setting: {str(exc).splitlines()[-1].strip()}") from None
    start = time.perf_counter()
    _progress(f"synthesizing {config.timepoints} x {config.shape_zyx} (seed {config.seed})")
    acq = synthesize(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    with atomic_dir(out) as tmp:
        write_acquisition(acq, tmp)
    n_spots = acq.spot_table.height
    assert acq.image is not None
    print(
        f"wrote {out}: image {tuple(acq.image.shape)} (t,c,z,y,x) {acq.image.dtype}, "
        f"{len(acq.lineage)} tracks, {n_spots} spots, in {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cellrna_pipeline.core.paths import validate_experiment_name

    root = _root(args).ensure()
    validate_experiment_name(args.experiment)
    from cellrna_pipeline.defs.runner import ingest_experiment

    record, runs = ingest_experiment(
        _instance(root),
        root,
        args.experiment,
        Path(args.path),
        voxel_size=_voxel_size(args.voxel_size_nm),
        channel_names=args.channel_names,
        overwrite=args.overwrite,
        progress=_progress,
    )
    return _report_runs(runs, f"ingested {record.name} into {root.raw(record.name)}")


def cmd_materialize(args: argparse.Namespace) -> int:
    from cellrna_pipeline.core.experiment import list_experiments
    from cellrna_pipeline.defs.runner import materialize_experiment

    root = _root(args)
    experiments = [args.experiment] if args.experiment else list_experiments(root)
    if not experiments:
        raise InputError(f"no experiments registered under {root.home}; run 'cellrna ingest' first")
    select = [s.strip() for s in args.select.split(",") if s.strip()] if args.select else None
    instance = _instance(root)
    runs = []
    for experiment in experiments:
        timepoints = [args.timepoint] if args.timepoint is not None else None
        runs += materialize_experiment(
            instance, root, experiment, timepoints=timepoints, select=select, progress=_progress
        )
    return _report_runs(runs, f"materialized {', '.join(experiments)}")


def _report_runs(runs, ok_message: str) -> int:
    failed = [r for r in runs if not r.success]
    if failed:
        r = failed[0]
        if r.bad_input:
            raise InputError(r.error or "bad input")
        sys.stderr.write(
            f"cellrna: run {r.run_id[:8]} of {', '.join(r.assets)} [{r.partition_key}] failed: {r.error}\n"
        )
        return 1
    print(f"{ok_message} ({len(runs)} runs)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cellrna_pipeline.core.experiment import load_experiment
    from cellrna_pipeline.core.io import atomic_dir, timepoints_written
    from cellrna_pipeline.core.synth import SynthConfig, synthesize, write_acquisition
    from cellrna_pipeline.defs.partitions import parse_volume_key
    from cellrna_pipeline.defs.runner import materialize_experiment, tick_inbox_sensor

    start = time.perf_counter()
    root = _root(args)
    marker = root.home / ".cellrna-demo"
    if root.home.exists() and any(root.home.iterdir()):
        if not marker.exists():
            raise InputError(
                f"{root.home} holds data that the demo did not make; set CELLRNA_HOME (or --home) to a new folder"
            )
        shutil.rmtree(root.home)
    root.ensure()
    marker.write_text("made by cellrna demo; 'cellrna demo' may delete this folder\n")

    config = SynthConfig(seed=args.seed, timepoints=args.timepoints)
    _progress(
        f"synthesizing a {config.timepoints}-timepoint acquisition {config.shape_zyx} (seed {config.seed})"
    )
    acq = synthesize(config)
    with atomic_dir(root.inbox / "demo") as tmp:
        write_acquisition(acq, tmp)

    instance = _instance(root)
    _progress("ticking inbox_sensor")
    result = tick_inbox_sensor(instance, root)
    experiments = sorted(
        {parse_volume_key(r.partition_key)[0] for r in result.run_requests or [] if r.partition_key}
    )
    if not experiments:
        sys.stderr.write("cellrna: the inbox sensor found no complete acquisition\n")
        return 1
    runs = []
    for experiment in experiments:
        runs += materialize_experiment(instance, root, experiment, progress=_progress)
    if any(not r.success for r in runs):
        return _report_runs(runs, "")
    record = load_experiment(root, experiments[0])
    assets = sorted({a for r in runs for a in r.assets})
    print("\n== cellrna demo: summary ==")
    print(f"data root        {root.home}")
    print(
        f"experiment       {record.name}: {record.n_timepoints} timepoints, shape (c,z,y,x) "
        f"{record.shape_tczyx[1:]}, voxel {record.voxel_size_um} um, channels {', '.join(record.channel_names)}"
    )
    print(
        f"ground truth     {root.inbox / 'demo' / 'ground_truth'} ({len(acq.lineage)} tracks, {acq.spot_table.height} spots)"
    )
    print(f"assets           {', '.join(assets)} ({len(runs)} runs, all succeeded)")
    print(
        f"raw OME-Zarr     {root.raw(record.name)} (timepoints written: {len(timepoints_written(root.raw(record.name)))})"
    )
    from cellrna_pipeline.integrations.warehouse import query

    stats = query(
        root,
        "SELECT n_tracks, n_divisions, mean_cells, n_spots, mean_spots_per_cell, mean_nuclear_fraction "
        "FROM experiment_summary WHERE experiment = $experiment",
        {"experiment": record.name},
    )
    if stats.height:
        row = stats.row(0, named=True)
        print(
            f"warehouse (SQL)  {row['n_tracks']} tracks, {row['n_divisions']} divisions, "
            f"{row['mean_cells'] or 0:.1f} cells/timepoint, {row['n_spots']} spots in cells, "
            f"{row['mean_spots_per_cell'] or 0:.1f} per cell, nuclear fraction {row['mean_nuclear_fraction'] or 0:.2f}"
        )
    print(f'warehouse        {root.warehouse}   (cellrna sql "SELECT * FROM experiment_summary")')
    print(f"report           {root.reports / record.name / 'report.html'}")
    print(f"Dagster UI       CELLRNA_HOME={root.home} cellrna ui   (http://127.0.0.1:3000)")
    print(f"took             {time.perf_counter() - start:.1f} s")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be 1-65535, got {args.port}")
    root = _root(args).ensure()
    _instance(root)  # writes DAGSTER_HOME/dagster.yaml
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [
        str(dagster if dagster.exists() else "dagster"),
        "dev",
        "-m",
        "cellrna_pipeline.definitions",
        "-h",
        "127.0.0.1",
        "-p",
        str(args.port),
    ]
    env = {**os.environ, "CELLRNA_HOME": str(root.home), "DAGSTER_HOME": str(root.dagster_home)}
    _progress(
        f"Dagster UI on http://127.0.0.1:{args.port} (data root {root.home}); Ctrl-C stops it"
    )
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


# --- parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cellrna",
        description="cellrna-pipeline: 3D microscopy of cells and RNA, as Dagster assets.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def home_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--home", help="data root (default: $CELLRNA_HOME, else ./cellrna_home)")

    def voxel_arg(p: argparse.ArgumentParser, help: str) -> None:
        p.add_argument("--voxel-size-nm", nargs=3, type=float, metavar=("Z", "Y", "X"), help=help)

    p = sub.add_parser(
        "demo",
        help="synthesize an acquisition, ingest it, materialize every asset, print a summary",
    )
    home_arg(p)
    p.add_argument("--timepoints", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write a synthetic acquisition with ground truth")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument("--timepoints", type=int, required=True)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--shape", nargs=3, type=int, metavar=("Z", "Y", "X"), help="volume shape in voxels"
    )
    voxel_arg(p, "voxel size in nm (default 600 150 150)")
    p.add_argument("--cells", type=int, help="cells at t=0")
    p.add_argument("--rna-channels", type=int, choices=(1, 2))
    p.add_argument("--snr", type=float, help="spot peak / background noise std")
    p.add_argument("--spots-per-cell", type=float)
    p.add_argument("--division-probability", type=float, help="per cell per frame")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "ingest", help="register an acquisition as an experiment and copy it into OME-Zarr"
    )
    p.add_argument(
        "path", help="acquisition folder (with manifest.json), OME-TIFF/TIFF file, or OME-Zarr"
    )
    p.add_argument("--experiment", required=True, help="experiment name (letters, digits, _ . -)")
    voxel_arg(p, "voxel size in nm; overrides the file's metadata, required where it has none")
    p.add_argument(
        "--channel-names",
        nargs="+",
        metavar="NAME",
        help="one name per channel, overriding the file's (the pipeline reads 'nucleus', "
        "'cytoplasm' and 'rna0', 'rna1', ...)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an experiment of that name")
    home_arg(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("materialize", help="materialize assets of registered experiments")
    p.add_argument("--experiment", help="one experiment (default: all)")
    p.add_argument(
        "--timepoint", type=int, help="one timepoint of per-volume assets (default: all)"
    )
    p.add_argument("--select", help="comma-separated asset names (default: every asset)")
    home_arg(p)
    p.set_defaults(func=cmd_materialize)

    from cellrna_pipeline.commands import register_all

    register_all(sub)

    p = sub.add_parser("ui", help="the Dagster UI on 127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    home_arg(p)
    p.set_defaults(func=cmd_ui)
    return parser


def _quiet_libraries() -> None:
    """What reaches a user's terminal is ours: progress lines and one-line errors. MLflow's
    first-use notes (creating its database, a pickling advice about our own wrapper, a
    download bar per model) are not actionable; they stay out unless asked for
    (``MLFLOW_LOGGING_LEVEL=INFO``)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        sys.stderr.write(f"cellrna {args.command}: error: {exc}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("cellrna: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
