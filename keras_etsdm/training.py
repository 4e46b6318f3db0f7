"""The training run driver: model + data + optimizer + checkpoints + logging, resumable.

``train(workdir, ...)`` trains a ``DiffusionModel`` with ``fit`` and the callbacks of
``keras_etsdm.callbacks``; calling it again with the same ``workdir`` resumes from the latest
checkpoint and continues exactly as an uninterrupted run would (same data batches, same
t / ε / dropout draws, same optimizer and EMA state).

Work directory layout::

    workdir/
      operative_config.gin        the gin configuration in effect (bin/train)
      model_config.json           DiffusionModel config (keras serialisation): rebuilds the model
      metrics.jsonl               one JSON record per logged step (loss, lr, grad norm, speed)
                                  and per evaluation (eval/fd, eval/kid, sampler, N)
      classes.json                class-conditional folder data: the class names, id order
      checkpoints/ckpt-<step>/    atomic checkpoints (``keras_etsdm.checkpoint`` has their layout)
      samples/grid-00001000.png   sample grids (DDIM from the EMA weights)
      tensorboard/                scalars (loss, learning_rate, grad_norm, images_per_second),
                                  sample grids, the operative config as text

Checkpoints, the optimizer and image / file writing live in ``checkpoint``, ``optimizers`` and
``io_utils``; this module builds the model (``build_model``, the gin entry point) and runs it.
The last ``keep_checkpoints`` checkpoints are kept; ``checkpoint.load_model`` rebuilds a model
for sampling / evaluation / export.
"""

import contextlib
import json
import os
import signal
import sys
import threading

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

import keras

from keras_etsdm import callbacks as etsdm_callbacks
from keras_etsdm import backend, distribute, ema, folding, winograd
from keras_etsdm.checkpoint import (
    CLASS_LIST,
    MODEL_CONFIG,
    latest_checkpoint,
    remove_stale_temporaries,
    restore_checkpoint,
    save_checkpoint,
)
from keras_etsdm.data import make_dataset
from keras_etsdm.evaluation import evaluate
from keras_etsdm.io_utils import atomic_write_text
from keras_etsdm.model import DiffusionModel
from keras_etsdm.optimizers import make_optimizer
from keras_etsdm.samplers import DDIMSampler
from keras_etsdm.schedules import DiscreteVPSchedule
from keras_etsdm.time_sharing import TimestepSharing


# ----- model and optimizer ----------------------------------------------------------------
def build_model(image_size=32, channels=1, network_fn=None, schedule=None, sharing=None,
                use_etsdm=True, ema_decay=0.9999, seed=0, num_classes=None, class_dropout=0.1,
                prediction_type="epsilon", min_snr_gamma=None):
    """A ``DiffusionModel`` from its parts (the gin entry point for the model).

    Args:
        image_size, channels: the training images (S, C).
        network_fn: ``network_fn(image_size=, channels=) -> keras.Model``; default
            ``folding.build_network`` with its defaults.
        schedule: ``DiscreteVPSchedule`` (default linear β, T = 1000) or
            ``ContinuousVPSchedule`` (continuous-time training).
        sharing: ``TimestepSharing`` (default ``schedule.default_sharing()``: t̃ = T/10,
            n = 5, or t̃ = 0.1 in continuous time, as ``DiffusionModel``).
        use_etsdm: False trains the DDPM baseline (``TimestepSharing(0, 0)``) with every other
            setting unchanged — the one switch for E-TSDM-vs-DDPM comparisons.
        ema_decay: EMA decay (with warm-up, see ``model.ema_decay_at``).
        seed: seed of the training-noise generator (t and ε).
        num_classes: K for a class-conditional model (``network_fn`` gets ``num_classes=K``;
            the data then must come with labels); None: unconditional.
        class_dropout: probability of training on the null class instead of the label
            (classifier-free guidance).
        prediction_type: what the network predicts, "epsilon" (default), "v" or "x0"
            (``DiffusionModel``); a ``zero_terminal_snr`` schedule needs "v" or "x0".
        min_snr_gamma: None (plain MSE) or γ of Min-SNR-γ loss weighting (``DiffusionModel``).
    """
    network_fn = network_fn or folding.build_network
    class_kwargs = {} if num_classes is None else {"num_classes": num_classes}
    network = network_fn(image_size=image_size, channels=channels, **class_kwargs)
    schedule = schedule if schedule is not None else DiscreteVPSchedule()
    if not use_etsdm:
        sharing = TimestepSharing(0, 0)
    elif sharing is None:
        sharing = schedule.default_sharing()
    return DiffusionModel(network, schedule=schedule, sharing=sharing, ema_decay=ema_decay,
                          seed=seed, num_classes=num_classes, class_dropout=class_dropout,
                          prediction_type=prediction_type, min_snr_gamma=min_snr_gamma,
                          name="diffusion_model")


# ----- samplers of the side jobs ----------------------------------------------------------
def default_grid_sampler(schedule=None, num_steps=20, spacing="uniform"):
    """DDIM (η = 0) with ``num_steps`` steps on the model's schedule (the grids' sampler)."""
    return DDIMSampler(num_steps, spacing=spacing, schedule=schedule)


class _StopFlag:
    requested = False
    signum = None


@contextlib.contextmanager
def _stop_on_signals(flag, enabled=True):
    """SIGINT / SIGTERM set ``flag`` (the run saves and stops); a second SIGINT aborts."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested, flag.signum = True, signum
        print(f"\nReceived {signal.Signals(signum).name}: saving a checkpoint after this step "
              f"(press Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _truncate_metrics(path, step):
    """Drop records after ``step`` (a resumed run rewrites them)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(kept))


def _model_config(model):
    """The model's serialised architecture (no compile settings: those come from gin)."""
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    return config


def _canonical(config):
    return json.dumps(config, sort_keys=True, default=str)


class TrainResult:
    """What ``train`` returns: final ``step``, ``interrupted`` (by a signal, with ``signum``),
    ``history`` ([(step, last-batch loss)] of the logged steps) and ``model``."""

    def __init__(self, step, interrupted, signum, history, model, start_step):
        self.step, self.interrupted, self.signum = step, interrupted, signum
        self.history, self.model, self.start_step = history, model, start_step


LOCK_FILE = ".train.lock"


class WorkdirInUseError(ValueError):
    """Another process is training in the same work directory."""


@contextlib.contextmanager
def workdir_lock(workdir):
    """Hold ``<workdir>/.train.lock`` exclusively (``flock``) while a run trains there.

    Two runs in one work directory would interleave their checkpoints and truncate each other's
    ``metrics.jsonl``; the second one to start gets ``WorkdirInUseError`` instead. The operating
    system releases the lock when the process ends however it ends, so a killed run leaves no
    stale lock. Where ``fcntl`` is missing (Windows) nothing is locked.
    """
    if fcntl is None:
        yield
        return
    with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise WorkdirInUseError(
                f"{workdir!r} is in use: another process (pid {holder}) is training there. Wait "
                f"for it to finish or stop it (it saves a checkpoint on Ctrl-C / SIGTERM), or "
                f"use another work directory.") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # closing the file releases the lock


def _start_ema_tracks(model, workdir, profiles, start_step, stream):
    """``ema.EMATracks`` for ``profiles`` (None when there are none), resumed from the track
    file of ``start_step`` when it holds the same tracks, otherwise started at the current
    weights (said in one line: such tracks average only from ``start_step`` on)."""
    if not profiles:
        return None
    tracks = ema.EMATracks(list(profiles), model._network_weights)
    if start_step and tracks.restore(os.path.join(workdir, ema.TRACKS_DIR), start_step):
        return tracks
    tracks.start()
    if start_step:
        print(f"EMA tracks {list(profiles)} start at step {start_step} (no track file of "
              f"these tracks at that step).", file=stream or sys.stdout, flush=True)
    return tracks


# ----- the run ----------------------------------------------------------------------------
def train(workdir, model_fn=build_model, dataset_fn=None, optimizer_fn=make_optimizer,
          batch_size=64, max_steps=20_000, mixed_precision=None, checkpoint_every=1000,
          keep_checkpoints=3, log_every=50, sample_every=1000, num_grid_samples=64,
          grid_sampler_fn=default_grid_sampler, grid_seed=0, grid_guidance_scale=0.0,
          eval_every=0, eval_num_samples=1000, eval_reference="mnist32_test",
          eval_sampler_fn=default_grid_sampler, eval_seed=0, data_seed=0, distribution="auto",
          seed=0, jit_compile="auto", winograd_training="auto", ema_tracks=(), ema_tracks_keep=0,
          operative_config_fn=None, handle_signals=True, stream=None):
    """Train (or resume) a diffusion model in ``workdir``.

    Args:
        workdir: output directory; if it holds checkpoints the run resumes from the latest.
        model_fn: ``() -> DiffusionModel`` (default ``build_model``).
        dataset_fn: ``dataset_fn(global_batch_size=, image_size=, channels=, seed=,
            start_step=) -> tf.data.Dataset`` of global batches (default
            ``keras_etsdm.data.make_dataset``: the embedded MNIST).
        optimizer_fn: ``() -> keras optimizer`` (default ``make_optimizer``: Adam 2e-4, clip 1).
        batch_size: GLOBAL batch size (all replicas); must divide by the replica count.
        max_steps: train until the optimizer has taken this many steps in total.
        mixed_precision: None / "float32", or "mixed_bfloat16" (float32 variables and loss).
        checkpoint_every, keep_checkpoints: checkpoint period in steps and how many to keep.
        log_every: steps between progress lines / metrics records / TensorBoard scalars.
        sample_every: steps between sample grids (0 disables); ``num_grid_samples`` images
            from ``grid_sampler_fn(schedule)`` (DDIM, 20 steps) with noise seed ``grid_seed``;
            class-conditional models get one row per class, guided with
            ``grid_guidance_scale``.
        eval_every: steps between quality evaluations (0 disables; also one at the end):
            FD and KID of ``eval_num_samples`` EMA samples from ``eval_sampler_fn(schedule)``
            (DDIM-20) with noise seed ``eval_seed`` against ``eval_reference`` (shipped
            statistics such as "mnist32_test", the MNIST test set, or a
            ``fid.ReferenceStatistics``), logged to ``metrics.jsonl`` (``eval/fd``,
            ``eval/kid``, with sampler, N, seed, time) and TensorBoard.
        data_seed: shuffling / flip seed of the input pipeline.
        seed: global seed (``keras.utils.set_random_seed``) for the weight initialisation.
        distribution: see ``keras_etsdm.distribute`` ("auto", "none", "mirrored", ...).
        jit_compile: XLA-compile the train step: True / False, or "auto" (default) for the
            library's measured choice (``backend.default_train_jit_compile``): XLA on JAX and
            on accelerators; TensorFlow on an AVX-512 CPU runs its own graph (oneDNN), which
            was faster there, and XLA on other CPUs.
        winograd_training: run the training step's 3×3 convolutions of 128 or more channels by
            Winograd's F(2×2, 3×3) where XLA compiles for a CPU, as inference does
            (``keras_etsdm.winograd.IN_TRAINING``, set for this call): on the DDPM CIFAR-10
            U-Net on JAX 1.13× [1.10, 1.17] the training speed on an AVX-512 CPU and 1.19–1.25×
            on an AVX2 one, but a first call ~10 s longer and a higher peak (AVX2: 2,564
            instead of 2,405 MiB; README, "Winograd convolutions"). ``"auto"`` (default):
            the library's measured choice (``backend.default_winograd_training``: on for JAX
            on an AVX2 CPU without AVX-512, off elsewhere). An int N (≥ 8) uses it only at
            outputs of at most N×N, e.g. 16 to keep a 32×32 level direct (less memory, less
            speed). No effect where the step is not XLA-compiled (TensorFlow on an AVX-512
            CPU) or on accelerators. Raises ValueError for other values.
        ema_tracks: extra EMA profiles to keep beside the model's own EMA, e.g.
            ``["decay:0.9995", "sigma_rel:0.1"]`` (``keras_etsdm.ema``): updated every step,
            written to ``<workdir>/ema_tracks/step-<step>.npz`` with every checkpoint and
            resumed with it; evaluate one afterwards with ``bin/eval --ema_track=<profile>``.
        ema_tracks_keep: how many track files to keep (0: all, so every checkpoint step can
            be compared afterwards; ~4 bytes × parameters × tracks each).
        operative_config_fn: ``() -> str`` called once the model and data are built; the text is
            written to ``operative_config.gin`` and TensorBoard (bin/train passes
            ``gin.operative_config_str``).
        handle_signals: SIGINT / SIGTERM save a checkpoint and stop (main thread only).
        stream: where progress lines go (default stdout).

    Returns:
        ``TrainResult``.

    Raises:
        WorkdirInUseError: another process is training in ``workdir`` (``workdir_lock``).
    """
    arguments = dict(locals())  # the parameters alone, for _train
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    if not _is_auto(winograd_training):
        winograd.training_setting(winograd_training)  # ValueError now, before the workdir
    os.makedirs(workdir, exist_ok=True)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(mixed_precision or "float32")
    previous_winograd = (winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE)  # _train sets them
    with contextlib.ExitStack() as exit_stack:  # holds the work-directory lock
        try:
            return _train(**arguments, exit_stack=exit_stack)
        finally:
            keras.config.set_dtype_policy(previous_policy)
            winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE = previous_winograd


def _is_auto(value):
    return isinstance(value, str) and value == "auto"


def _winograd_note(network, jit_compile):
    """", 3×3 convolutions by Winograd's algorithm[ up to N×N]" when the step will use them."""
    if not (winograd.IN_TRAINING and jit_compile and winograd.network_uses_it(network)
            and backend.xla_compiles_for_a_cpu()):
        return ""
    size = winograd.TRAINING_MAX_SIZE
    return (", 3×3 convolutions by Winograd's algorithm"
            + (f" up to {size}×{size}" if size is not None else ""))


def _train(workdir, model_fn, dataset_fn, optimizer_fn, batch_size, max_steps, mixed_precision,
           checkpoint_every, keep_checkpoints, log_every, sample_every, num_grid_samples,
           grid_sampler_fn, grid_seed, grid_guidance_scale, eval_every, eval_num_samples,
           eval_reference, eval_sampler_fn, eval_seed, data_seed, distribution, seed,
           jit_compile, winograd_training, ema_tracks, ema_tracks_keep, operative_config_fn,
           handle_signals, stream, exit_stack):
    dataset_fn = dataset_fn or make_dataset
    dist = distribute.setup_distribution(distribution)
    # "auto" asks JAX for its backend, which must wait for a multi-process setup above
    if _is_auto(winograd_training):
        winograd_training = backend.default_winograd_training()
    # read when the step is traced; train() restores them
    winograd.IN_TRAINING, winograd.TRAINING_MAX_SIZE = winograd.training_setting(
        winograd_training)
    if dist.is_chief:  # the chief writes the work directory; one chief at a time
        exit_stack.enter_context(workdir_lock(workdir))
        remove_stale_temporaries(workdir)  # a live writer's temporaries are never removed
    dist.check_global_batch(batch_size)
    keras.utils.set_random_seed(seed)
    with dist.scope():
        model = model_fn()
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"model_fn must return a DiffusionModel, got {type(model).__name__}.")
        if jit_compile == "auto":
            jit_compile = backend.default_train_jit_compile()
        elif not isinstance(jit_compile, bool):
            raise ValueError(f"train.jit_compile must be True, False or 'auto'; got "
                             f"{jit_compile!r}.")
        model.compile(optimizer=optimizer_fn(), metrics=[etsdm_callbacks.StepLoss()],
                      jit_compile=jit_compile)
        model.optimizer.build(model.trainable_variables)

    config_path = os.path.join(workdir, MODEL_CONFIG)
    config = _model_config(model)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        if _canonical(saved) != _canonical(json.loads(_canonical(config))):
            raise ValueError(f"{workdir!r} holds a run of a different model configuration "
                             f"({config_path}); use a new --workdir or the original config.")
    elif dist.is_chief:
        atomic_write_text(config_path, json.dumps(config, indent=1, default=str))

    start_step = 0
    checkpoint = latest_checkpoint(workdir)
    if checkpoint is not None:
        with dist.scope():
            meta = restore_checkpoint(model, checkpoint)
        start_step = int(meta["step"])
        iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        if iterations != start_step:
            raise ValueError(f"Checkpoint {checkpoint} is inconsistent: step {start_step} but "
                             f"the optimizer has taken {iterations} steps.")
        print(f"Resuming from {checkpoint} (step {start_step}).", file=stream or sys.stdout,
              flush=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if dist.is_chief:
        _truncate_metrics(metrics_path, start_step)
    if start_step >= max_steps:
        print(f"Nothing to do: step {start_step} >= max_steps {max_steps}.",
              file=stream or sys.stdout, flush=True)
        return TrainResult(start_step, False, None, [], model, start_step)

    image_size, _, channels = model.image_shape
    class_kwargs = {}
    if model.conditional:  # labelled batches; folder classes pinned by <workdir>/classes.json
        class_kwargs = {"num_classes": model.num_classes,
                        "class_list_path": os.path.join(workdir, CLASS_LIST)}
    dataset = dataset_fn(global_batch_size=batch_size, image_size=image_size, channels=channels,
                         seed=data_seed, start_step=start_step, **class_kwargs)

    writer = (etsdm_callbacks.SummaryWriter(os.path.join(workdir, "tensorboard"))
              if dist.is_chief else None)
    operative_config = operative_config_fn() if operative_config_fn is not None else None
    if operative_config is not None and dist.is_chief:
        atomic_write_text(os.path.join(workdir, "operative_config.gin"), operative_config)
        writer.text("operative_config", "```\n" + operative_config + "\n```", step=start_step)

    flag = _StopFlag()
    logger = etsdm_callbacks.TrainingLogger(start_step, max_steps, batch_size, log_every,
                                            metrics_path if dist.is_chief else None, writer,
                                            stream=stream, is_chief=dist.is_chief)

    tracks = _start_ema_tracks(model, workdir, ema_tracks, start_step, stream)

    def save_fn(m, step):
        if dist.is_chief:
            with dist.process_local():  # the chief saves alone (multi-process JAX)
                if tracks is not None:  # first, so a checkpoint never lacks its tracks
                    tracks_dir = os.path.join(workdir, ema.TRACKS_DIR)
                    tracks.save(tracks_dir, step)
                    tracks.prune(tracks_dir, ema_tracks_keep)
                save_checkpoint(m, workdir, step, keep=keep_checkpoints,
                                extra_meta={"global_batch_size": batch_size,
                                            "num_replicas": dist.num_replicas})

    callbacks = [etsdm_callbacks.StopOnNonFiniteLoss(), logger]
    if tracks is not None:  # before the checkpoint, which saves them
        callbacks.append(etsdm_callbacks.UpdateEMATracks(tracks))
    callbacks.append(etsdm_callbacks.PeriodicCheckpoint(save_fn, start_step, checkpoint_every,
                                                        flag))
    sampler = grid_sampler_fn(model.schedule) if sample_every and dist.is_chief else None
    if sampler is not None:
        grid_fn = etsdm_callbacks.make_grid_fn(workdir, sampler, num_grid_samples, grid_seed,
                                               writer, guidance_scale=grid_guidance_scale)
        callbacks.append(etsdm_callbacks.SampleGrid(grid_fn, start_step, sample_every, flag))
    if eval_every and dist.is_chief:
        eval_fn = evaluate.sample_quality_fn(eval_reference, eval_sampler_fn(model.schedule),
                                             eval_num_samples, eval_seed)
        eval_fn.check(model)  # a wrong reference fails now, not after eval_every steps
        callbacks.append(etsdm_callbacks.PeriodicEvaluation(
            eval_fn, start_step, eval_every, flag, metrics_path, writer, stream))

    # Building left compiled initializers behind (JAX) and freed blocks in the heap: give them
    # back before the first step, whose own peak would stack on top of them.
    backend.release_build_memory()
    print(f"Training {model.network.count_params():,} parameters on {dist.num_replicas} "
          f"replica(s), global batch {batch_size}, steps {start_step} → {max_steps}, "
          f"{'XLA-compiled' if jit_compile else 'not XLA-compiled'} training step"
          f"{_winograd_note(model.network, jit_compile)}.", file=stream or sys.stdout,
          flush=True)
    try:
        with _stop_on_signals(flag, handle_signals):
            model.fit(dataset, epochs=1, steps_per_epoch=max_steps - start_step,
                      callbacks=callbacks, verbose=0, shuffle=False)
    finally:
        if writer is not None:
            writer.close()
    if operative_config_fn is not None and dist.is_chief:  # now also lists the grid sampler
        atomic_write_text(os.path.join(workdir, "operative_config.gin"), operative_config_fn())
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    return TrainResult(step, flag.requested, flag.signum, logger.history, model, start_step)
