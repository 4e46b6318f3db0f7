"""Access to tensorflow-gan's evaluation maths on TensorFlow >= 2.16.

Why this module exists: ``import tensorflow_gan`` fails on current TensorFlow, because the
package's top-level ``__init__`` imports ``tensorflow_gan.python.estimator`` and
``tensorflow_gan.python.train``, which subclass ``tf.estimator.SessionRunHook`` — and
``tf.estimator`` was removed in TF 2.16.  The evaluation code itself
(``tensorflow_gan/python/eval/*.py``: Fréchet / kernel classifier distance, classifier score)
needs only TensorFlow, TensorFlow Probability and TensorFlow Hub.

How it works: Python runs every parent package's ``__init__`` before a submodule, so importing
``tensorflow_gan.python.eval`` normally runs the failing top-level ``__init__`` first.  We
locate the installed package with ``importlib.util.find_spec`` (which reads no code), then put
two *empty* placeholder modules into ``sys.modules`` for ``tensorflow_gan`` and
``tensorflow_gan.python`` whose ``__path__`` points at the real directories.  The import system
treats a module found in ``sys.modules`` as already initialised, so it skips those two
``__init__`` files but still finds submodules through ``__path__``; then the real
``tensorflow_gan.python.eval`` package (and its absolute imports such as
``from tensorflow_gan.python.eval import eval_utils``) loads normally.

Side effect: after ``load_tfgan_eval()``, ``import tensorflow_gan`` in the same process returns
the placeholder (it has the attribute ``python.eval`` but not ``estimator`` / ``losses``). If the
real package already imported successfully (an older TensorFlow), it is used untouched.
"""

import importlib
import importlib.util
import os
import sys
import types

_PACKAGE = "tensorflow_gan"
_EVAL = "tensorflow_gan.python.eval"
_cached_eval = None


def load_tfgan_eval():
    """Return the ``tensorflow_gan.python.eval`` module (the ``tfgan.eval`` namespace).

    Raises:
        ImportError: if tensorflow-gan is not installed (with the pip command to fix it).
    """
    global _cached_eval
    if _cached_eval is not None:
        return _cached_eval
    if _EVAL in sys.modules:
        _cached_eval = sys.modules[_EVAL]
        return _cached_eval
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tensorflow-gan is not installed; the FID/KID/IS maths come from it. "
                          "Install it with `pip install tensorflow-gan==2.1.0` (see "
                          "requirements.txt).")
    root = list(spec.submodule_search_locations)[0]
    if _PACKAGE not in sys.modules:
        _install_placeholder(_PACKAGE, root)
    if f"{_PACKAGE}.python" not in sys.modules:
        _install_placeholder(f"{_PACKAGE}.python", os.path.join(root, "python"))
    _cached_eval = importlib.import_module(_EVAL)
    return _cached_eval


def _install_placeholder(name, path):
    """An initialised-looking, empty package ``name`` whose submodules are found under ``path``."""
    module = types.ModuleType(name, doc=f"Placeholder for {name} installed by "
                                        f"keras_etsdm.evaluation.tfgan (its __init__ needs "
                                        f"tf.estimator, which TensorFlow >= 2.16 lacks).")
    module.__path__ = [path]
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)
