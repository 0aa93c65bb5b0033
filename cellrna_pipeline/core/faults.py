"""Fault injection for the crash-safety tests.

``checkpoint("name")`` does nothing unless the environment variable
``CELLRNA_FAULT_AT`` names it; then the process kills itself with SIGKILL, as an
out-of-memory kill or a power cut would, at exactly that point of a write.
``CELLRNA_FAULT_AT=name@N`` kills at the N-th time the point is reached (e.g. during the
second timepoint). Tests run a command with the variable set, then check that nothing
partial is visible and that a rerun completes with the same result.

Points: ``zarr.create.before_rename`` (a new image or label image, built but not in
place), ``zarr.timepoint.partial`` (a timepoint's full-resolution chunks stored, the
coarser levels and its completion marker not), ``parquet.before_rename`` (any Parquet
file, written but not renamed into place), ``warehouse.before_commit`` (every table of
the load inserted, the transaction not committed).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CELLRNA_FAULT_AT"
_reached: Counter[str] = Counter()


def checkpoint(name: str) -> None:
    """SIGKILL this process if ``$CELLRNA_FAULT_AT`` is ``name`` (or ``name@N`` and this is
    the N-th time ``name`` is reached)."""
    wanted = os.environ.get(ENV)
    if not wanted or not wanted.startswith(name):
        return
    _reached[name] += 1
    point, _, nth = wanted.partition("@")
    if point == name and _reached[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
