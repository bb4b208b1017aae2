"""Files: result files written safely (readers see the old file or the whole new one, never a part), and the
cache directory for converted models and built kernels."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is an ordinary file
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """Where converted models and built kernels are kept: ``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``; the system's
    temporary directory when that cannot be written (e.g. a read-only home on a CI runner)."""
    base = Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab"))
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "attnlab-cache"
