"""Start-up shared by the bin/ entry points; imported before anything heavy.

Loads ``keras_etsdm/cpu_tuning.py`` by path (standard library only) rather than through the
package, whose import takes 5–10 s, re-executes the process once with glibc's huge-page malloc
tunable when that helps, and for JAX on CPU sets the XLA convolution flag before JAX starts (the
module's docstring has the measurements).
"""

import importlib.util
import os

_CPU_TUNING = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                           "keras_etsdm", "cpu_tuning.py")


def load_cpu_tuning():
    """``keras_etsdm.cpu_tuning``, loaded from its file without importing the package."""
    spec = importlib.util.spec_from_file_location("_keras_etsdm_cpu_tuning", _CPU_TUNING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tune_malloc():
    load_cpu_tuning().reexec_with_huge_page_malloc()


def tune_process():
    """First thing in every entry point: huge-page malloc (re-exec), then XLA_FLAGS for JAX on
    CPU (never for GPU / TPU runs)."""
    tune_malloc()
    load_cpu_tuning().tune_xla_for_cpu()
