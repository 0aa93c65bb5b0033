"""Thread counts from the environment (``core/device.py``)."""

from __future__ import annotations

import os

import pytest

from cellrna_pipeline.core.device import cpu_threads
from cellrna_pipeline.core.errors import InputError


def test_kernel_threads_default_to_the_cores_and_follow_the_variable(monkeypatch):
    monkeypatch.delenv("CELLRNA_THREADS", raising=False)
    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("CELLRNA_THREADS", " 3 ")
    assert cpu_threads() == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("CELLRNA_THREADS", value)
    with pytest.raises(
        InputError, match=f"CELLRNA_THREADS must be a positive integer, got '{value}'"
    ):
        cpu_threads()
