"""Crash-safe file writes shared by training, sampling, data and export.

``atomic_write_bytes`` writes a temporary sibling, fsyncs it and renames it over the target, so
a reader (or a run killed mid-write) sees the old file or the new one, never a torn one.
"""

import os
import threading

_TMP_PREFIX = ".tmp-"


def fsync_path(path):
    """fsync a file or directory (a no-op where the filesystem cannot)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` via a temporary file, fsync and ``os.replace``."""
    tmp = f"{path}.{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (full disk, Ctrl-C) leaves the old file and no temporary behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path, text):
    """``atomic_write_bytes`` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
