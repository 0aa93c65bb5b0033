"""The one place that decides where torch runs (CPU or CUDA) and with how many threads.

Everything that builds or runs a torch model asks :func:`select_device`; nothing else in
the package looks at ``torch.cuda`` or sets thread counts. The choice can be forced with
``CELLRNA_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``) and the CPU thread count with
``CELLRNA_TORCH_THREADS``. The compiled (numba) kernels of the spot detector take their
thread count from :func:`cpu_threads` (``CELLRNA_THREADS``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from cellrna_pipeline.core.errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_ENV = "CELLRNA_DEVICE"
THREADS_ENV = "CELLRNA_TORCH_THREADS"
KERNEL_THREADS_ENV = "CELLRNA_THREADS"


def select_device(preference: str | None = None) -> torch.device:
    """The torch device to use.

    Parameters
    ----------
    preference : ``"auto"``/``None`` (CUDA when available, else CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``. ``$CELLRNA_DEVICE`` is used when this is ``None``.

    Returns
    -------
    torch.device

    Raises
    ------
    InputError
        An unknown device name, or CUDA asked for where none is available.
    """
    import torch

    choice = (preference or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice != "cpu" and not choice.startswith("cuda"):
        raise InputError(f"unknown device {choice!r}; use auto, cpu, cuda or cuda:N")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {choice!r} asked for, but CUDA is not available here")
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise InputError(f"bad device {choice!r}: {exc}") from None
    if device.type == "cpu":
        configure_cpu_threads()
    return device


def configure_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count (``n``, ``$CELLRNA_TORCH_THREADS``, or the cores).

    Returns the number set. Kept here so that thread policy lives in one place.
    """
    import torch

    if n is None:
        n = _threads_from_env(THREADS_ENV)
    if n < 1:
        raise InputError(f"thread count must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def cpu_threads() -> int:
    """Threads for the compiled CPU kernels: ``$CELLRNA_THREADS``, else the cores this
    process may run on."""
    return _threads_from_env(KERNEL_THREADS_ENV)


def _threads_from_env(name: str) -> int:
    """The positive integer in ``$name``, else the cores this process may run on;
    InputError naming the variable for anything else."""
    env = os.environ.get(name, "").strip()
    if not env:
        return max(1, len(os.sched_getaffinity(0)))
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"{name} must be a positive integer, got {env!r}")
    return n


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: ``nccl`` on CUDA, ``gloo`` on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
