"""Run assets in-process, stage by stage, for the command line and the demo.

The Dagster daemon (``cellrna ui``) runs the same definitions through the sensor and the
queued run coordinator; this module is the synchronous path: it ticks the inbox sensor
once, applies its partition requests, and materializes selected assets partition by
partition in topological order, each partition its own Dagster run in the instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AssetsDefinition,
    DagsterInstance,
    SensorResult,
    build_sensor_context,
    materialize,
)

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.experiment import (
    ExperimentRecord,
    experiment_data_paths,
    load_experiment,
    register_experiment,
)
from cellrna_pipeline.core.io import all_or_nothing
from cellrna_pipeline.core.paths import DataRoot, validate_experiment_name
from cellrna_pipeline.core.types import VoxelSize
from cellrna_pipeline.defs import ASSETS, CHECKS, TRAINING_ASSETS, resources
from cellrna_pipeline.defs.partitions import (
    EXPERIMENTS,
    VOLUMES,
    experiments_partitions,
    volume_key,
    volumes_partitions,
)
from cellrna_pipeline.defs.resources import DataRootResource
from cellrna_pipeline.defs.sensors import inbox_sensor


@dataclass(frozen=True)
class RunSummary:
    """One in-process run: which assets, which partition, whether it succeeded."""

    assets: tuple[str, ...]
    partition_key: str | None
    success: bool
    run_id: str
    error: str | None = None
    bad_input: bool = False
    """The run failed on an :class:`InputError` (bad data, not a bug)."""


def register_partitions(instance: DagsterInstance, experiment: str, n_timepoints: int) -> None:
    """Add the experiment and its volume partitions (idempotent)."""
    instance.add_dynamic_partitions(EXPERIMENTS, [experiment])
    keys = [volume_key(experiment, t) for t in range(n_timepoints)]
    instance.add_dynamic_partitions(VOLUMES, keys)


def tick_inbox_sensor(
    instance: DagsterInstance, root: DataRoot, cursor: str | None = None
) -> SensorResult:
    """Evaluate ``inbox_sensor`` once and apply its dynamic-partition requests."""
    context = build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"data_root": DataRootResource(home=str(root.home))},
    )
    result = inbox_sensor(context)
    if not isinstance(result, SensorResult):
        return SensorResult(run_requests=[], cursor=cursor)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _failure(result) -> tuple[str, bool]:
    """(one-line message, is it an InputError) of a failed in-process run."""
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None:  # Dagster wraps user errors; the cause holds ours
            if error.cls_name == "InputError":
                return error.message.split(": ", 1)[-1].strip(), True
            last = error
            error = error.cause
        return last.message.strip().splitlines()[-1], False
    return "run failed", False


def _name(asset: AssetsDefinition) -> str:
    """The user-facing name: the asset key, or the op name of a multi-asset."""
    return asset.key.to_user_string() if len(asset.keys) == 1 else asset.node_def.name


def _stages(select: Sequence[str] | None) -> list[list[AssetsDefinition]]:
    """Selected assets in topological order, grouped into runs of one partitions definition.

    ``select`` names assets (``raw_volume``) or multi-assets (``statistics_tables``); by
    default every asset but the training ones.
    """
    known = {_name(a): a for a in ASSETS}
    if select:
        unknown = sorted(set(select) - set(known))
        if unknown:
            raise InputError(f"unknown asset(s) {unknown}; known: {sorted(known)}")
    chosen = [a for a in ASSETS if (_name(a) in select if select else a not in TRAINING_ASSETS)]
    stages: list[list[AssetsDefinition]] = []
    for asset in chosen:  # ASSETS is kept in topological order
        if stages and stages[-1][0].partitions_def == asset.partitions_def:
            stages[-1].append(asset)
        else:
            stages.append([asset])
    return stages


def _check_channels(record: ExperimentRecord, stages: list[list[AssetsDefinition]]) -> None:
    """:class:`InputError` before any run if a selected asset lacks a channel it reads, so
    that a missing channel fails at once rather than after the stages before it."""
    names = {_name(a) for stage in stages for a in stage}
    channels = list(record.channel_names)
    fix = "name the channels at ingestion: cellrna ingest ... --channel-names nucleus cytoplasm rna0 --overwrite"
    if "cell_masks" in names and "nucleus" not in channels:
        raise InputError(
            f"experiment {record.name!r} has no channel 'nucleus' (channels: {channels}), "
            f"which cell_masks needs; {fix}"
        )
    if "rna_spots" in names and not any(c.startswith("rna") for c in channels):
        raise InputError(
            f"experiment {record.name!r} has no channel 'rna0' (channels: {channels}), "
            f"which rna_spots needs; {fix}"
        )


def materialize_experiment(
    instance: DagsterInstance,
    root: DataRoot,
    experiment: str,
    *,
    timepoints: Sequence[int] | None = None,
    select: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    log_level: str = "CRITICAL",
) -> list[RunSummary]:
    """Materialize the selected assets (all by default) of one experiment.

    Volume-partitioned assets run once per timepoint (all, or ``timepoints``);
    experiment-partitioned assets once. Dagster's console log is shown from ``log_level``
    on (the full event log is in the instance either way). Raises :class:`InputError` for an unknown
    experiment, timepoint or asset; stops at the first failed run.
    """
    record = load_experiment(root, experiment)
    all_t = range(record.n_timepoints)
    chosen = list(all_t) if timepoints is None else list(timepoints)
    for t in chosen:
        if t not in all_t:
            raise InputError(
                f"experiment {experiment!r} has timepoints 0-{record.n_timepoints - 1}, not {t}"
            )
    stages = _stages(select)
    _check_channels(record, stages)
    register_partitions(instance, experiment, record.n_timepoints)
    run_resources = resources(str(root.home))
    summaries: list[RunSummary] = []
    for stage in stages:
        pdef = stage[0].partitions_def
        if pdef == volumes_partitions:
            keys: list[str | None] = [volume_key(experiment, t) for t in chosen]
        elif pdef == experiments_partitions:
            keys = [experiment]
        else:
            keys = [None]
        names = tuple(_name(a) for a in stage)
        stage_keys = {k for a in stage for k in a.keys}
        checks = [c for c in CHECKS if any(k.asset_key in stage_keys for k in c.check_keys)]
        for i, key in enumerate(keys, 1):
            progress(f"{', '.join(names)} [{key or 'unpartitioned'}] ({i}/{len(keys)})")
            result = materialize(
                [*ASSETS, *checks],
                selection=[*stage, *checks],
                partition_key=key,
                instance=instance,
                resources=run_resources,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            )
            error, bad_input = None, False
            if not result.success:
                error, bad_input = _failure(result)
            summaries.append(
                RunSummary(names, key, result.success, result.run_id, error, bad_input)
            )
            if not result.success:
                return summaries
    return summaries


class _RunFailed(Exception):
    def __init__(self, runs: list[RunSummary]) -> None:
        self.runs = runs


def ingest_experiment(
    instance: DagsterInstance,
    root: DataRoot,
    name: str,
    source: Path,
    *,
    voxel_size: VoxelSize | None = None,
    channel_names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[ExperimentRecord, list[RunSummary]]:
    """Register an acquisition and copy every timepoint into OME-Zarr (``raw_volume``);
    all or nothing.

    A new experiment that fails (bad data found while copying) leaves nothing behind: no
    record, no image, no partitions. With ``overwrite``, the experiment's stored data
    (record, images, calibration, tables, reports; see
    :func:`~cellrna_pipeline.core.experiment.experiment_data_paths`) is replaced as a
    whole: on failure the previous experiment is back unchanged; on success nothing of
    the previous acquisition remains (its warehouse rows and extra partitions included).
    Ingesting the acquisition an experiment was registered from again just completes or
    rewrites its timepoints.

    Raises
    ------
    InputError
        Bad name, unreadable source, missing voxel size, a name taken by another
        acquisition without ``overwrite``.
    """
    validate_experiment_name(name)
    existed = root.experiment_record(name).exists()
    if existed and not overwrite:
        record = register_experiment(
            root, name, source, voxel_size=voxel_size, channel_names=channel_names
        )
        return record, materialize_experiment(
            instance, root, name, select=["raw_volume"], progress=progress
        )
    old_n = load_experiment(root, name).n_timepoints if existed else 0
    new_n = 0  # timepoints of the new record, once registered
    try:
        with all_or_nothing(experiment_data_paths(root, name)):
            record = register_experiment(
                root, name, source, voxel_size=voxel_size, channel_names=channel_names
            )
            new_n = record.n_timepoints
            progress(
                f"{name}: {record.n_timepoints} timepoints {record.shape_tczyx[1:]} (c,z,y,x), "
                f"voxel {record.voxel_size_um} um, channels {list(record.channel_names)}"
            )
            runs = materialize_experiment(
                instance, root, name, select=["raw_volume"], progress=progress
            )
            if not all(r.success for r in runs):
                raise _RunFailed(runs)
    except BaseException as exc:
        _drop_partitions(instance, name, keep=old_n, had=new_n)  # the previous ones stay
        if isinstance(exc, _RunFailed):
            return record, exc.runs
        raise
    _drop_partitions(instance, name, keep=record.n_timepoints, had=old_n)
    if existed and root.warehouse.exists():
        from cellrna_pipeline.integrations.warehouse import load_experiment as load_warehouse

        load_warehouse(root, name)  # its tables are gone: removes the old acquisition's rows
    return record, runs


def _drop_partitions(instance: DagsterInstance, experiment: str, *, keep: int, had: int) -> None:
    """Remove volume partitions ``keep..had-1`` (and the experiment's if ``keep`` is 0)."""
    for key in [volume_key(experiment, t) for t in range(keep, had)]:
        if instance.has_dynamic_partition(VOLUMES, key):
            instance.delete_dynamic_partition(VOLUMES, key)
    if keep == 0 and instance.has_dynamic_partition(EXPERIMENTS, experiment):
        instance.delete_dynamic_partition(EXPERIMENTS, experiment)
