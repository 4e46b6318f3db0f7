"""The library side of the ``bin/`` scripts: each script parses its flags and calls one
function here (``run_sample``, ``run_eval``, ``run_lipschitz``, ``export_checkpoint``), plus
the parsers of the flag values they share (``parse_labels``, ``parse_options``).

Models are loaded with ``checkpoint.load_model`` (the one loader and its EMA rule) and samplers
built with ``samplers.build_sampler`` (the one builder); this module only wires them together.
"""

import ast
import io
import json
import os

import numpy as np

from keras_etsdm import ema, export
from keras_etsdm.checkpoint import load_model
from keras_etsdm.evaluation import evaluate, features, fid, lipschitz
from keras_etsdm.io_utils import atomic_write_bytes, image_grid, save_png, to_uint8
from keras_etsdm.samplers import SAMPLERS, build_sampler, labels_below
from keras_etsdm.samplers.sampling import generate


# ----- flag values ------------------------------------------------------------------------------
def parse_labels(text, num_samples=None, num_classes=None):
    """Class labels for ``num_samples`` samples from a command-line string.

    * ``"3,3,7"``: these labels; with ``num_samples`` (a multiple of their count) repeated
      to fill it, without it one sample per label.
    * ``"balanced"``: ``i mod K`` for sample i (every class equally often; needs K).
    * ``None`` / ``""``: no labels (unconditional); a list or array of ids is taken as is.

    Returns ``(labels int32 [N] or None, N)``.
    """
    if text is None or (isinstance(text, str) and text.strip() == ""):
        return None, num_samples
    if not isinstance(text, str):  # already ids (a list or an array)
        text = ",".join(str(int(v)) for v in np.asarray(text).reshape(-1))
    text = text.strip()
    if text.lower() == "balanced":
        if num_classes is None:
            raise ValueError("--labels=balanced needs a class-conditional model.")
        if num_samples is None:
            raise ValueError("--labels=balanced needs --num_samples.")
        return np.arange(num_samples, dtype=np.int32) % num_classes, num_samples
    try:
        labels = np.asarray([int(v) for v in text.split(",") if v.strip() != ""], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integer class ids or 'balanced', "
                         f"got {text!r}.") from None
    if labels.size == 0:
        return None, num_samples
    if num_samples is None:
        return labels, int(labels.size)
    if num_samples % labels.size:
        raise ValueError(f"--num_samples={num_samples} is not a multiple of the {labels.size} "
                         f"labels given ({text!r}); give one label per sample or a divisor.")
    return np.tile(labels, num_samples // labels.size), num_samples


def parse_options(text):
    """``"order=3,method=singlestep"`` or JSON ``'{"order": 3}'`` → a dict of arguments."""
    if text and text.strip().startswith("{"):
        return json.loads(text)

    options = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"Sampler option {item!r} is not of the form key=value.")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


# ----- bin/sample -------------------------------------------------------------------------------
def write_outputs(images_uint8, output_dir, name="samples", metadata=None):
    """Write ``<name>.npz`` (key ``images``, plus metadata) and ``<name>.png`` atomically."""
    os.makedirs(output_dir, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, images=images_uint8, **{k: np.asarray(v) for k, v in (metadata or {}).items()})
    npz_path = os.path.join(output_dir, f"{name}.npz")
    atomic_write_bytes(npz_path, buf.getvalue())
    png_path = os.path.join(output_dir, f"{name}.png")
    save_png(png_path, image_grid(images_uint8))
    return npz_path, png_path


def run_sample(sampler_name, steps, num_samples, output_dir, checkpoint=None, workdir=None,
               batch_size=64, seed=0, use_ema=True, options=None, progress=False, labels=None,
               guidance_scale=0.0):
    """Everything ``bin/sample`` does. Returns the paths written.

    ``labels``: a ``parse_labels`` string (``"3,3,7"``, ``"balanced"``) or int ids; with
    ``guidance_scale`` w, classifier-free guidance. ``num_samples=None``: one per label (64
    without labels).
    """
    key = str(sampler_name).lower().replace("-", "_")
    if key not in SAMPLERS:  # before the (slow) model load
        raise ValueError(f"Unknown sampler {sampler_name!r}; expected one of {sorted(SAMPLERS)}.")
    model = load_model(workdir=workdir, checkpoint=checkpoint, use_ema=use_ema)
    labels, num_samples = parse_labels(labels, num_samples, model.num_classes)
    num_samples = 64 if num_samples is None else num_samples
    sampler = build_sampler(key, model.schedule, steps, options, model.sharing)
    images = generate(model, sampler, num_samples, batch_size, seed, progress, labels,
                      guidance_scale)
    # An adaptive sampler (pf_ode) chooses its NFE per batch: record every batch's.
    nfe = sampler.nfe_history if getattr(sampler, "adaptive", False) else sampler.num_iterations
    meta = {"sampler": key, "sampler_config": repr(sampler.get_config()), "seed": seed,
            "use_ema": use_ema, "nfe": nfe,
            "guidance_scale": float(guidance_scale)}
    if labels is not None:
        meta["labels"] = labels
    return write_outputs(to_uint8(images), output_dir, metadata=meta)


# ----- bin/eval ---------------------------------------------------------------------------------
EVAL_METRICS = ("fd", "bpd")
DEFAULT_STEPS = 20  # bin/eval's step count for the step-based samplers


def parse_metrics(metrics):
    """``"fd,bpd"`` (or a list) → a tuple of known metric groups, in the given order."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str)
                                         else metrics) if m.strip()]
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown or not names:
        raise ValueError(f"Unknown metric(s) {unknown or metrics!r}; expected a comma-separated "
                         f"subset of {EVAL_METRICS} (fd: FD/FID, KID and classifier score of "
                         f"samples; bpd: bits/dim of data through the PF-ODE).")
    return tuple(dict.fromkeys(names))


def run_eval(sampler="ddim", steps=None, num_samples=1000, stats_path=None, workdir=None,
             checkpoint=None, extractor="classifier_mnist32", inception_path=None,
             batch_size=250, seed=0, use_ema=True, sampler_options=None, output=None,
             save_samples=True, progress=False, labels=None, guidance_scale=0.0, metrics="fd",
             data=None, bpd_num_images=256, bpd_options=None, ema_track=None,
             ema_track_step=None):
    """Score a model; write a provenance JSON.

    ``metrics``: "fd" (default: draw ``num_samples`` samples with ``sampler`` and score them
    against reference statistics), "bpd" (bits per dimension of the first ``bpd_num_images``
    images of ``data`` through the probability-flow ODE, ``evaluation.likelihood``; its own N,
    no sampling; ``bpd_options`` go to ``likelihood.log_likelihood``, e.g. ``{"rtol": 1e-5,
    "probe": "gaussian"}``; the dequantization noise and probes of batch b use the seed
    ``[seed, b]``), or both ("fd,bpd").
    ``steps``: None → 20 for the step-based samplers; must be None for "pf_ode" (adaptive).
    ``ema_track``: score an extra EMA track the run kept (``train.ema_tracks``, e.g.
    ``"sigma_rel:0.1"``) instead of the model's own EMA, from its file at ``ema_track_step``
    (default the newest; ``keras_etsdm.ema``).

    Class-conditional models: ``labels`` (a ``parse_labels`` string — ``"balanced"``
    for every class equally often, ``"3"`` for one class — or int ids) and classifier-free
    guidance ``guidance_scale``; with a project digit classifier as extractor the record also
    holds ``class_agreement`` (fraction of samples the classifier assigns to the requested
    label) overall and per class.

    Returns the result record (dict). The JSON goes to ``output`` (default
    ``<workdir>/eval/<sampler>_<steps>_<ema|raw>_seed<seed>[_w<w>].json``).
    """
    metrics = parse_metrics(metrics)
    if "fd" not in metrics:
        return _run_bpd_only(workdir, checkpoint, use_ema, data, bpd_num_images, batch_size,
                             seed, bpd_options, output)
    key = str(sampler).lower().replace("-", "_")
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}.")
    adaptive = getattr(SAMPLERS[key], "adaptive", False)
    if steps is None and not adaptive:
        steps = DEFAULT_STEPS
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance needs two), got {num_samples}.")
    if "bpd" in metrics:
        _check_bpd_args(data, bpd_num_images)
    stats_path = stats_path or evaluate.default_stats_path(workdir, extractor)
    reference = fid.ReferenceStatistics.load(stats_path)  # fail before sampling, not after
    ex = features.make_extractor(extractor, inception_path)
    if ema_track is not None and (not workdir or not use_ema):
        raise ValueError("An EMA track needs --workdir (its tracks live in <workdir>/ema_tracks) "
                         "and the EMA weights (not --noema).")
    model = load_model(workdir=workdir, checkpoint=checkpoint, use_ema=use_ema)
    weights = "ema" if use_ema else "raw"
    track = {}
    if ema_track is not None:
        track = {"ema_track": ema_track,
                 "ema_track_step": ema.load_ema_track(model, workdir, ema_track, ema_track_step)}
    labels, num_samples = parse_labels(labels, num_samples, model.num_classes)
    sampler_obj = build_sampler(key, model.schedule, steps, sampler_options, model.sharing)
    images = to_uint8(generate(model, sampler_obj, num_samples, batch_size, seed,
                                            progress, labels, guidance_scale))
    scores = fid.evaluate_images(images, ex, reference, batch_size, labels=labels)
    bpd_extra = {}
    if "bpd" in metrics:
        bpd_scores, bpd_extra = compute_bpd(model, data, bpd_num_images, batch_size, seed,
                                            bpd_options)
        scores.update(bpd_scores)
    config = {k: v for k, v in sampler_obj.get_config().items() if k != "schedule"}
    # An adaptive sampler's NFE differs per batch: all of them are recorded, "steps" is the
    # rounded mean (and the file name carries the tolerance instead).
    nfe_history = list(getattr(sampler_obj, "nfe_history", []))
    nfe_steps = (round(float(np.mean(nfe_history))) if adaptive
                 else sampler_obj.num_iterations)
    record = fid.make_result_record(
        metrics=scores, num_samples=num_samples, sampler=key, steps=nfe_steps,
        seed=seed, weights=weights, extractor=ex.name, reference_file=stats_path,
        sampler_config=config, workdir=workdir and os.path.abspath(workdir),
        checkpoint=checkpoint or getattr(model, "checkpoint_step", None),
        extra={"metric_names": {"fd": "FID" if ex.name == "inception_v3"
                                else f"FD ({ex.name})"},
               "reference_count": reference.count,
               "sharing": model.sharing.get_config(),
               "labels_below_t_tilde": labels_below(
                   sampler_obj, model.sharing.t_tilde if model.sharing.enabled else 100.0),
               **({} if not model.conditional else {
                   "num_classes": model.num_classes,
                   "guidance_scale": float(guidance_scale),
                   "class_labels": None if labels is None else
                   {"counts": np.bincount(labels, minlength=model.num_classes + 1).tolist()}}),
               **({"nfe_per_batch": nfe_history} if adaptive else {}),
               **track, **bpd_extra})
    if output is None:
        guided = f"_w{float(guidance_scale):g}" if model.conditional else ""
        steps_tag = f"rtol{sampler_obj.rtol:g}" if adaptive else sampler_obj.num_iterations
        weights_tag = (weights if not track else
                       f"ema-{ema_track.replace(':', '')}-step{track['ema_track_step']}")
        output = os.path.join(workdir or os.path.dirname(stats_path), "eval",
                              f"{key}_{steps_tag}_{weights_tag}_seed{seed}{guided}.json")
    fid.write_result_json(output, record)
    if save_samples:
        write_outputs(images, os.path.dirname(output),
                               name=os.path.splitext(os.path.basename(output))[0] + "_samples")
    record["output"] = output
    return record


def _check_bpd_args(data, num_images):
    if not data:
        raise ValueError("--metrics=bpd needs --data (the images whose likelihood is measured: "
                         "embedded:mnist, embedded:digits, a .npz of uint8 images or a folder).")
    if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 1:
        raise ValueError(f"bpd_num_images must be an integer >= 1, got {num_images!r}.")


def compute_bpd(model, data, num_images, batch_size=250, seed=0, options=None):
    """Bits/dim of the first ``num_images`` images of ``data`` under ``model``'s PF-ODE.

    Returns ``(metrics, extra)``: ``{"bpd": mean, "bpd_std": standard deviation over images}``
    and the provenance (``"bpd"``: N, data, options, dequantization, NFE per batch).
    """
    from keras_etsdm.evaluation import likelihood  # scipy: only for this metric
    from keras_etsdm.guidance import sampling_inputs

    _check_bpd_args(data, num_images)
    options = dict(options or {})
    height, width, channels = model.image_shape
    images = evaluate.load_reference_images(data, height, channels, int(num_images))
    if tuple(images.shape[1:]) != (height, width, channels):
        raise ValueError(f"--data images have shape {tuple(images.shape[1:])}, the model "
                         f"expects {(height, width, channels)}.")
    values, nfes = [], []
    for b, start in enumerate(range(0, images.shape[0], batch_size)):
        batch = images[start:start + batch_size]
        # Unconditional likelihood (a conditional model: its null class).
        denoiser, conditioning = sampling_inputs(model, batch.shape[0])
        bpd, nfe = likelihood.bits_per_dim(denoiser, batch, model.schedule, seed=[seed, b],
                                           **options, **conditioning)
        values.append(bpd)
        nfes.append(int(nfe))
    values = np.concatenate(values)
    extra = {"bpd": {"num_images": int(values.size), "data": data, "options": options,
                     "dequantization": "uniform"
                     if options.get("uniform_dequantization", True) else "none",
                     "nfe": nfes, "seed": seed}}
    return {"bpd": float(np.mean(values)), "bpd_std": float(np.std(values))}, extra


def _run_bpd_only(workdir, checkpoint, use_ema, data, num_images, batch_size, seed, options,
                  output):
    _check_bpd_args(data, num_images)
    model = load_model(workdir=workdir, checkpoint=checkpoint, use_ema=use_ema)
    scores, extra = compute_bpd(model, data, num_images, batch_size, seed, options)
    weights = "ema" if use_ema else "raw"
    record = fid.make_result_record(
        metrics=scores, num_samples=extra["bpd"]["num_images"], sampler="pf_ode",
        steps=round(float(np.mean(extra["bpd"]["nfe"]))), seed=seed, weights=weights,
        extractor="none", reference_file=None, sampler_config=None,
        workdir=workdir and os.path.abspath(workdir),
        checkpoint=checkpoint or getattr(model, "checkpoint_step", None),
        extra={"metric_names": {"bpd": "bits/dim (PF-ODE, uniform dequantization)"},
               "sharing": model.sharing.get_config(), **extra})
    if output is None:
        output = os.path.join(workdir or ".", "eval", f"bpd_{weights}_seed{seed}.json")
    fid.write_result_json(output, record)
    record["output"] = output
    return record


# ----- bin/lipschitz ----------------------------------------------------------------------------
def run_lipschitz(workdirs, data, output_dir, num_images=64, use_ema=True, seed=0,
                  timesteps=None, zoom=200, title=None, label=None, output="epsilon"):
    """K(t) of one or more trained models (name → workdir) on the same data and noise.

    Writes ``lipschitz.csv`` and ``lipschitz.png`` into ``output_dir``; returns the curves.
    Class-conditional models are evaluated at class ``label`` (None: the null class, i.e. the
    unconditional ε̂). ``zoom`` is in network labels; for continuous-time models (K per unit
    of t, one step = one network label 1/(N − 1)) it is converted to t. ``output``: "epsilon"
    (v / x0 models converted to the ε̂ they imply) or "native" (see
    ``lipschitz.model_denoise_fn``).
    """
    curves, zoom_t = {}, None
    for name, workdir in workdirs.items():
        model = load_model(workdir=workdir, use_ema=use_ema)
        if model.schedule.is_continuous:
            zoom_t = zoom / (model.schedule.num_scales - 1)
        size = model.image_shape[0]
        images = evaluate.load_reference_images(data, size)
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(images), min(num_images, len(images)), replace=False)
        x0 = images[np.sort(pick)].astype(np.float32) / 127.5 - 1.0
        fn = lipschitz.model_denoise_fn(model, label=label, output=output)
        curves[name] = lipschitz.lipschitz_curve(fn, x0, model.schedule, timesteps,
                                                 sharing=model.sharing, seed=seed)
    lipschitz.write_lipschitz_outputs(output_dir, curves, zoom=zoom if zoom_t is None else zoom_t,
                                      title=title)
    return curves


# ----- bin/export -------------------------------------------------------------------------------
def export_checkpoint(out_dir, workdir=None, checkpoint=None, step=None, sampler="ddim",
                      steps=50, sampler_options=None, use_ema=True, overwrite=False,
                      platforms=None):
    """Load a checkpoint and export it with a sampler (the library side of ``bin/export``).

    ``sampler=None`` (or "none") exports only ``denoise``. Other arguments as in
    ``checkpoint.load_model``, ``samplers.build_sampler`` and ``export.export_savedmodel``.
    Checks the backend and ``out_dir`` before loading anything. Returns the metadata dictionary.
    """
    export.check_export_backend()
    export.check_out_dir(os.path.abspath(os.fspath(out_dir)), overwrite)
    # Raw AND EMA weights are loaded; export_savedmodel picks by use_ema.
    model = load_model(workdir=workdir, checkpoint=checkpoint, step=step, use_ema=False)
    sampler_obj = None
    if sampler is not None and str(sampler).lower() != "none":
        if getattr(SAMPLERS.get(str(sampler).lower().replace("-", "_")), "adaptive", False):
            raise ValueError(f"Sampler {sampler!r} cannot be exported: its adaptive solver "
                             f"runs in scipy on the host, not as a compiled loop.")
        sampler_obj = build_sampler(sampler, model.schedule, steps, sampler_options,
                                    model.sharing)
    return export.export_savedmodel(model, out_dir, sampler=sampler_obj, use_ema=use_ema,
                             overwrite=overwrite, platforms=platforms)
