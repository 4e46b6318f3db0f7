"""Process start-up tuning for CPU runs: malloc on huge pages, XLA CPU convolutions on Eigen.

1. **glibc malloc on transparent huge pages.** XLA on CPU allocates each step's temporary
   buffers with ``malloc``; glibc serves large blocks with a fresh ``mmap`` and unmaps them on
   ``free``, so every step faults its ~1.5 GB of temporaries in again 4 KiB at a time. Measured
   on the DDPM CIFAR-10 U-Net training step (batch 8, 2-core AMD EPYC, glibc 2.36, THP
   ``madvise``): JAX 379k minor faults and 1.3 s of kernel time per 4.7 s step; with glibc's
   ``glibc.malloc.hugetlb=1`` tunable (``madvise(MADV_HUGEPAGE)`` on those mappings, glibc ≥
   2.35) 0.9k faults, 0.27 s kernel time, 3.85 s per step. TensorFlow: 148k → 1.2k faults,
   kernel time 0.5 → 0.1 s. glibc reads tunables only when a process starts, so an entry point
   re-executes itself once with the tunable added (:func:`reexec_with_huge_page_malloc`).

2. **JAX: XLA CPU convolutions on Eigen, not YNNPACK.** jaxlib 0.10's XLA CPU hands
   convolutions to YNNPACK fusions by default. Alone a YNNPACK convolution is as fast as XLA's
   Eigen one (8×32×32, 256 → 256: 88 vs 87 ms), but inside the U-Net they ran at 62–80 GFLOP/s
   against ~110 alone (``jax.profiler`` trace of the training step), and the convolution kernel
   gradient was 1.5–3× the forward. With ``--xla_cpu_experimental_ynn_fusion_type=
   -individual_convolution`` in ``XLA_FLAGS`` (the same machine, hugetlb malloc): training step
   3.75–4.08 → 2.70–3.04 s (XLA's own kernel gradient; see ``backend.conv2d_same``), forward
   6.53 → 7.66 img/s at batch 8. :func:`set_jax_xla_cpu_flags` adds it before JAX compiles
   anything (``keras_etsdm`` calls it on import); XLA reads ``XLA_FLAGS`` when its first backend
   starts. TensorFlow's XLA accepts the flag too (tests start TF subprocesses from JAX ones).

Standard library only: ``bin/`` scripts load this file before importing the package (whose
import takes 5–10 s), so the re-exec is cheap.

Opt out of both with ``KERAS_ETSDM_CPU_TUNING=0``; a ``glibc.malloc.hugetlb`` value already in
``GLIBC_TUNABLES`` or a YNN fusion setting already in ``XLA_FLAGS`` is left as it is.
"""

import importlib.metadata
import os
import platform
import sys

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "KERAS_ETSDM_CPU_TUNING"
THP_ENABLED_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # first release with the glibc.malloc.hugetlb tunable


def _opted_out(environ):
    return environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off")


def _glibc_version():
    """``(major, minor)`` of the running glibc, or None when the C library is not glibc."""
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def _thp_mode(path=THP_ENABLED_PATH):
    """The bracketed transparent-huge-page mode (``always``/``madvise``/``never``), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def tuned_environ(environ, system=None, glibc=None, thp_mode=None):
    """The environment to re-execute with, or None when nothing should change.

    Args:
      environ: the current environment (a mapping; not modified).
      system, glibc, thp_mode: ``sys.platform``, the glibc ``(major, minor)`` and the THP mode;
        detected when None (arguments for tests).

    Returns:
      A new ``dict`` with ``glibc.malloc.hugetlb=1`` appended to ``GLIBC_TUNABLES``, or None
      when opted out, not Linux with glibc ≥ 2.35, THP is ``never`` (nothing to gain) or
      ``always`` (already huge pages), or ``GLIBC_TUNABLES`` already sets the tunable.
    """
    if _opted_out(environ):
        return None
    system = sys.platform if system is None else system
    if not system.startswith("linux"):
        return None
    glibc = _glibc_version() if glibc is None else glibc
    if glibc is None or tuple(glibc) < _MIN_GLIBC:
        return None
    thp_mode = _thp_mode() if thp_mode is None else thp_mode
    if thp_mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    new = dict(environ)
    new["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE
    return new


def reexec_with_huge_page_malloc():
    """Replace this process by itself with the huge-page malloc tunable set, if it helps.

    Call first thing in an entry point: everything done before it is done twice. Keeps the PID
    and the interpreter's own options (``sys.orig_argv``); does nothing when
    :func:`tuned_environ` returns None (including after the re-exec, which sets the tunable).
    """
    environ = tuned_environ(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), environ)


# ----- XLA_FLAGS for JAX on CPU -----------------------------------------------------------------
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
JAX_XLA_CPU_FLAG = f"--{YNN_FUSION_FLAG}=-individual_convolution"
# XLA aborts the process on a flag it does not know, so only the jaxlib releases measured here
# get it (0.10.x; the flag exists in TensorFlow 2.21's XLA as well).
_JAXLIB_WITH_FLAG = ((0, 10), (0, 11))


def _jaxlib_version():
    try:
        version = importlib.metadata.version("jaxlib")
        return tuple(int(part) for part in version.split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def tuned_xla_flags(environ, jaxlib_version=None):
    """The ``XLA_FLAGS`` value with YNNPACK convolutions off, or None when nothing should change.

    None when opted out, when jaxlib is not a release known to have the flag, or when
    ``XLA_FLAGS`` already sets the YNN fusion types.
    """
    if _opted_out(environ):
        return None
    jaxlib_version = _jaxlib_version() if jaxlib_version is None else tuple(jaxlib_version)
    low, high = _JAXLIB_WITH_FLAG
    if jaxlib_version is None or not low <= jaxlib_version[:2] < high:
        return None
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        return None
    return f"{flags} {JAX_XLA_CPU_FLAG}".strip()


def ynn_convolutions_enabled(xla_flags):
    """Whether XLA CPU (jaxlib 0.10) sends convolutions to YNNPACK under ``xla_flags``."""
    value = None
    for flag in xla_flags.split():
        if flag.startswith(f"--{YNN_FUSION_FLAG}="):
            value = flag.split("=", 1)[1]
    if value is None:
        return True  # jaxlib 0.10's default
    items = [item for item in value.split(",") if item]
    if items and all(item[0] in "+-" for item in items):
        return "-individual_convolution" not in items
    return "individual_convolution" in items


def set_jax_xla_cpu_flags(backend):
    """Add the convolution flag to ``os.environ["XLA_FLAGS"]`` when ``backend`` is ``"jax"``.

    Call before JAX compiles or runs anything (XLA reads the variable once, when its first
    backend starts); later it changes nothing.
    """
    if backend != "jax":
        return
    flags = tuned_xla_flags(os.environ)
    if flags is not None:
        os.environ["XLA_FLAGS"] = flags
