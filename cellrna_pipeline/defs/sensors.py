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
from cellrna_pipeline.core.experiment import register_experiment
from cellrna_pipeline.core.inbox import scan_inbox
from cellrna_pipeline.core.io import timepoints_written
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


@sensor(
    job=ingest_job,
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers complete acquisitions in the inbox as experiments (one volume "
    "partition per timepoint) and requests one raw_volume run per new partition.",
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
    for acq in ready:
        if state["failed"].get(acq.experiment) == acq.fingerprint:
            continue  # reported once; retried when the acquisition changes
        try:
            record = register_experiment(root, acq.experiment, acq.path)
        except InputError as exc:
            context.log.error(f"cannot ingest {acq.path.name}: {exc}")
            state["failed"][acq.experiment] = acq.fingerprint
            continue
        state["failed"].pop(acq.experiment, None)
        # Request only the timepoints not stored yet: a re-seen acquisition costs nothing,
        # and one interrupted half-way is completed. Run keys stop a run twice.
        done = (
            set(timepoints_written(root.raw(record.name)))
            if root.raw(record.name).exists()
            else set()
        )
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
        return SensorResult(skip_reason=SkipReason("no new complete acquisition"), cursor=cursor)
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[
            experiments_partitions.build_add_request(new_experiments),
            volumes_partitions.build_add_request(new_volumes),
        ],
        cursor=cursor,
    )
