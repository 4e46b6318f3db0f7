"""Images and files: the one uint8 conversion, image grid, PNG / JSON writer and atomic write.

``atomic_write_bytes`` writes a temporary sibling, fsyncs it and renames it over the target, so
a reader (or a run killed mid-write) sees the old file or the new one, never a torn one. Every
file the library writes (checkpoint metadata, grids, samples, evaluation records, class lists)
goes through it.
"""

import hashlib
import io
import json
import math
import os
import threading

import numpy as np

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
    """Write ``data`` to ``path`` via a temporary file, fsync and ``os.replace`` (the folder is
    created if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


def sha256_file(path):
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path, value, indent=1, sort_keys=False):
    """``value`` as JSON text, atomically (numpy values via ``json_default``)."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=json_default)
    atomic_write_text(path, text + "\n")


def json_default(value):
    """JSON for what ``json`` cannot encode: numpy scalars and arrays as Python values, NaN as
    null, anything else as its ``str``."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        value = value.item()
        return None if isinstance(value, float) and math.isnan(value) else value
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----- images -------------------------------------------------------------------------------------
def to_uint8(images, allow_non_finite=False):
    """Model-space images in [−1, 1] → uint8 ``round((x + 1)·127.5)`` clipped to [0, 255].

    Args:
        images: float array of any shape.
        allow_non_finite: map NaN to 128 and ±inf to 0 / 255 (preview grids of a diverging run)
            instead of raising ``ValueError`` (evaluation: a diverged sampler must not score).
    """
    images = np.asarray(images, dtype=np.float32)
    if not np.all(np.isfinite(images)):
        if not allow_non_finite:
            raise ValueError("to_uint8: images contain NaN or Inf; the sampler or the model "
                             "diverged.")
        images = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, columns=None, padding=1):
    """Images ``[N, H, W, C]`` → one uint8 grid ``[rows·(H+p)+p, columns·(W+p)+p, C]``.

    ``images`` are uint8, or floats in [−1, 1] (converted with ``to_uint8``, non-finite values
    allowed). ``columns`` defaults to ⌈√N⌉; padding and empty cells are white.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects [N, H, W, C], got shape {images.shape}.")
    pixels = images if images.dtype == np.uint8 else to_uint8(images, allow_non_finite=True)
    n, h, w, c = pixels.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255,
                   np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_png(path, image_uint8):
    """Write an ``[H, W, C]`` uint8 image (C = 1 or 3) as PNG, atomically."""
    from PIL import Image

    array = image_uint8[..., 0] if image_uint8.shape[-1] == 1 else image_uint8
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
