"""Stage commands of ``cellrna``, one module each (``spots``, ``cells``, ``track``, ...).

Each module defines ``register(subparsers) -> None``, which adds its parser(s) with
``set_defaults(func=handler)``; ``handler(args) -> int`` returns the exit code and raises
:class:`~cellrna_pipeline.core.errors.InputError` for bad input. Modules import only the
standard library at module level, so that ``cellrna --help`` stays instant; heavy imports
go inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def register_all(subparsers: argparse._SubParsersAction) -> None:
    """Call ``register`` of every module in this package, in name order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
