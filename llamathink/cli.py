"""What the package's command lines share."""

from __future__ import annotations

import io
import sys


def tolerant_output() -> None:
    """Make stdout write a character its encoding cannot hold (a non-UTF-8 locale, ``PYTHONIOENCODING=ascii``) as
    "?" rather than raise UnicodeEncodeError, which would stop a command after its work: a training run at its first
    generated sample, the chat with its reply lost, a preparation at its report of a folder's name. stderr escapes
    such characters already (Python's "backslashreplace"). A stdout that cannot be reconfigured stays as it is."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError, io.UnsupportedOperation):  # (a closed or detached stream)
            pass
