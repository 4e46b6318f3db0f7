"""Persistent XLA compilation cache: a new process reuses the executables an earlier one compiled.

The first call of a compiled function pays for tracing and for XLA's compiler; the compiler
part can be skipped in later processes. Both backends can keep the compiled executables on disk
and load them in a later process with the same program, flags and machine (CIFAR-10 U-Net
training step, first call in a fresh process, ``benchmarks/results/first_call``: JAX 19.0 →
8.8 s with the cache warm, TensorFlow with XLA 49.6 → 39.4 s, the rest being tracing):

- JAX: ``jax_compilation_cache_dir`` (set here through the ``JAX_COMPILATION_CACHE_DIR``
  environment variable, which JAX reads when it is imported; only compilations of at least
  ``jax_persistent_cache_min_compile_time_secs``, default 1 s, are written).
- TensorFlow: ``--tf_xla_persistent_cache_directory`` in ``TF_XLA_FLAGS``, read when TensorFlow
  first parses its XLA flags (at its first XLA compilation).

Tracing (Python → jaxpr / graph) and lowering still run in every process; only XLA's
compilation is skipped. Entries are keyed by the program, the compile options and flags, and
the device, so a changed model, batch shape, ``XLA_FLAGS`` or jaxlib/TF version compiles anew
(and adds an entry; delete the directory to reclaim the space).

The ``bin/`` entry points enable it at start-up in ``$KERAS_ETSDM_COMPILATION_CACHE`` if set,
else ``$XDG_CACHE_HOME/keras_etsdm/xla`` (default ``~/.cache/keras_etsdm/xla``), one
sub-directory per backend. ``KERAS_ETSDM_COMPILATION_CACHE=0`` turns it off; a cache directory
already named in ``JAX_COMPILATION_CACHE_DIR`` / ``TF_XLA_FLAGS`` is left as it is. In your own
code, call :func:`enable_compilation_cache` before the first compiled function runs. The
TensorFlow directory must not contain spaces (``TF_XLA_FLAGS`` is split on them).

Standard library only: ``bin/_startup.py`` loads this file by path before importing the package.
"""

import os
import sys

CACHE_VARIABLE = "KERAS_ETSDM_COMPILATION_CACHE"
JAX_CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
TF_CACHE_FLAG = "--tf_xla_persistent_cache_directory"
_OFF = ("0", "false", "no", "off")


def default_cache_root(environ):
    """The cache root for ``environ``: ``$KERAS_ETSDM_COMPILATION_CACHE``, else
    ``$XDG_CACHE_HOME/keras_etsdm/xla``, else ``~/.cache/keras_etsdm/xla``; None when the
    variable turns the cache off (``0``, ``false``, ``no``, ``off``)."""
    value = environ.get(CACHE_VARIABLE, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    xdg = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "keras_etsdm", "xla")


def cache_environ(environ, backend, root=None):
    """``environ`` plus the cache setting for a NEW process on ``backend``, or None.

    Args:
      environ: the current environment (a mapping; not modified).
      backend: ``"jax"`` or ``"tensorflow"``; any other backend gets None (nothing to set).
      root: the cache root (default :func:`default_cache_root`); the backend's directory is
        ``<root>/<backend>``.

    Returns:
      A new ``dict``, or None when the cache is turned off, the backend has no XLA cache, or
      the environment already names a cache directory for it.
    """
    root = default_cache_root(environ) if root is None else root
    if root is None or backend not in ("jax", "tensorflow"):
        return None
    directory = os.path.join(root, backend)
    new = dict(environ)
    if backend == "jax":
        if environ.get(JAX_CACHE_VARIABLE):
            return None
        new[JAX_CACHE_VARIABLE] = directory
    else:
        flags = environ.get("TF_XLA_FLAGS", "")
        if TF_CACHE_FLAG in flags:
            return None
        new["TF_XLA_FLAGS"] = f"{flags} {TF_CACHE_FLAG}={directory}".strip()
    return new


def enable_compilation_cache(backend, root=None):
    """Turn the persistent compilation cache on for this process.

    Call it before the first compiled function runs: TensorFlow parses ``TF_XLA_FLAGS`` at its
    first XLA compilation (so after ``import keras_etsdm`` is fine), JAX reads
    ``JAX_COMPILATION_CACHE_DIR`` at import (when JAX is already imported, its config is
    updated instead, which JAX honours until its first compilation). Creates the directory;
    child processes inherit the setting through ``os.environ``.

    Args:
      backend: the Keras backend, ``"jax"`` or ``"tensorflow"``.
      root: the cache root (default :func:`default_cache_root`).

    Returns:
      The backend's cache directory, or None when nothing was set (turned off, another
      backend, already configured in the environment, or the directory cannot be created).
    """
    root = default_cache_root(os.environ) if root is None else root
    new = cache_environ(os.environ, backend, root)
    if new is None:
        return None
    directory = os.path.join(root, backend)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None  # an unwritable cache directory must not stop a run; it only costs time
    os.environ.update({k: v for k, v in new.items() if os.environ.get(k) != v})
    if backend == "jax" and "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_compilation_cache_dir", directory)
    return directory
