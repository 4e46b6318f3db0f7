"""Export a ``DiffusionModel`` (and a complete sampler) as a TensorFlow SavedModel.

The SavedModel runs with TensorFlow alone (TF Serving, ``tf.saved_model.load``): neither this
library, nor Keras, nor JAX is needed to load and call it. Signatures (batch size B dynamic):

* ``denoise(x_t: float32[B,H,W,C], t: float32[B]) -> {"eps": float32[B,H,W,C]}``: the network
  behind ``DiffusionModel.denoise``, E-TSDM sharing map included; ``t`` are float time labels in
  ``[0, T-1]`` (the TRUE time, the export applies the sharing itself). The output is the native
  prediction, keyed by what it is: ``"eps"`` for an ε-prediction model, ``"v"`` or ``"x0"`` for
  the others (metadata ``prediction_type``); the ``sample`` loop converts it itself.
* ``sample(noise: float32[B,H,W,C]) -> {"images": uint8[B,H,W,C]}``: the whole compiled loop of
  the configured sampler and step count, from ``x_T = noise`` to uint8 images
  ``clip(round((x_0 + 1) · 127.5), 0, 255)``. Stochastic samplers (DDPM, DDIM with η > 0) take
  a second input ``seed: int32[2]`` for their per-step noise, so every signature is a pure,
  reproducible function of its inputs.
* Class-conditional models (``num_classes`` K): ``denoise`` takes a third input ``labels:
  int32[B]`` (class ids, K = null / unconditional) and ``sample`` takes ``labels: int32[B]``
  and ``guidance_scale: float32[]``, the classifier-free guidance weight w of
  ``ε̂ = (1 + w)·ε(x, t, y) − w·ε(x, t, ∅)`` (0: no guidance; both branches are one 2B call).
* ``serving_default`` = ``sample`` (= ``denoise`` when exported without a sampler).
* ``metadata() -> {"metadata": string}``: a JSON document (schedule, T, t̃, n, sampler, steps,
  image shape, versions, signature descriptions). The same JSON is written to
  ``assets.extra/etsdm_metadata.json`` (the SavedModel directory that TensorFlow reserves for
  files of higher-level libraries that the graph does not load).

How each backend gets there (``_build_module``; every endpoint is traced once, by the save):

* TensorFlow: the endpoints are ``tf.function(jit_compile=True)`` s over the Keras model (XLA,
  like the library's own TF sampling loop); the variables are the model's own ``tf.Variable`` s.
* JAX: ``jax.experimental.jax2tf`` with a symbolic batch dimension ``b``. In jax 0.10 jax2tf
  only has native serialization (the old "graph" mode is gone and the ``native_serialization``
  switch is deprecated and ignored): the JAX function is lowered to StableHLO and embedded in
  one ``XlaCallModule`` TF op, which TensorFlow 2.21 compiles with XLA when it runs it. The
  weights are NOT baked into that module: they are copied into ``tf.Variable`` s and passed in
  as arguments (``keras.StatelessScope`` maps them onto the network), so ``denoise`` and
  ``sample`` share one copy of the weights. We lower for CPU and CUDA by default (one module
  with a platform switch inside), so an export made on a CPU machine can be served on a GPU;
  and without the gradient function (``with_gradient=False``), which serving never uses.

TF Serving expects ``<model_base_path>/<version>/saved_model.pb``: export to e.g.
``exports/mnist/1``. The CUDA lowering of a JAX export is produced and checked by JAX at export
time, but the tests here run the export on CPU only.

The torch backend cannot export a SavedModel: load the same checkpoint with
``KERAS_BACKEND=jax`` or ``tensorflow`` (checkpoints are backend-independent).
"""

import json
import os
import shutil
import uuid

import keras
from keras import ops

from keras_etsdm import __version__, samplers
from keras_etsdm import backend as etsdm_backend
from keras_etsdm.guidance import ClassifierFreeGuidance
from keras_etsdm.model import DiffusionModel

EXPORT_FORMAT = "keras_etsdm.savedmodel"
FORMAT_VERSION = 1
METADATA_DIR = "assets.extra"
METADATA_FILE = "etsdm_metadata.json"
SUPPORTED_BACKENDS = ("jax", "tensorflow")
DEFAULT_JAX_PLATFORMS = ("cpu", "cuda")


class ExportError(RuntimeError):
    """Export cannot proceed (unsupported backend, bad output directory, incompatible sampler)."""


def images_to_uint8(x0):
    """Model-space images in [−1, 1] → uint8 ``round((x + 1)·127.5)`` clipped to [0, 255].

    ``keras.ops`` twin of ``keras_etsdm.evaluation.to_uint8`` (numpy), usable inside compiled
    and exported functions. Rounds half to even, like ``np.round``.
    """
    x0 = ops.cast(x0, "float32")
    return ops.cast(ops.clip(ops.round((x0 + 1.0) * 127.5), 0.0, 255.0), "uint8")


def check_export_backend():
    """Raise ``ExportError`` unless the Keras backend can write a SavedModel (jax, tensorflow)."""
    name = etsdm_backend.backend_name()
    if name not in SUPPORTED_BACKENDS:
        raise ExportError(
            f"SavedModel export is not supported on the {name!r} Keras backend: a SavedModel is "
            f"a TensorFlow graph, reachable from the 'tensorflow' backend directly and from "
            f"'jax' through jax2tf. Re-run with KERAS_BACKEND=jax or KERAS_BACKEND=tensorflow "
            f"(checkpoints load on any backend).")
    return name


def check_out_dir(out_dir, overwrite):
    """Fail early (before the slow tracing) if ``out_dir`` may not be written."""
    if os.path.exists(out_dir) or os.path.islink(out_dir):
        if not overwrite:
            raise FileExistsError(
                f"Export directory {out_dir!r} already exists; pass overwrite=True "
                f"(bin/export --overwrite) to replace it, or choose another directory.")
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise ExportError(f"Cannot overwrite {out_dir!r}: it is not a directory.")
        # Never rmtree something that is not an earlier export (e.g. a mistyped home directory).
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "saved_model.pb")):
            raise ExportError(
                f"Refusing to overwrite {out_dir!r}: it is a non-empty directory that does not "
                f"hold a SavedModel (no saved_model.pb). Remove it yourself or pick another "
                f"directory.")


def _sampler_description(sampler):
    if sampler is None:
        return None
    try:
        described = samplers.serialize(sampler)
    except TypeError:  # an unregistered sampler class still exports
        described = {"class_name": type(sampler).__name__, "config": sampler.get_config()}
    return described


def _json_safe(value):
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


def export_metadata(model, sampler=None, use_ema=True, platforms=None):
    """The metadata dictionary stored in the export (see the module docstring)."""
    height, width, channels = model.image_shape
    sharing = model.sharing
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "library": "keras_etsdm",
        "library_version": __version__,
        "keras_version": keras.__version__,
        "backend": etsdm_backend.backend_name(),
        "image_shape": [int(height), int(width), int(channels)],
        "value_range": [-1.0, 1.0],
        "schedule": model.schedule.get_config(),
        "T": int(model.schedule.num_timesteps),
        "time_sharing": {"t_tilde": sharing.t_tilde, "n": sharing.n,
                         "enabled": bool(sharing.enabled),
                         "shared_labels": sharing.boundaries()},
        "num_classes": model.num_classes,
        "null_class": model.null_id,
        "prediction_type": model.prediction_type,
        "weights": "ema" if use_ema else "raw",
        "ema_decay": model.ema_decay,
        "ema_updates": int(etsdm_backend.to_numpy(model.ema_updates.value)),
        "checkpoint_step": getattr(model, "checkpoint_step", None),
        "sampler": _sampler_description(sampler),
        "steps": None if sampler is None else int(getattr(sampler, "num_steps",
                                                          sampler.num_iterations)),
        "nfe": None if sampler is None else int(sampler.num_iterations),
        "stochastic": None if sampler is None else bool(sampler.stochastic),
        "signatures": _signature_docs(model, sampler),
        "serving_default": "denoise" if sampler is None else "sample",
    }
    import tensorflow as tf

    meta["tensorflow_version"] = tf.__version__
    if meta["backend"] == "jax":
        import jax

        meta["jax_version"] = jax.__version__
        meta["jax2tf_platforms"] = list(platforms or DEFAULT_JAX_PLATFORMS)
    return _json_safe(meta)


def _signature_docs(model, sampler):
    h, w, c = model.image_shape
    low, top = model.schedule.label_range
    time_kind = "continuous times" if model.schedule.is_continuous else "time labels"
    labels_doc = (f"int32[B] class ids in [0, {model.num_classes - 1}]; {model.num_classes} = "
                  f"null class (unconditional)" if model.conditional else None)
    docs = {
        "denoise": {
            "inputs": {"x_t": f"float32[B,{h},{w},{c}] noisy images",
                       "t": f"float32[B] {time_kind} in [{low:g}, {top:g}] (true time; the "
                            "E-TSDM sharing map is applied inside)",
                       **({"labels": labels_doc} if labels_doc else {})},
            "outputs": {_denoise_output_key(model): f"float32[B,{h},{w},{c}] "
                        f"{_PREDICTION_DOCS[model.prediction_type]}"}},
        "metadata": {"inputs": {}, "outputs": {"metadata": "string: this JSON document"}},
    }
    if sampler is not None:
        inputs = {"noise": f"float32[B,{h},{w},{c}] standard normal x_T"}
        if sampler.stochastic:
            inputs["seed"] = "int32[2] seed of the per-step noise"
        if labels_doc:
            inputs["labels"] = labels_doc
            inputs["guidance_scale"] = ("float32 scalar w of classifier-free guidance, "
                                        "eps = (1 + w) eps(x, t, y) - w eps(x, t, null); 0: none")
        docs["sample"] = {
            "inputs": inputs,
            "outputs": {"images": f"uint8[B,{h},{w},{c}] = clip(round((x_0 + 1) * 127.5), 0, "
                                  f"255)"}}
    return docs


_PREDICTION_DOCS = {"epsilon": "predicted noise",
                    "v": "predicted velocity v = alpha_t eps - sigma_t x_0",
                    "x0": "predicted clean image x_0"}


def _denoise_output_key(model):
    """The ``denoise`` signature's output name: "eps" (as always) for ε-prediction, else the
    prediction type ("v", "x0"), so a client cannot mistake a v̂ for an ε̂."""
    return "eps" if model.prediction_type == "epsilon" else model.prediction_type


def _check_exportable(model, sampler):
    if not isinstance(model, DiffusionModel):
        raise TypeError(f"export_savedmodel expects a keras_etsdm.DiffusionModel, got "
                        f"{type(model).__name__}.")
    if model.image_shape is None or any(d is None for d in model.image_shape):
        raise ExportError(f"The network has no static image shape ({model.image_shape}); "
                          f"build it with a fixed image_size and channels to export it.")
    if sampler is None:
        return
    if not hasattr(sampler, "build_loop"):
        raise TypeError(f"sampler must be a keras_etsdm sampler (with build_loop), got "
                        f"{type(sampler).__name__}.")
    own = getattr(sampler, "schedule", None)
    if own is not None and own.get_config() != model.schedule.get_config():
        raise ExportError(f"The sampler was built for the schedule {own.get_config()} but the "
                          f"model uses {model.schedule.get_config()}; build the sampler with "
                          f"schedule=model.schedule.")


def _endpoint_functions(model, sampler):
    """The endpoints as backend functions ``{name: (fn, [(arg name, shape, dtype)])}``.

    Written once in ``keras.ops`` for both backends; ``sample`` is listed first. For a
    class-conditional model ``denoise`` takes ``labels`` and ``sample`` takes ``labels`` and a
    classifier-free ``guidance_scale`` (both branches in one 2B call per NFE).
    """
    h, w, c = model.image_shape

    def denoise_fn(x, t, **conditioning):
        # The one seam: network(x, sharing(t)[, y]); float32 out whatever the dtype policy.
        return ops.cast(model.denoise(x, t, **conditioning), "float32")

    image = (None, h, w, c)
    conditional = model.conditional
    output_key = _denoise_output_key(model)
    class_args = [("labels", (None,), "int32"), ("guidance_scale", (), "float32")]
    endpoints = {}
    if sampler is not None:
        if conditional:
            guided = ClassifierFreeGuidance(model)
            loop = sampler.build_loop(lambda x, t, **cond: ops.cast(guided(x, t, **cond),
                                                                   "float32"),
                                      prediction_type=model.prediction_type)
        else:
            loop = sampler.build_loop(denoise_fn, prediction_type=model.prediction_type)

        def run(noise, seed=None, labels=None, guidance_scale=None):
            conditioning = {} if not conditional else {"y": labels,
                                                       "guidance_scale": guidance_scale}
            return {"images": images_to_uint8(loop(noise, seed=seed, **conditioning))}

        args = [("noise", image, "float32")]
        if sampler.stochastic:
            args.append(("seed", (2,), "int32"))
        if conditional:
            args.extend(class_args)
        names = [a for a, _, _ in args]
        endpoints["sample"] = (lambda *inputs: run(**dict(zip(names, inputs))), args)

    def denoise(x_t, t, labels=None):
        return {output_key: denoise_fn(x_t, t, **({"y": labels} if conditional else {}))}

    args = [("x_t", image, "float32"), ("t", (None,), "float32")]
    if conditional:
        args.append(class_args[0])
    endpoints["denoise"] = (denoise, args)
    return endpoints


def _named_signature_fn(call, arg_names):
    """A function with real parameter names (they become the signature's input keys)."""
    # Fixed arities rather than *args: tf.function maps a signature onto real parameters.
    fixed = {
        1: lambda a: call(a),
        2: lambda a, b: call(a, b),
        3: lambda a, b, c: call(a, b, c),
        4: lambda a, b, c, d: call(a, b, c, d),
    }
    fn = fixed[len(arg_names)]
    import inspect

    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in arg_names])
    return fn


def _build_module(model, sampler, meta_json, platforms):
    """A ``tf.Module`` holding the weights and one ``tf.function`` per endpoint.

    Not ``keras.export.ExportArchive``: its ``write_out`` traces every endpoint twice (once to
    collect variables, once more inside ``tf.saved_model.save``, whose save context misses the
    tf.function cache) — twice the U-Net tracing and, on JAX, twice the jax2tf lowering.
    Here each endpoint is traced exactly once, by the save itself.
    """
    import tensorflow as tf

    backend = etsdm_backend.backend_name()
    network_variables = list(model.network.variables)
    module = tf.Module()
    if backend == "jax":
        from jax.experimental import jax2tf

        # Weights as tf.Variables passed to the jax2tf function as ARGUMENTS (Keras' stateless
        # scope maps them onto the network's variables), so one copy serves every endpoint
        # instead of being baked as constants into each StableHLO module.
        module.weights = [
            tf.Variable(etsdm_backend.to_numpy(v.value), trainable=False,
                        name=v.path.replace("/", "_"))
            for v in network_variables]
    else:
        module.weights = network_variables  # Keras' TF variables are tf trackables
    for name, (fn, args) in _endpoint_functions(model, sampler).items():
        specs = [tf.TensorSpec(shape, dtype, name=arg) for arg, shape, dtype in args]
        if backend == "jax":
            def stateless(values, *inputs, _fn=fn):
                with keras.StatelessScope(state_mapping=list(zip(network_variables, values))):
                    return _fn(*inputs)

            # "b" is the symbolic batch: every batched input shares it; weights are static.
            poly = [None] + ["(" + ", ".join("b" if d is None else str(d) for d in shape) + ")"
                             for _, shape, _ in args]
            converted = jax2tf.convert(
                stateless, polymorphic_shapes=poly, with_gradient=False,
                native_serialization_platforms=tuple(platforms or DEFAULT_JAX_PLATFORMS))

            def call(*inputs, _converted=converted):
                return _converted(list(module.weights), *inputs)

            # XlaCallModule is compiled by XLA anyway; no jit_compile flag needed.
            tf_fn = tf.function(_named_signature_fn(call, [a for a, _, _ in args]),
                                input_signature=specs, autograph=False)
        else:
            # XLA-compiled like the library's own TF sampling loop (samplers/_compiled.py).
            tf_fn = tf.function(_named_signature_fn(fn, [a for a, _, _ in args]),
                                input_signature=specs, autograph=False, jit_compile=True)
        setattr(module, name, tf_fn)
    # A plain tf.function (no backend code): a constant JSON string.
    module.metadata = tf.function(lambda: {"metadata": tf.constant(meta_json)},
                                  input_signature=[])
    signatures = {"denoise": module.denoise, "metadata": module.metadata}
    if sampler is not None:
        signatures["sample"] = module.sample
    signatures["serving_default"] = signatures.get("sample", module.denoise)
    return module, signatures


def _replace_dir(tmp_dir, out_dir):
    """Move the finished export into place; an existing ``out_dir`` is swapped out first."""
    if os.path.exists(out_dir):
        trash = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp_dir, out_dir)


def export_savedmodel(model, out_dir, sampler=None, use_ema=True, overwrite=False,
                      platforms=None):
    """Write ``model`` (and optionally a full sampler) as a TensorFlow SavedModel.

    Args:
        model: a ``DiffusionModel`` with a static image shape.
        out_dir: directory to create. Written to a temporary sibling and renamed at the end, so
            a crash never leaves a half-written export at ``out_dir``.
        sampler: a ``keras_etsdm.samplers`` sampler (e.g. ``DDIMSampler(50,
            schedule=model.schedule)``) for the ``sample`` signature; None exports only
            ``denoise`` (which is then ``serving_default``).
        use_ema: export the EMA weights (what sampling and evaluation use) instead of the raw
            training weights. The model's own weights are restored afterwards.
        overwrite: replace an existing export at ``out_dir`` (only a directory holding a
            SavedModel, or an empty one, is ever replaced).
        platforms: JAX only: jax2tf lowering platforms (default ``("cpu", "cuda")``).

    Returns:
        The metadata dictionary stored in the export.

    Raises:
        ExportError: torch (or another non-TF/JAX) backend; ``out_dir`` is not an export;
            sampler built for another schedule.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    check_export_backend()
    _check_exportable(model, sampler)
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_out_dir(out_dir, overwrite)
    meta = export_metadata(model, sampler, use_ema=use_ema, platforms=platforms)
    meta_json = json.dumps(meta, indent=1, sort_keys=True)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        # Inside the scope the network holds the EMA weights: on JAX they are copied into new
        # tf.Variables, on TF the network's own variables are written by the save.
        with model.ema_scope(use_ema):
            import tensorflow as tf

            module, signatures = _build_module(model, sampler, meta_json, platforms)
            tf.saved_model.save(module, tmp_dir, signatures=signatures)
        extra = os.path.join(tmp_dir, METADATA_DIR)
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, METADATA_FILE), "w") as f:
            f.write(meta_json)
        check_out_dir(out_dir, overwrite)  # it may have appeared while we were tracing
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def read_export_metadata(export_dir):
    """The metadata dictionary of an export (from its JSON file; needs no TensorFlow)."""
    path = os.path.join(os.fspath(export_dir), METADATA_DIR, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {export_dir!r} is not a keras_etsdm export.")
    with open(path) as f:
        return json.load(f)
