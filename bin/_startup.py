"""Start-up shared by the bin/ entry points; imported before anything heavy.

Loads ``keras_etsdm/cpu_tuning.py`` by path (standard library only) rather than through the
package, whose import takes 5–10 s, re-executes the process once with glibc malloc tunables
when they help (huge pages; for JAX on an AVX2 or AVX-512 CPU keeping freed memory instead), and
for JAX on CPU sets the XLA flags before JAX starts (the module's docstring has the
measurements). Then turns on the persistent XLA compilation cache
(``keras_etsdm/compilation_cache.py``, also loaded by path) so that a second run of the same
model skips XLA's compilation.
"""

import importlib.util
import os

_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "keras_etsdm")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_keras_etsdm_{name}",
                                                  os.path.join(_PACKAGE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cpu_tuning():
    """``keras_etsdm.cpu_tuning``, loaded from its file without importing the package."""
    return _load("cpu_tuning")


def load_compilation_cache():
    """``keras_etsdm.compilation_cache``, loaded from its file without importing the package."""
    return _load("compilation_cache")


def tune_malloc():
    load_cpu_tuning().reexec_with_huge_page_malloc()


def tune_process():
    """First thing in every entry point: malloc tunables (re-exec), then XLA_FLAGS for JAX on
    CPU (never for GPU / TPU runs), then the persistent compilation cache."""
    tune_malloc()
    cpu_tuning = load_cpu_tuning()
    cpu_tuning.tune_xla_for_cpu()
    load_compilation_cache().enable_compilation_cache(cpu_tuning.keras_backend(os.environ))
