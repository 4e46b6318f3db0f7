"""Process start-up tuning for CPU runs: malloc on huge pages, XLA CPU convolutions on Eigen,
XLA CPU's memory-saving scheduler, a memory-keeping malloc and synchronous dispatch for JAX on
AVX2 and AVX-512 CPUs.

1. **glibc malloc on transparent huge pages.** XLA on CPU allocates each step's temporary
   buffers with ``malloc``; glibc serves large blocks with a fresh ``mmap`` and unmaps them on
   ``free``, so every step faults its ~1.5 GB of temporaries in again 4 KiB at a time. Measured
   on the DDPM CIFAR-10 U-Net training step (batch 8, 2-core AMD EPYC, glibc 2.36, THP
   ``madvise``): JAX 379k minor faults and 1.3 s of kernel time per 4.7 s step; with glibc's
   ``glibc.malloc.hugetlb=1`` tunable (``madvise(MADV_HUGEPAGE)`` on those mappings, glibc ≥
   2.35) 0.9k faults, 0.27 s kernel time, 3.85 s per step. TensorFlow: 148k → 1.2k faults,
   kernel time 0.5 → 0.1 s. glibc reads tunables only when a process starts, so an entry point
   re-executes itself once with the tunable added (:func:`reexec_with_huge_page_malloc`).
   That machine had AVX2/FMA. On an AVX-512 machine of the same family (avx512f, avx512_vnni,
   avx512_bf16; kernel 6.18, THP ``madvise``, glibc 2.36) it made no measurable difference
   (``benchmarks/results/cpu_tuning``: paired img/s with ÷ without, 15 rounds, TensorFlow
   1.00× [0.99, 1.03], JAX 0.96× [0.76, 1.07]); it is kept since it costs nothing measurable
   there and wins where the kernel faults the pages in slowly — except for the JAX processes
   that keep their freed memory (item 4), which stay on small pages.

2. **JAX: XLA CPU convolutions on Eigen, not YNNPACK.** jaxlib 0.10's XLA CPU hands
   convolutions to YNNPACK fusions by default. Alone a YNNPACK convolution is as fast as XLA's
   Eigen one (8×32×32, 256 → 256: 88 vs 87 ms), but inside the U-Net they ran at 62–80 GFLOP/s
   against ~110 alone (``jax.profiler`` trace of the training step), and the convolution kernel
   gradient was 1.5–3× the forward. With ``--xla_cpu_experimental_ynn_fusion_type=
   -individual_convolution`` in ``XLA_FLAGS`` (the same machine, hugetlb malloc): training step
   3.75–4.08 → 2.70–3.04 s (XLA's own kernel gradient; see ``backend.conv2d_same``), forward
   6.53 → 7.66 img/s at batch 8 (AVX2/FMA machine). Measured again on an AVX-512 machine
   (avx512f, avx512_vnni, avx512_bf16): training step 1.61× [1.11, 1.70] the img/s of jaxlib's
   default (paired, 15 rounds, ``benchmarks/results/cpu_tuning``), so it is applied on both ISAs.
   XLA reads ``XLA_FLAGS`` once, when JAX's first backend starts,
   so the flag must be set before JAX runs anything: the ``bin/`` entry points do it at
   start-up, and your own code can call :func:`tune_xla_for_cpu` first thing. Importing
   ``keras_etsdm`` changes nothing in the environment. The flag is never set for GPU / TPU runs
   (``JAX_PLATFORMS`` naming an accelerator, or an accelerator plugin installed), and when JAX
   has already started, :func:`tune_xla_for_cpu` warns and leaves ``XLA_FLAGS`` alone (setting
   it then would do nothing for XLA but would mislead ``backend.conv2d_same``, which reads it).

3. **JAX on AVX2 / AVX-512: XLA CPU's concurrency-optimized scheduler off.** jaxlib 0.10's XLA CPU
   orders a program's operations so that independent ones can run at the same time, which keeps
   more temporaries alive at once. With ``--xla_cpu_enable_concurrency_optimized_scheduler=false``
   the CIFAR-10 U-Net's training process (batch 8) peaked at 2,710 / 2,701 instead of 2,867 /
   2,926 MiB (``benchmarks/memory.py``, runs alternated, ``benchmarks/results/jax_scheduler``),
   at the same speed: paired img/s default ÷ without 0.99× [0.88, 1.06], 15 rounds (3.79 vs
   3.87 img/s). The resident set between steps is unchanged (~2.15 GiB): the saving is in the
   temporaries a step holds at once. Measured on an AVX-512 machine (AMD EPYC, avx512f /
   avx512_vnni / avx512_bf16), and with items 4–5 on an AVX2 one
   (:func:`jax_memory_tunings_apply`), so it is applied where ``avx2`` is in ``/proc/cpuinfo``;
   other CPUs keep XLA's default. Set with item 2, by the same functions.

4. **JAX on AVX2 / AVX-512: glibc malloc keeps freed memory.** Even on huge pages, the JAX training
   step's temporaries come back as fresh memory every step: XLA CPU allocates them from its
   worker threads, whose glibc arenas hand blocks this large to ``mmap`` and unmap them on
   ``free``. Measured (DDPM CIFAR-10 U-Net, batch 8, ``train_on_batch``): 143k minor faults per
   step (560 MiB of 4 KiB pages) without huge pages, ~600 (2 MiB pages) with them and a step
   time that alternates between ~1.8 and ~2.3 s; with one arena (``glibc.malloc.arena_max=1``),
   no mmap'ed blocks (``mmap_max=0``) and no trimming (``trim_threshold`` 16 GiB) no faults
   after the first step and a steady ~1.83 s (on AVX2 CPUs without AVX-512 two arenas, at the
   same speed and no more memory: :func:`retain_tunables`). Paired img/s, 15 rounds each
   (``benchmarks/train_step.py``, ``benchmarks/results/retain_memory``): JAX 1.28× [1.08,
   1.43] against huge pages alone (4.21 vs 3.21 img/s; earlier runs 1.25× and 1.12×),
   sampling unchanged (vs diffusers: 1.03× / 0.97× eager with it, 0.99× / 1.00× without,
   separate runs), TensorFlow 0.99× [0.95, 1.03]
   (its allocator already reuses memory); ``bin/train`` on the embedded default unchanged (JAX
   0.213 vs 0.215 s per step). The price: the memory stays with the process, so JAX's training
   process holds its peak (3.19 GiB, ``benchmarks/memory.py``) instead of 2.21 GiB between
   steps, and peaks 430 MiB higher (3,194 vs 2,764 MiB); the first step takes ~4 s longer
   (~20 s). So it is set for JAX processes on the CPU only (``KERAS_BACKEND`` / ``keras.json``
   say jax, no accelerator), and only where ``avx2`` is in ``/proc/cpuinfo`` (measured on
   AVX-512 alone and, with items 3 and 5, on AVX2: 1.21× the img/s there,
   :func:`jax_memory_tunings_apply`). Set by the same re-exec as item 1; an ``arena_max``,
   ``mmap_max``, ``mmap_threshold`` or ``trim_threshold`` already in ``GLIBC_TUNABLES`` leaves
   all four as the user set them. ``KERAS_ETSDM_RETAIN_MEMORY=0`` turns this item off alone (the process
   then gets item 1's huge pages), giving back the memory for the speed. Do not turn it off
   by setting one of those tunables to glibc's default value: setting ``mmap_max``,
   ``mmap_threshold`` or ``trim_threshold`` at all turns off glibc's dynamic mmap threshold, a
   malloc of its own (eager diffusers sampled at 0.61–0.67× its speed of other runs with
   ``mmap_max=65536``).
   Such a process does not get item 1's huge-page tunable: with it the kernel's khugepaged
   (in the background, every 10 s a few MiB; its default ``max_ptes_none`` 511 collapses a
   2 MiB range with a single page present) turns the whole ``madvise``'d heap into huge
   pages, filling in the pages that ``malloc_trim`` gave back
   (:func:`keras_etsdm.backend.release_build_memory`, ``backend.compile_then_release``) and
   that the steps never touch again: the CIFAR-10 U-Net's training process (batch 8, groups
   of 3 steps with 25 s idle between) had the same 1,979 MiB heap throughout, but its
   resident set rose from 2,343 to 2,709 MiB between its 8th and 14th minute, all of the
   heap then on huge pages; on small pages 2,327 → 2,337 MiB over the same 17 minutes
   (``benchmarks/step_heap.py --pause_s 25``, two processes side by side,
   ``benchmarks/results/khugepaged``). With no measured cost to training: paired img/s of
   ``fit`` with ÷ without the huge-page tunable 0.969× [0.949, 1.003], 15 rounds (4.06 vs
   4.15 img/s); the forward pass pays ~2 % (small ÷ huge pages 0.98× [0.96, 0.99] at batch
   8, 0.98× [0.94, 0.99] at 32; DDIM 0.99× [0.97, 1.04]), taken for the memory. ``glibc.malloc.hugetlb=1`` in the user's ``GLIBC_TUNABLES``
   brings huge pages back beside the retaining tunables.

5. **JAX on AVX2 / AVX-512: synchronous dispatch on the CPU.** JAX's CPU client runs each step on a
   worker thread and frees the step's temporaries (XLA's one 605 MiB block for the CIFAR-10
   U-Net's training step, batch 8) only after it has marked the outputs ready, so the Python
   thread (``train_on_batch`` waiting for the loss) or the next step (``fit`` queues it on the
   outputs) often goes on first, and the next step's block is allocated while the previous one
   is still held. Profiled with glibc's ``mallinfo2`` right after ``train_on_batch`` returned
   (``benchmarks/step_heap.py``): the block was still allocated after 6 and 12 of 16 steps in
   two processes; when that happens while the heap has no room for a second block, the
   retaining malloc of item 4 grows by one for good (``benchmarks/memory.py``, 30 steps: 5 of 5
   processes, peaks 2,856–2,871 MiB). With JAX's ``jax_cpu_enable_async_dispatch`` off a
   single-device step runs in the calling thread and frees its temporaries before it returns:
   0 of 16 steps with the block held (two processes), 5 of 5 processes without growth (peaks
   2,317–2,341 MiB), at the same speed (paired img/s of ``fit``, asynchronous ÷ synchronous:
   1.005× [0.987, 1.023] over 30 rounds, 1.026× [0.994, 1.048] over 15; ``bin/train`` on the
   embedded default 0.218 vs 0.223 s per step, medians of six alternated runs;
   ``benchmarks/results/sync_dispatch``). Sampling was not re-measured: a sampler call is one
   compiled loop (about 20 with a progress bar) whose result the caller waits for anyway. JAX
   reads the setting once, when it creates its CPU client, so the start-up functions put
   ``KERAS_ETSDM_JAX_SYNC_DISPATCH=1`` in the environment (:func:`jax_xla_environ`,
   :func:`tune_xla_for_cpu`) and importing ``keras_etsdm`` applies it
   (:func:`apply_sync_dispatch`) before JAX computes anything.
   Multi-device (sharded) steps stay asynchronous, as JAX runs them. Measured on an AVX-512
   machine, and with items 3–4 on an AVX2 one, so set where ``avx2`` is in ``/proc/cpuinfo``;
   ``KERAS_ETSDM_JAX_SYNC_DISPATCH=0`` turns it off, ``=1`` on, on any CPU.

Standard library only: ``bin/`` scripts load this file before importing the package (whose
import takes 5–10 s), so the re-exec is cheap.

Opt out of all with ``KERAS_ETSDM_CPU_TUNING=0``; a ``glibc.malloc.hugetlb`` value already in
``GLIBC_TUNABLES`` or a YNN fusion or scheduler setting already in ``XLA_FLAGS`` is left as it is.
"""

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "KERAS_ETSDM_CPU_TUNING"
RETAIN_OPT_OUT_VARIABLE = "KERAS_ETSDM_RETAIN_MEMORY"  # item 4 alone
SYNC_DISPATCH_VARIABLE = "KERAS_ETSDM_JAX_SYNC_DISPATCH"  # item 5: "1" on, "0" off
_ASYNC_DISPATCH_OPTION = "jax_cpu_enable_async_dispatch"  # JAX's own option (no env variable)
THP_ENABLED_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # first release with the glibc.malloc.hugetlb tunable
# Item 4: no mmap'ed blocks, no trimming (16 GiB threshold), so that freed memory stays in the
# process; one malloc arena on AVX-512, two on AVX2 (see retain_tunables). The four tunables
# exist since glibc 2.26.
_RETAIN_NAMES = ("arena_max", "mmap_max", "trim_threshold", "mmap_threshold")
_KEEP_FREED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
RETAIN_TUNABLES = f"glibc.malloc.arena_max=1:{_KEEP_FREED}"
RETAIN_TUNABLES_TWO_ARENAS = f"glibc.malloc.arena_max=2:{_KEEP_FREED}"
_MIN_GLIBC_RETAIN = (2, 26)


def _opted_out(environ, variable=OPT_OUT_VARIABLE):
    return environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


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


def retain_tunables(cpu_flags=None):
    """The retaining malloc tunables (item 4) for a CPU with ISA ``cpu_flags`` (default:
    :func:`cpu_isa_flags`): :data:`RETAIN_TUNABLES_TWO_ARENAS` on an AVX2 CPU without AVX-512,
    :data:`RETAIN_TUNABLES` (one arena) otherwise — each as measured on its ISA.

    One arena makes XLA's compile threads wait for each other in ``malloc`` (profiled on
    AVX-512: ~16 % of the compile in libc, ~16 % in futex waits); a second arena could serve
    them, while the training step's large blocks can still only come from the main heap (glibc
    gives a second arena heaps of at most 64 MiB, and ``mmap_max=0`` forbids the ``mmap`` it
    would fall back to). Measured on an AMD EPYC of family 25 model 1 (avx2 / fma, no AVX-512;
    ``benchmarks/results/avx2/arena``, DDPM CIFAR-10 U-Net, batch 8, small pages), at no cost:
    paired training img/s one ÷ two arenas 0.96× [0.935, 1.002] over 20 rounds (3.18 vs 3.35
    img/s; ``benchmarks/results/avx2/train_step_88``); peak RSS over 30 steps of
    ``train_on_batch``, fresh processes alternated, 2,298–2,307 MiB with one, 2,277–2,298 with
    two (5 each); over 100 steps no growth with either (one: 2,293 → 2,298 MiB; two: 2,267 →
    2,279 and 2,316 → 2,329). A faster first call is not established: medians 32.8 vs 23.9 s
    (9 pairs), but the machine was faster during the two-arena processes, and scaled by their
    numpy roofs one ÷ two is 0.87× [0.63, 1.15]. Two arenas are not yet measured on AVX-512,
    which keeps one.
    """
    cpu_flags = cpu_isa_flags() if cpu_flags is None else set(cpu_flags)
    if "avx2" in cpu_flags and "avx512f" not in cpu_flags:
        return RETAIN_TUNABLES_TWO_ARENAS
    return RETAIN_TUNABLES


def retains_freed_memory(environ, backend=None, cpu_flags=None):
    """Whether a new process with ``environ`` gets :func:`retain_tunables` (item 4 of the
    module docstring): JAX on the CPU of an AVX2 or AVX-512 machine, not opted out with
    ``KERAS_ETSDM_RETAIN_MEMORY=0``, and none of those four malloc settings already in
    ``GLIBC_TUNABLES`` (a user's malloc choice is left as it is).
    ``backend`` / ``cpu_flags``: default :func:`keras_backend` and :func:`cpu_isa_flags`."""
    if _opted_out(environ, RETAIN_OPT_OUT_VARIABLE):
        return False
    backend = backend or keras_backend(environ)
    if backend != "jax" or accelerator_run(environ):
        return False
    if not jax_memory_tunings_apply(cpu_flags):
        return False
    tunables = environ.get("GLIBC_TUNABLES", "")
    return not any(f"glibc.malloc.{name}" in tunables for name in _RETAIN_NAMES)


def tuned_environ(environ, system=None, glibc=None, thp_mode=None, backend=None,
                  cpu_flags=None):
    """The environment to re-execute with, or None when nothing should change.

    Args:
      environ: the current environment (a mapping; not modified).
      system, glibc, thp_mode: ``sys.platform``, the glibc ``(major, minor)`` and the THP mode;
        detected when None (arguments for tests).
      backend, cpu_flags: the Keras backend and the CPU's ISA flags, for
        :func:`retains_freed_memory`; detected when None.

    Returns:
      A new ``dict`` whose ``GLIBC_TUNABLES`` has either :func:`retain_tunables` appended
      (Linux with glibc ≥ 2.26, where :func:`retains_freed_memory`; then no huge-page tunable,
      see item 4) or ``glibc.malloc.hugetlb=1`` (Linux with glibc ≥ 2.35, THP ``madvise`` —
      with ``never`` there is nothing to gain, with ``always`` the pages are already huge — and
      no hugetlb setting in ``GLIBC_TUNABLES``); None when opted out or neither applies.
    """
    if _opted_out(environ):
        return None
    system = sys.platform if system is None else system
    if not system.startswith("linux"):
        return None
    glibc = _glibc_version() if glibc is None else glibc
    if glibc is None:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    added = []
    retain = (tuple(glibc) >= _MIN_GLIBC_RETAIN
              and retains_freed_memory(environ, backend, cpu_flags))
    # A retaining heap stays on small pages (item 4): not after our own re-exec either.
    retaining = retain or any(ours in tunables
                              for ours in (RETAIN_TUNABLES, RETAIN_TUNABLES_TWO_ARENAS))
    if (tuple(glibc) >= _MIN_GLIBC and "glibc.malloc.hugetlb" not in tunables
            and not retaining):
        thp_mode = _thp_mode() if thp_mode is None else thp_mode
        if thp_mode == "madvise":
            added.append(HUGETLB_TUNABLE)
    if retain:
        added.append(retain_tunables(cpu_flags))
    if not added:
        return None
    new = dict(environ)
    new["GLIBC_TUNABLES"] = ":".join([tunables] * bool(tunables) + added)
    return new


def reexec_with_huge_page_malloc():
    """Replace this process by itself with the malloc tunables of :func:`tuned_environ` set
    (huge pages; for JAX on AVX2 / AVX-512 freed memory kept instead), if any applies.

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
SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
JAX_XLA_SCHEDULER_FLAG = f"--{SCHEDULER_FLAG}=false"
# XLA aborts the process on a flag it does not know, so only the jaxlib releases measured here
# get them (0.10.x; the YNN flag exists in TensorFlow 2.21's XLA as well).
_JAXLIB_WITH_FLAG = ((0, 10), (0, 11))


def _jaxlib_version():
    try:
        version = importlib.metadata.version("jaxlib")
        return tuple(int(part) for part in version.split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def tuned_xla_flags(environ, jaxlib_version=None, cpu_flags=None):
    """The ``XLA_FLAGS`` value with YNNPACK convolutions off (2 in the module docstring) and, on
    AVX-512 CPUs, XLA's concurrency-optimized scheduler off (3); None when nothing should change.

    None when opted out or when jaxlib is not a release known to have the flags. A flag that
    ``XLA_FLAGS`` already sets (the YNN fusion types, the scheduler) is left as the user set it.
    ``cpu_flags``: the CPU's ISA flags (default: :func:`cpu_isa_flags` of this machine).
    """
    if _opted_out(environ):
        return None
    jaxlib_version = _jaxlib_version() if jaxlib_version is None else tuple(jaxlib_version)
    low, high = _JAXLIB_WITH_FLAG
    if jaxlib_version is None or not low <= jaxlib_version[:2] < high:
        return None
    flags = environ.get("XLA_FLAGS", "")
    added = []
    if YNN_FUSION_FLAG not in flags:
        added.append(JAX_XLA_CPU_FLAG)
    if jax_memory_tunings_apply(cpu_flags) and SCHEDULER_FLAG not in flags:
        added.append(JAX_XLA_SCHEDULER_FLAG)
    if not added:
        return None
    return " ".join([flags] + added).strip()


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


def keras_backend(environ):
    """The Keras backend a process started with ``environ`` uses, as Keras decides it:
    ``KERAS_BACKEND``, else ``backend`` in ``$KERAS_HOME/keras.json`` (default ``~/.keras``),
    else ``tensorflow``."""
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"]
    home = environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


# Modules whose presence means JAX will pick an accelerator when JAX_PLATFORMS does not say.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def accelerator_run(environ):
    """Whether JAX in a process with ``environ`` may run on a GPU / TPU (tuning is CPU-only)."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms != "cpu"
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def wants_sync_dispatch(environ, cpu_flags=None):
    """Whether a JAX-on-CPU process with ``environ`` should dispatch synchronously (item 5):
    ``KERAS_ETSDM_JAX_SYNC_DISPATCH`` when set ("0" / "false" / "no" / "off": no, anything
    else: yes), otherwise on AVX-512 CPUs (``cpu_flags``, default :func:`cpu_isa_flags`) unless
    all tuning is opted out."""
    value = environ.get(SYNC_DISPATCH_VARIABLE)
    if value is not None:
        return not _opted_out(environ, SYNC_DISPATCH_VARIABLE)
    if _opted_out(environ):
        return False
    return jax_memory_tunings_apply(cpu_flags)


def jax_memory_tunings_apply(cpu_flags=None):
    """Whether a JAX-on-CPU process gets items 3–5 (the concurrency-optimized scheduler off, the
    retaining malloc, synchronous dispatch) on a CPU with ISA ``cpu_flags`` (default:
    :func:`cpu_isa_flags` of this machine): on x86 CPUs with AVX2 (AVX-512 CPUs have it too),
    the two ISAs they were measured on; other CPUs keep JAX's and glibc's defaults.

    Measured as one set (``benchmarks/train_step.py --cpu_tuning tuned,avx512_set``, DDPM
    CIFAR-10 U-Net, batch 8, ``bin/train``'s clipped Adam) on an AMD EPYC of family 25 model 1
    (avx2 / fma, no AVX-512; ``benchmarks/results/avx2``): **1.21×** the img/s of huge pages
    alone, paired over 30 rounds (3.39 vs 2.85 img/s; tuned ÷ set 0.83× [0.81, 0.86]), peak
    RSS 2,490 vs 2,661 MiB; an earlier 15-round run 1.06× (0.94× [0.87, 1.08], undecided),
    2,481 vs 2,622 MiB. The price there is the first call of the training step, ~6 s longer
    (fresh processes alternated: 37.1 / 28.1 / 31.9 s against 22.3 / 25.4 / 27.4 s; XLA's
    compile threads share one malloc arena). Each item alone was measured on AVX-512 (items
    3–5 above).
    """
    cpu_flags = cpu_isa_flags() if cpu_flags is None else set(cpu_flags)
    return bool({"avx2", "avx512f"} & cpu_flags)


def jax_xla_environ(environ, backend=None, cpu_flags=None):
    """``environ`` plus the start-up settings for a NEW JAX-on-CPU process, or None.

    The XLA flags of items 2–3 (``XLA_FLAGS``) and, where :func:`wants_sync_dispatch`,
    ``KERAS_ETSDM_JAX_SYNC_DISPATCH=1`` (item 5, applied when ``keras_etsdm`` is imported).
    None when the process will not run JAX (``backend``, default ``keras_backend(environ)``),
    may run on an accelerator, or nothing changes. ``cpu_flags``: default :func:`cpu_isa_flags`.
    """
    backend = backend or keras_backend(environ)
    if backend != "jax" or accelerator_run(environ):
        return None
    new = dict(environ)
    flags = tuned_xla_flags(environ, cpu_flags=cpu_flags)
    if flags is not None:
        new["XLA_FLAGS"] = flags
    if SYNC_DISPATCH_VARIABLE not in environ and wants_sync_dispatch(environ, cpu_flags):
        new[SYNC_DISPATCH_VARIABLE] = "1"
    return new if new != environ else None


def _jax_started():
    """Whether this process's JAX has created its backends (XLA_FLAGS are then fixed)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without the probe: assume it has started
        return True


def tune_xla_for_cpu(backend=None):
    """Set this process's ``XLA_FLAGS`` for JAX on CPU (YNNPACK convolutions off; on AVX-512 also
    the concurrency-optimized scheduler off) and, on AVX-512, ask for synchronous dispatch
    (item 5: ``KERAS_ETSDM_JAX_SYNC_DISPATCH=1``, applied now if JAX is imported and otherwise
    when ``keras_etsdm`` is); the explicit, opt-in form of what the ``bin/`` entry points do at
    start-up.

    Call it first thing, before JAX runs anything::

        from keras_etsdm import cpu_tuning   # imports no JAX computation
        cpu_tuning.tune_xla_for_cpu()

    Args:
        backend: the Keras backend (default: as Keras will choose it, ``keras_backend``).

    Returns:
        True when a setting was made; False when nothing applies (another backend, a GPU / TPU
        run, opted out, a jaxlib without the flag and no AVX-512, settings already in the
        environment) or JAX has already started — then it warns, since XLA would ignore them.
    """
    new = jax_xla_environ(os.environ, backend)
    if new is None:
        return False
    if _jax_started():
        warnings.warn(
            "keras_etsdm.cpu_tuning.tune_xla_for_cpu: JAX has already started, so XLA_FLAGS can "
            "no longer change how it compiles; XLA_FLAGS left unchanged (YNNPACK convolutions "
            "stay on, and the per-tap kernel gradient of backend.conv2d_same is used), and its "
            "CPU dispatch mode stays as it is. Call it before JAX runs anything, e.g. at the "
            "top of the script or notebook.",
            RuntimeWarning, stacklevel=2)
        return False
    for name in ("XLA_FLAGS", SYNC_DISPATCH_VARIABLE):
        if name in new:
            os.environ[name] = new[name]
    if "jax" in sys.modules:  # keras_etsdm may have been imported already
        apply_sync_dispatch()
    return True


def jax_dispatches_synchronously():
    """Whether this process's JAX runs single-device CPU computations synchronously (item 5);
    None when JAX is not imported."""
    if "jax" not in sys.modules:
        return None
    import jax

    return jax.config.values.get(_ASYNC_DISPATCH_OPTION) is False


def apply_sync_dispatch(environ=None):
    """Item 5: run JAX's single-device CPU computations synchronously when ``environ``
    (default ``os.environ``) has ``KERAS_ETSDM_JAX_SYNC_DISPATCH=1`` (set by the start-up
    functions on AVX-512 CPUs), so that a training step frees its temporaries before the next
    one allocates its own. ``keras_etsdm`` calls it on import with the JAX backend.

    Returns:
        True when set; False when not asked for, or when JAX's CPU client already exists (the
        setting is read when it is created) — then it warns.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(SYNC_DISPATCH_VARIABLE)
    if value is None or _opted_out(environ, SYNC_DISPATCH_VARIABLE):
        return False
    import jax

    if jax_dispatches_synchronously():
        return True
    if _jax_started():
        warnings.warn(
            f"keras_etsdm.cpu_tuning: {SYNC_DISPATCH_VARIABLE}={value} asks for synchronous CPU "
            "dispatch, but JAX has already created its backends, which read the setting once; "
            "dispatch stays asynchronous (a training step's temporaries may then overlap the "
            "next step's). Import keras_etsdm, or call cpu_tuning.tune_xla_for_cpu(), before "
            "JAX runs anything.", RuntimeWarning, stacklevel=2)
        return False
    jax.config.update(_ASYNC_DISPATCH_OPTION, False)
    return True


# ----- Winograd convolutions in JAX's training step on CPU ----------------------------------------
def jax_winograd_training(cpu_flags=None):
    """Whether JAX training steps on this CPU use Winograd's F(2×2, 3×3) for their 3×3
    convolutions by default (``train(winograd_training="auto")``; ``keras_etsdm.winograd``):
    on x86 CPUs with AVX2 and without AVX-512, where it was measured to pay.

    Measured on an AMD EPYC of family 25 model 1 (avx2 / fma, no AVX-512;
    ``benchmarks/results/avx2/winograd``), DDPM CIFAR-10 U-Net, batch 8, ``bin/train``'s
    clipped Adam: the training step 1.19–1.25× as fast as with direct convolutions (paired, four
    runs), beside eager diffusers 1.44× [1.34, 1.51] against 1.20× [1.14, 1.22] (seed 85, after
    the backward pass's transform was reordered), peak RSS 2,564 against 2,405 MiB (1.45× eager
    diffusers'); the price is the first call, longer when nothing is cached: ~7 s with the
    transforms as additions, ~3 s since they are matmuls (27.3 against 24.3 s, alternated in one
    process, ``benchmarks/results/avx2/winograd_transforms``; 27.7 s beside diffusers in seed 86,
    1.40× [1.37, 1.48] eager diffusers' speed, peak 1.46×; but 35.1–37.6 s in four later fresh
    processes, 29.6 s direct), ~16 s with ``bin/``'s persistent compilation cache warm. On
    AVX-512 it gained 1.13× and is not the default there; TensorFlow with XLA on AVX2 ran its
    training step slower with it (direct ÷ form 0.76× [0.70, 0.86] of the time, first call 64 vs
    55 s; ``benchmarks/results/avx2/winograd_transforms``), so this is JAX's only.
    """
    cpu_flags = cpu_isa_flags() if cpu_flags is None else set(cpu_flags)
    return "avx2" in cpu_flags and "avx512f" not in cpu_flags


# ----- LLVM's optimization level for JAX's training step on CPU -----------------------------------
TRAIN_OPT_LEVEL_VARIABLE = "KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL"
OPT_LEVEL_OPTION = "xla_backend_optimization_level"  # XLA's default: 3


def jax_train_compiler_options(environ=None):
    """XLA compiler options for JAX's compiled training step on the CPU (a dict for
    ``jax.jit(..., compiler_options=...)``; empty: XLA's defaults, the library's choice).

    ``$KERAS_ETSDM_JAX_TRAIN_OPT_LEVEL`` = ``0``–``3`` compiles the training step's kernels with
    that LLVM optimization level (XLA's default is 3); unset or ``auto``: XLA's defaults. Only
    the training step gets it: samplers and the test step keep XLA's default (as a process-wide
    XLA flag, level 1 had made DDIM sampling ~11 % slower, ``benchmarks/results/avx2/jax_compile``).

    Level 1 is a switch for short runs, not the default: measured on an AMD EPYC of family 25
    model 1 (avx2 / fma, no AVX-512; ``benchmarks/results/avx2/train_opt_level``), DDPM CIFAR-10
    U-Net, batch 8, bin/train's clipped Adam, the Winograd form, it shortened the training
    step's XLA compile to ~0.74–0.90× and the cold first call by ~3 s (22.6 vs 25.0 s, 31.7 vs
    35.0 s; fresh processes alternated 0.90× [0.89, 0.93]) but ran the step 2–3 % slower
    (paired img/s level 1 ÷ level 3: 0.98× [0.97, 0.99] over 15 rounds, 0.97× [0.95, 0.98] over
    20), which costs more than those seconds after ~100 steps. Level 2: no speed cost
    established (1.01× [0.98, 1.03]) and no shorter first call beside diffusers (28.9 vs 27.5
    s, one run). AVX-512 not measured.

    Args:
      environ: the environment to read (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    value = environ.get(TRAIN_OPT_LEVEL_VARIABLE, "auto").strip().lower()
    if value in ("0", "1", "2", "3"):
        return {OPT_LEVEL_OPTION: int(value)}
    if value != "auto":
        raise ValueError(f"{TRAIN_OPT_LEVEL_VARIABLE} must be 0, 1, 2, 3 or auto (LLVM's "
                         f"optimization level for JAX's training step); got {value!r}.")
    return {}


# ----- XLA or not for TensorFlow's training step on CPU -------------------------------------------
def cpu_isa_flags(path="/proc/cpuinfo"):
    """The CPU's ISA flags (``avx2``, ``avx512f``, ``avx512_bf16``, ...) from ``/proc/cpuinfo``;
    an empty set where that file cannot be read (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def tensorflow_train_jit_compile(cpu_flags=None):
    """Whether TensorFlow's training step on a CPU-only machine should be XLA-compiled.

    Chosen by measurement per ISA (``benchmarks/results/bin_train_speed_tf_xla_vs_onednn`` and
    ``benchmarks/results/vs_diffusers_avx512``):

    - AVX-512 (``avx512f``; measured on an AMD EPYC with avx512_vnni / avx512_bf16): TensorFlow's
      own graph with its oneDNN kernels beat XLA — the embedded default 0.215 vs 0.245 s per
      ``bin/train`` step (paired per round 0.88×, bootstrap 95 % interval [0.85, 0.97]); the DDPM
      CIFAR-10 U-Net at batch 8 4.68 vs 3.97 img/s (1.00× [0.96, 1.02] vs 0.93× [0.88, 0.94] of
      eager diffusers), first call 34 vs 49 s, peak RSS 3.0 vs 4.1 GiB. → False.
    - AVX2 (measured on an AMD EPYC, family 25 model 1, avx2 / fma, no AVX-512): XLA beat the
      graph on the same U-Net with ``bin/train``'s clipped Adam, 2.68 vs 2.32 img/s, paired
      1.12× [1.06, 1.19] over 15 rounds (``benchmarks/train_step.py --tf_jit_compile
      true,false``, ``benchmarks/results/avx2``), at a cost in first call (86 vs 39 s there;
      44.7 vs 29.3 s in ``vs_diffusers.py``) and peak RSS (3.9 vs 2.8 GiB; 3.7 vs 2.7). With
      ``ClippedAdam``'s fused update (``benchmarks/results/avx2/tf_release``) the graph's first
      call is 17–25 s and its peak over 32 ``fit`` steps 2,578 MiB against XLA's 44–59 s and
      ~3.5 GiB, but XLA ÷ graph there was 1.090× [0.982, 1.227] (undecided; the 1.12× [1.06,
      1.19] above stands) → True there and on other CPUs (not compared);
      ``train.jit_compile=False`` trades that speed for the first call and memory.

    Args:
      cpu_flags: a set of ISA flags (default: :func:`cpu_isa_flags` of this machine).
    """
    cpu_flags = cpu_isa_flags() if cpu_flags is None else set(cpu_flags)
    return "avx512f" not in cpu_flags


def tensorflow_sample_jit_compile(cpu_flags=None):
    """Whether TensorFlow's sampling loops on a CPU-only machine should be XLA-compiled.

    The same per-ISA rule as the training step (:func:`tensorflow_train_jit_compile`), measured
    for sampling on AVX-512 (``benchmarks/results/vs_diffusers_avx512/sample_tf_xla_vs_graph.md``,
    DDPM CIFAR-10 U-Net, batch 8, 15 paired rounds): without XLA 1.08× [1.06, 1.10] the NFE rate
    of the XLA loop for DDIM, 1.09× [1.06, 1.11] for DPM-Solver++ 2M, first call 6.7 vs 8.4 s,
    peak RSS 1.4 vs 1.7 GiB. → False on AVX-512; elsewhere XLA, as before (not compared there).
    """
    return tensorflow_train_jit_compile(cpu_flags)


def trim_heap():
    """Return the C heap's free memory to the operating system (glibc ``malloc_trim(0)``).

    glibc keeps freed small blocks in its arenas, so memory a process freed still counts in its
    resident set and a later peak stacks on top of it. Returns True when trimmed, False where
    the C library is not glibc (nothing to do).
    """
    if _glibc_version() is None:
        return False
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
