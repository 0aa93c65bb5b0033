"""Errors that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: wrong dimensions, dtype, NaNs, missing metadata, unknown names.

    The message is one line that names the problem and, where it helps, the fix.
    """
