"""``inbox_sensor``: ingest complete acquisitions dropped into ``$CELLRNA_HOME/inbox``."""

import json

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.core.experiment import (
    ExperimentRecord,
    load_experiment,
    register_experiment,
    resolve_image_path,
)
from cellrna_pipeline.core.inbox import Acquisition, scan_inbox
from cellrna_pipeline.core.io import discard, timepoints_written
from cellrna_pipeline.core.paths import DataRoot
from cellrna_pipeline.defs.jobs import ingest_job
from cellrna_pipeline.defs.partitions import (
    experiments_partitions,
    volume_keys,
    volumes_partitions,
)
from cellrna_pipeline.defs.resources import DataRootResource


def _load_cursor(raw: str | None) -> dict:
    try:
        state = json.loads(raw) if raw else {}
    except ValueError:
        state = {}
    return {
        "observed": state.get("observed", {}),
        "failed": state.get("failed", {}),
    }


def _register(root: DataRoot, acq: Acquisition) -> tuple[ExperimentRecord, bool]:
    """Register an acquisition; ``(record, redelivered)``.

    An acquisition dropped again at the same place with new content (a fixed file, a
    re-export) replaces the experiment it was registered as: the record is rewritten, a
    raw image of another shape, dtype, voxel size or channels is removed (it came from
    the old content), and every timepoint is copied again.
    """
    try:
        return register_experiment(root, acq.experiment, acq.path), False
    except InputError:
        path = root.experiment_record(acq.experiment)
        if not path.exists():
            raise
        old = load_experiment(root, acq.experiment)
        if old.source != str(resolve_image_path(acq.path.absolute())):
            raise  # the name is taken by another acquisition
    record = register_experiment(root, acq.experiment, acq.path, overwrite=True)
    raw = root.raw(record.name)
    if raw.exists() and old.image_meta != record.image_meta:
        discard(raw)  # written from the old content, in a shape the new one does not fit
    return record, True


@sensor(
    job=ingest_job,
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers complete acquisitions in the inbox as experiments (one volume "
    "partition per timepoint) and requests one raw_volume run per new partition. An "
    "acquisition that cannot be ingested is reported (log and tick) once, and retried "
    "when it changes.",
)
def inbox_sensor(
    context: SensorEvaluationContext, data_root: DataRootResource
) -> SensorResult | SkipReason:
    root = data_root.root
    state = _load_cursor(context.cursor)
    ready, state["observed"] = scan_inbox(root.inbox, state["observed"])
    run_requests: list[RunRequest] = []
    new_experiments: list[str] = []
    new_volumes: list[str] = []
    failures: list[str] = []
    for acq in ready:
        if state["failed"].get(acq.experiment) == acq.fingerprint:
            continue  # reported once; retried when the acquisition changes
        try:
            record, redelivered = _register(root, acq)
        except InputError as exc:
            failures.append(f"cannot ingest {acq.path.name}: {exc}")
            context.log.error(failures[-1])
            state["failed"][acq.experiment] = acq.fingerprint
            continue
        state["failed"].pop(acq.experiment, None)
        # Request only the timepoints not stored yet (all of them for new content): a
        # re-seen acquisition costs nothing, and one interrupted half-way is completed.
        # Run keys stop a run twice.
        raw = root.raw(record.name)
        done = set(timepoints_written(raw)) if raw.exists() and not redelivered else set()
        todo = [t for t in range(record.n_timepoints) if t not in done]
        if not todo:
            continue
        keys = volume_keys(record.name, record.n_timepoints)
        new_experiments.append(record.name)
        new_volumes.extend(keys)
        run_requests.extend(
            RunRequest(run_key=f"{keys[t]}:{acq.fingerprint}", partition_key=keys[t]) for t in todo
        )
        context.log.info(
            f"{record.name}: {len(todo)} of {record.n_timepoints} timepoints to ingest"
        )
    cursor = json.dumps(state, sort_keys=True)
    if not run_requests:
        reason = "; ".join(failures) or "no new complete acquisition"
        return SensorResult(skip_reason=SkipReason(reason), cursor=cursor)
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[
            experiments_partitions.build_add_request(new_experiments),
            volumes_partitions.build_add_request(new_volumes),
        ],
        cursor=cursor,
    )
