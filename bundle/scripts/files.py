"""Small file helpers shared by the writers: the one atomic-write policy, strict JSON, and the bundle's logger."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_folder", "atomic_output", "atomic_write_json", "atomic_write_text", "json_safe", "logger"]

logger = logging.getLogger("registration")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder to write to; on success it is renamed onto ``path`` (readers never
    see a partial file, and a failed write leaves an earlier ``path`` as it was), on failure it is removed.

    The one write policy of the bundle: the file gets the usual permissions (``0o666`` less the umask, where
    ``mkstemp`` would leave ``0o600``), and ``suffix`` keeps the extension writers infer the format from.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".tmp{os.getpid()}_", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, is_current: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path`` to write a whole dataset into; on success it replaces ``path``,
    on failure it is removed, so an interrupted run never leaves a half-written folder that a later run would trust.

    ``is_current``: checked once the folder is written; True means another process wrote an up-to-date ``path``
    meanwhile, which is kept (the staging copy is dropped). The folder gets the usual permissions (``0o777`` less the
    umask, where ``mkdtemp`` would leave ``0o700``), as ``atomic_output`` gives files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if is_current is None or not is_current():
            os.chmod(staging, 0o777 & ~_umask())
            if path.exists():
                shutil.rmtree(path)
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` through ``atomic_output``."""
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as stream:
        stream.write(text)


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
