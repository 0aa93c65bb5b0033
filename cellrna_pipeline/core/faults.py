"""Fault injection for the crash-safety tests.

``checkpoint("name")`` does nothing unless the environment variable
``CELLRNA_FAULT_AT`` equals ``name``; then the process kills itself with SIGKILL, as an
out-of-memory kill or a power cut would, at exactly that point of a write. Tests run a
command with the variable set, then check that nothing partial is visible and that a
rerun completes with the same result.
"""

from __future__ import annotations

import os
import signal

ENV = "CELLRNA_FAULT_AT"


def checkpoint(name: str) -> None:
    """SIGKILL this process if ``$CELLRNA_FAULT_AT == name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
