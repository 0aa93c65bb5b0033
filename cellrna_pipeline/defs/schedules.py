"""``warehouse_refresh_schedule``: recompute experiment-level tables every hour."""

from dagster import RunRequest, ScheduleEvaluationContext, schedule

from cellrna_pipeline.defs.jobs import tables_job
from cellrna_pipeline.defs.partitions import EXPERIMENTS


@schedule(
    job=tables_job,
    cron_schedule="0 * * * *",
    description="Hourly: refresh the statistics "
    "tables, the warehouse and the report of every registered experiment.",
)
def warehouse_refresh_schedule(context: ScheduleEvaluationContext):
    for experiment in context.instance.get_dynamic_partitions(EXPERIMENTS):
        yield RunRequest(
            run_key=f"{experiment}:{context.scheduled_execution_time:%Y%m%dT%H}",
            partition_key=experiment,
        )
