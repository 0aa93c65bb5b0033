"""Independent calls of the compiled (nogil) kernels spread over threads.

The kernels release the GIL, so threads of one process run them in parallel on shared
arrays. Results never depend on the thread count: each call works on its own rows and
the pieces are put back together in order.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["pieces", "thread_map"]

_PIECES_PER_THREAD = 4  # pieces of unequal cost: several per thread balance the load


def pieces(n: int, threads: int, min_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)`` in order, of at most ``max_rows``
    (memory); with several threads, up to ``_PIECES_PER_THREAD`` per thread of at least
    ``min_rows``."""
    count = -(-n // max_rows)
    if threads > 1:
        count = max(count, min(threads * _PIECES_PER_THREAD, n // max(min_rows, 1)))
    bounds = [n * i // max(count, 1) for i in range(max(count, 1) + 1)]
    return list(itertools.pairwise(bounds))


def thread_map(fn: Callable[..., Any], args: Sequence[tuple], threads: int) -> list[Any]:
    """``[fn(*a) for a in args]``, over ``threads`` threads when there are several calls."""
    if threads <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    pool = _pool(threads)
    futures = [pool.submit(fn, *a) for a in args]
    return [f.result() for f in futures]


def _pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` threads (a thread start costs about a
    millisecond). Per process: a process forked from this one (Dagster's executors) gets
    its own, its parent's threads do not exist there."""
    key = (os.getpid(), threads)
    with _LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="cellrna-kernels")
        return _POOLS[key]


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
