"""Small file helpers shared by the writers: atomic text writes and the bundle's logger."""

from __future__ import annotations

import logging
import os
import tempfile

__all__ = ["atomic_write_text", "logger"]

logger = logging.getLogger("registration")


def atomic_write_text(path: str, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any other file
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
