"""Small file helpers shared by the writers: atomic text writes and the bundle's logger."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile

__all__ = ["atomic_write_json", "atomic_write_text", "json_safe", "logger"]

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


def json_safe(value: object, path: str = "", undefined: dict[str, str] | None = None) -> object:
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``; bare ``NaN`` is not JSON), recording
    each replaced entry's key path in ``undefined`` (``"a.b"`` -> why)."""
    if isinstance(value, dict):
        return {key: json_safe(item, f"{path}.{key}" if path else str(key), undefined) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item, f"{path}[{i}]", undefined) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if undefined is not None:
            undefined.setdefault(path, f"not a finite number ({value})")
        return None
    return value


def atomic_write_json(path: str, content: dict) -> None:
    """Write ``content`` as strict JSON (``null`` for undefined values, listed with the reason under ``undefined``),
    atomically."""
    undefined = dict(content.get("undefined", {}))
    safe = json_safe({key: value for key, value in content.items() if key != "undefined"}, undefined=undefined)
    if undefined:
        safe["undefined"] = undefined
    atomic_write_text(path, json.dumps(safe, indent=1, allow_nan=False))
