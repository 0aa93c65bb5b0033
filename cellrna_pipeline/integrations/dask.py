"""Where dask computations run: local threads by default, or an existing cluster.

The same chunked code runs in both places; only the scheduler differs::

    with dask_scheduler() as where:              # local threads (or $CELLRNA_DASK_ADDRESS)
        result.data.compute()
    with dask_scheduler("tcp://10.0.0.5:8786"):  # a dask.distributed scheduler
        ...

The address comes from the argument, else the ``CELLRNA_DASK_ADDRESS`` environment
variable, else none (local threads). A cluster started by dask-jobqueue (SLURM, PBS,
...) or dask-kubernetes is used through its scheduler address; this module never starts
or scales one (see ``docs/scaling.md``). Workers must see the data root at the same path
(a shared filesystem), since they read and write the OME-Zarr chunks themselves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cellrna_pipeline.core.errors import InputError

__all__ = ["ADDRESS_ENV", "DaskTarget", "dask_scheduler", "resolve_address"]

ADDRESS_ENV = "CELLRNA_DASK_ADDRESS"
_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


@dataclass(frozen=True)
class DaskTarget:
    """Where a :func:`dask_scheduler` block runs.

    Attributes
    ----------
    kind : ``"threads"`` or ``"distributed"``.
    address : the scheduler address (distributed only).
    workers : number of workers (distributed) or threads (local).
    """

    kind: str
    address: str | None
    workers: int

    def describe(self) -> str:
        if self.kind == "threads":
            return f"local threads ({self.workers})"
        return f"dask.distributed at {self.address} ({self.workers} workers)"


def resolve_address(address: str | None = None) -> str | None:
    """The scheduler address to use: ``address``, else ``$CELLRNA_DASK_ADDRESS``, else None.

    Raises
    ------
    InputError
        The address is not a URL of a dask scheduler (``tcp://host:port`` etc.).
    """
    value = (address or "").strip() or os.environ.get(ADDRESS_ENV, "").strip()
    if not value:
        return None
    if not value.startswith(_SCHEMES):
        where = "address" if (address or "").strip() else ADDRESS_ENV
        raise InputError(
            f"{where} {value!r} is not a dask scheduler address (expected e.g. tcp://host:8786)"
        )
    return value


@contextlib.contextmanager
def dask_scheduler(
    address: str | None = None, *, threads: int | None = None, timeout_s: float = 30.0
) -> Iterator[DaskTarget]:
    """Run the dask computations inside the block on a cluster or on local threads.

    Parameters
    ----------
    address : scheduler address (``tcp://host:8786``); empty or ``None`` falls back to
        ``$CELLRNA_DASK_ADDRESS``, then to local threads.
    threads : local thread count (default: one per core); ignored for a cluster.
    timeout_s : how long to wait for the scheduler to answer.

    Yields
    ------
    DaskTarget describing where the work runs.

    Raises
    ------
    InputError
        A malformed address, or a scheduler that cannot be reached (one line, with the
        address).
    """
    import dask

    resolved = resolve_address(address)
    if resolved is None:
        n = threads if threads and threads > 0 else (os.cpu_count() or 1)
        with dask.config.set(scheduler="threads", num_workers=n):
            yield DaskTarget(kind="threads", address=None, workers=n)
        return
    from distributed import Client

    try:
        client = Client(resolved, timeout=timeout_s, set_as_default=False)
    except OSError as exc:
        raise InputError(f"cannot reach the dask scheduler at {resolved}: {exc}") from None
    try:
        n_workers = len(client.scheduler_info().get("workers", {}))
        with dask.config.set(scheduler=client):
            yield DaskTarget(kind="distributed", address=resolved, workers=n_workers)
    finally:
        client.close()
