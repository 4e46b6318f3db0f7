"""Checkpoints: atomic save, restore matched by variable path, and the one model loader.

Work directory layout (``bin/train``)::

    workdir/
      model_config.json           DiffusionModel config (keras serialisation): rebuilds the model
      classes.json                class-conditional folder data: the class names, id order
      checkpoints/
        ckpt-00001000/
          model.weights.h5        network weights, EMA weights + EMA update count, and the
                                  training-noise RNG state (``DiffusionModel.save_own_variables``)
          optimizer.npz           optimizer variables (iterations, Adam moments, grad norm)
          rng.npz                 every other seed-generator state (e.g. dropout)
          meta.json               step, the path and shape of every optimizer / RNG variable
                                  (restore matches them by path), backend, versions, time

A checkpoint is written into a hidden temporary directory, every file fsync'ed, then renamed to
``ckpt-<step>`` in one ``os.rename``: a kill mid-write leaves the previous checkpoints intact
(stale temporary directories are removed at the next start). A checkpoint file that cannot be
read (truncated, corrupted) is a ``CheckpointError`` naming the file.

``load_model`` is the one loader for sampling, evaluation, the Lipschitz diagnostic and export
(``bin/sample``, ``bin/eval``, ``bin/lipschitz``, ``bin/export``) and for user code. Its EMA
rule: ``ema_weights`` always hold the EMA; with ``use_ema=True`` (default) the network holds a
copy of it, otherwise the raw training weights. So ``model.sample()`` samples the EMA however
often it is called.
"""

import glob
import json
import os
import re
import shutil
import time

import keras
import numpy as np

from keras_etsdm import folding  # noqa: F401  (registers the folding layers for loading)
from keras_etsdm import model as _model  # noqa: F401  (registers DiffusionModel for loading)
from keras_etsdm.io_utils import fsync_path as _fsync_path
from keras_etsdm.io_utils import sha256_file as _sha256

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "ckpt-"
MODEL_CONFIG = "model_config.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
RNG_FILE = "rng.npz"
META_FILE = "meta.json"
CLASS_LIST = "classes.json"
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (names the file)."""


def _checkpoint_name(step):
    return f"{CHECKPOINT_PREFIX}{int(step):08d}"


def list_checkpoints(workdir):
    """Complete checkpoints in ``workdir`` as ``[(step, path)]``, oldest first."""
    root = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            step = int(name[len(CHECKPOINT_PREFIX):])
        except ValueError:
            continue
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, META_FILE)):
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(workdir):
    """Path of the newest complete checkpoint in ``workdir``, or None."""
    checkpoints = list_checkpoints(workdir)
    return checkpoints[-1][1] if checkpoints else None


def _seed_states(model):
    """Seed-generator states that ``save_weights`` does not store (dropout etc.)."""
    weight_ids = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def save_checkpoint(model, workdir, step, keep=3, extra_meta=None):
    """Write checkpoint ``ckpt-<step>`` atomically and keep only the newest ``keep``.

    Holds network weights, EMA weights, optimizer state (if compiled), the training-noise and
    all other seed-generator states, and ``step``. Returns the checkpoint path.
    """
    root = os.path.join(workdir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, _checkpoint_name(step))
    tmp = os.path.join(root, f"{_TMP_PREFIX}{_checkpoint_name(step)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
    optimizer = getattr(model, "optimizer", None)
    optimizer_vars = list(optimizer.variables) if optimizer is not None and optimizer.built \
        else []
    np.savez(os.path.join(tmp, OPTIMIZER_FILE),
             **{f"v{i:05d}": _numpy(v) for i, v in enumerate(optimizer_vars)})
    seeds = _seed_states(model)
    np.savez(os.path.join(tmp, RNG_FILE), **{f"v{i:05d}": _numpy(v) for i, v in enumerate(seeds)})
    meta = {
        "step": int(step),
        "time": time.time(),
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "optimizer_variables": [[v.path, list(v.shape)] for v in optimizer_vars],
        "rng_variables": [[v.path, list(v.shape)] for v in seeds],
        # Checked on restore: a damaged file is an error, never silently wrong weights.
        "sha256": {name: _sha256(os.path.join(tmp, name))
                   for name in (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE)},
        **(extra_meta or {}),
    }
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    for name in os.listdir(tmp):
        _fsync_path(os.path.join(tmp, name))
    _fsync_path(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. resumed and stopped at once)
        trash = os.path.join(root, f"{_TMP_PREFIX}old-{_checkpoint_name(step)}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(root)
    if keep and keep > 0:
        for _, old in list_checkpoints(workdir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(workdir):
    """Delete temporary directories that a killed checkpoint write left behind."""
    root = os.path.join(workdir, CHECKPOINTS)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _normalised_path(path, what):
    # Keras numbers seed generators and optimizers per process (seed_generator_3/,
    # clipped_adam_5/): the rest of the path identifies the variable, the counter only says what
    # else the process built before.
    if what == "optimizer":
        path = path.split("/", 1)[-1]
    return re.sub(r"(^|/)seed_generator(_\d+)?/", r"\1seed_generator/", path)


def _verify(path, meta):
    """Every file against the checksum meta.json recorded (checkpoints since it does)."""
    for name, expected in (meta.get("sha256") or {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"Checkpoint file {file} is missing.")
        if _sha256(file) != expected:
            raise CheckpointError(f"Checkpoint file {file} is damaged (its sha256 differs from "
                                  f"the one recorded when it was written): truncated or "
                                  f"corrupted. Delete {path} to resume from the previous "
                                  f"checkpoint.")


def _load_npz(file):
    try:
        with np.load(file) as saved:
            return {key: saved[key] for key in saved.files}
    except Exception as error:  # zip / npy format errors: truncated or corrupted
        raise CheckpointError(f"Checkpoint file {file} cannot be read ({type(error).__name__}: "
                              f"{error}); it is truncated or corrupted. Delete its checkpoint "
                              f"directory to resume from the previous one.") from error


def _assign_saved(variables, file, recorded, what):
    """Assign the arrays of ``file`` to ``variables``, matched by (normalised) path.

    ``recorded``: ``[[path, shape], ...]`` from meta.json in the order of the keys ``v00000``…;
    None for checkpoints without paths (then by position).
    """
    saved = _load_npz(file)
    keys = sorted(saved)
    if len(keys) != len(variables):
        raise CheckpointError(f"Checkpoint file {file} holds {len(keys)} {what} variables but "
                              f"the model has {len(variables)}; was it written by a different "
                              f"configuration?")
    if recorded is None:
        pairs = list(zip(keys, variables))
    else:
        by_path = {_normalised_path(path, what): key for (path, _), key in zip(recorded, keys)}
        missing = [v.path for v in variables if _normalised_path(v.path, what) not in by_path]
        if missing or len(by_path) != len(keys):
            raise CheckpointError(f"Checkpoint file {file}: {what} variables "
                                  f"{missing[:5] or 'with duplicate paths'} are not in the "
                                  f"checkpoint; was it written by a different configuration?")
        pairs = [(by_path[_normalised_path(v.path, what)], v) for v in variables]
    for key, variable in pairs:
        value = saved[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointError(f"Checkpoint file {file}: {what} variable {variable.path} has "
                                  f"shape {tuple(variable.shape)} but the checkpoint holds "
                                  f"{tuple(value.shape)}.")
        variable.assign(value)


def restore_checkpoint(model, path, restore_optimizer=True):
    """Load a checkpoint written by ``save_checkpoint`` into ``model``; returns its meta dict.

    With ``restore_optimizer`` the model must be compiled; the optimizer is built if needed.
    Raises ``CheckpointError`` naming the file that is unreadable or does not fit.
    """
    meta_file = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META_FILE}).")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        int(meta["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Checkpoint file {meta_file} cannot be read ({error}); it is "
                              f"truncated or corrupted.") from error
    _verify(path, meta)
    weights_file = os.path.join(path, WEIGHTS_FILE)
    try:
        model.load_weights(weights_file)
    except Exception as error:  # h5py / Keras errors on a damaged file
        raise CheckpointError(f"Checkpoint file {weights_file} cannot be loaded "
                              f"({type(error).__name__}: {error}); it is truncated, corrupted "
                              f"or from another model.") from error
    _assign_saved(_seed_states(model), os.path.join(path, RNG_FILE),
                  meta.get("rng_variables"), "RNG")
    if restore_optimizer:
        optimizer = model.optimizer
        if optimizer is None:
            raise ValueError("restore_checkpoint(restore_optimizer=True) needs a compiled model.")
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        _assign_saved(list(optimizer.variables), os.path.join(path, OPTIMIZER_FILE),
                      meta.get("optimizer_variables"), "optimizer")
    return meta


def model_from_workdir(workdir):
    """Rebuild the (untrained) ``DiffusionModel`` described by ``workdir/model_config.json``."""
    path = os.path.join(workdir, MODEL_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a keras_etsdm training "
                                f"work directory (bin/train writes it).")
    with open(path) as f:
        config = json.load(f)
    return keras.saving.deserialize_keras_object(config)


def load_checkpoint(workdir, step=None, use_ema=True):
    """A ``DiffusionModel`` with the weights of a checkpoint in ``workdir``.

    Args:
        workdir: a training work directory.
        step: which checkpoint (default: the latest).
        use_ema: copy the EMA weights into the network (what sampling and evaluation use);
            ``model.ema_weights`` keep the EMA as well. False: the raw training weights.

    Returns:
        ``DiffusionModel`` (not compiled), with attribute ``checkpoint_step``.
    """
    checkpoints = dict(list_checkpoints(workdir))
    if not checkpoints:
        raise FileNotFoundError(f"No checkpoint under {os.path.join(workdir, CHECKPOINTS)}.")
    if step is None:
        step = max(checkpoints)
    if step not in checkpoints:
        raise ValueError(f"No checkpoint for step {step} in {workdir}; available steps: "
                         f"{sorted(checkpoints)}.")
    model = model_from_workdir(workdir)
    restore_checkpoint(model, checkpoints[step], restore_optimizer=False)
    if use_ema:
        model.load_ema_into_network()
    model.checkpoint_step = int(step)
    return model


def load_model(workdir=None, checkpoint=None, step=None, use_ema=True):
    """The one loader: a ``DiffusionModel`` from a work directory or a ``.keras`` file.

    Args:
        workdir: a ``bin/train`` work directory: its newest checkpoint (or ``step``); a work
            directory with only ``checkpoints/*.keras`` files gives the newest of those.
        checkpoint: alternatively a ``.keras`` file written by ``model.save``.
        step: with ``workdir``, which checkpoint (default: the latest).
        use_ema: the network holds a copy of the EMA weights (default) or the raw weights;
            ``ema_weights`` hold the EMA either way (see the module docstring).

    Returns:
        ``DiffusionModel`` (not compiled); ``checkpoint_step`` is set for work directories.

    Raises:
        ValueError: neither or both of ``workdir`` and ``checkpoint``.
        FileNotFoundError: no checkpoint there (with what was looked for).
    """
    if bool(workdir) == bool(checkpoint):
        raise ValueError("Give exactly one of --checkpoint (a .keras file) or --workdir (a "
                         "training directory).")
    if checkpoint:
        checkpoint = os.fspath(checkpoint)
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist (expected a "
                                    f".keras file written by DiffusionModel.save).")
        if not checkpoint.endswith(".keras"):
            raise ValueError(f"checkpoint must be a .keras file saved with model.save, got "
                             f"{checkpoint!r}; for a training work directory use workdir.")
        model = keras.saving.load_model(checkpoint, compile=False)
    elif workdir:
        workdir = os.fspath(workdir)
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"Work directory {workdir!r} does not exist.")
        if list_checkpoints(workdir):
            return load_checkpoint(workdir, step=step, use_ema=use_ema)
        files = sorted(glob.glob(os.path.join(workdir, CHECKPOINTS, "*.keras")),
                       key=os.path.getmtime)
        if not files:
            raise FileNotFoundError(
                f"No checkpoint in work directory {workdir!r} (looked for complete "
                f"{CHECKPOINTS}/{CHECKPOINT_PREFIX}<step> directories and "
                f"{CHECKPOINTS}/*.keras files); train first with bin/train --workdir={workdir}.")
        return load_model(checkpoint=files[-1], use_ema=use_ema)
    if use_ema:
        model.load_ema_into_network()
    return model
