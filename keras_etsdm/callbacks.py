"""Keras callbacks for the side jobs of training, and the TensorBoard writer they share:
progress / metrics logging, checkpoints, sample grids, held-out quality, a non-finite guard."""

import json
import math
import os
import sys
import time

import keras
import numpy as np

from keras_etsdm.io_utils import image_grid, save_png


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop training with a clear error naming the step where the loss became non-finite."""

    def __init__(self):
        super().__init__()
        self._step = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
            step = int(keras.ops.convert_to_numpy(iterations)) if iterations is not None \
                else self._step
            raise NonFiniteLossError(
                f"Training loss became non-finite ({loss}) at step {step}. Lower the learning "
                f"rate, enable gradient clipping or check the data for NaN/inf values.")


# ----- TensorBoard ---------------------------------------------------------------------------
class SummaryWriter:
    """TensorBoard event files via ``tf.summary.write`` (works whichever Keras backend trains).

    ``tf.summary.scalar`` / ``image`` / ``text`` live in the ``tensorboard`` package, which is not
    a dependency; the raw ``tf.summary.write`` with the plugin metadata those functions would
    attach writes the same records, readable by any TensorBoard.
    """

    def __init__(self, logdir):
        import tensorflow as tf  # here: only training runs write TensorBoard files
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        self._metadata = {
            plugin: summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))
            for plugin in ("scalars", "images", "text")}
        self._writer = tf.summary.create_file_writer(logdir)

    def scalars(self, step, values):
        tf = self._tf
        with self._writer.as_default():
            for name, value in values.items():
                tf.summary.write(name, tf.constant(float(value), tf.float32), step=step,
                                 metadata=self._metadata["scalars"])
        self._writer.flush()

    def image(self, name, image_uint8, step):
        tf = self._tf
        height, width = image_uint8.shape[:2]
        png = tf.io.encode_png(tf.constant(image_uint8, tf.uint8))
        tensor = tf.stack([tf.constant(str(width)), tf.constant(str(height)), png])
        with self._writer.as_default():
            tf.summary.write(name, tensor, step=step, metadata=self._metadata["images"])
        self._writer.flush()

    def text(self, name, text, step=0):
        tf = self._tf
        with self._writer.as_default():
            tf.summary.write(name, tf.constant(text), step=step, metadata=self._metadata["text"])
        self._writer.flush()

    def close(self):
        self._writer.close()


# ----- training-run callbacks (used by keras_etsdm.training) ---------------------------------
# They count global steps themselves (``initial_step + batch + 1``) so that nothing has to read
# model state every step: on JAX, touching ``self.model`` forces a host sync of all variables.


@keras.saving.register_keras_serializable(package="keras_etsdm")
class StepLoss(keras.metrics.Metric):
    """The ε-MSE of the LAST training batch (``fit``'s ``loss`` is a running mean instead).

    Both variables are summed across ``tf.distribute`` replicas, each holding its own batch
    mean with count 1, so the result is the mean over replicas: the global-batch loss.
    """

    def __init__(self, name="step_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable((), initializer="zeros", dtype="float32",
                                       aggregation="sum", name="total")
        self.count = self.add_variable((), initializer="zeros", dtype="float32",
                                       aggregation="sum", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = keras.ops.cast(y_true, "float32")
        y_pred = keras.ops.cast(y_pred, "float32")
        self.total.assign(keras.ops.mean(keras.ops.square(y_true - y_pred)))
        self.count.assign(1.0)

    def result(self):
        return keras.ops.divide_no_nan(self.total, self.count)


def _to_float(x):
    return float(np.asarray(keras.ops.convert_to_numpy(x)))


def current_learning_rate(optimizer):
    """The optimizer's learning rate at its current iteration (python float)."""
    lr = optimizer.learning_rate
    return _to_float(lr)


class TrainingLogger(keras.callbacks.Callback):
    """Progress line, ``metrics.jsonl`` and TensorBoard scalars every ``log_every`` steps.

    The progress line shows step / max_steps, the last-batch loss, learning rate, gradient norm
    (when the optimizer records it), images per second and the ETA. Scalars: ``loss``,
    ``learning_rate``, ``grad_norm``, ``images_per_second``.
    """

    def __init__(self, initial_step, max_steps, global_batch_size, log_every=50,
                 metrics_path=None, summary_writer=None, stream=None, is_chief=True):
        super().__init__()
        self.initial_step = initial_step
        self.max_steps = max_steps
        self.global_batch_size = global_batch_size
        self.log_every = max(1, int(log_every))
        self.metrics_path = metrics_path
        self.summary_writer = summary_writer
        self.stream = stream or sys.stdout
        self.is_chief = is_chief
        self.history = []  # [(step, loss)] of every logged step
        self._last_time = None
        self._last_step = initial_step
        self._start_time = None

    def on_train_begin(self, logs=None):
        self._start_time = self._last_time = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        step = self.initial_step + batch + 1
        if step % self.log_every and step != self.max_steps:
            return
        logs = logs or {}
        loss = float(logs.get("step_loss", logs.get("loss", float("nan"))))
        now = time.perf_counter()
        elapsed = now - self._last_time
        # The first interval includes compilation; report it but it inflates the ETA less
        # than it seems because later intervals replace it.
        images_per_second = (step - self._last_step) * self.global_batch_size / max(elapsed,
                                                                                    1e-9)
        seconds_per_step = elapsed / max(step - self._last_step, 1)
        self._last_time, self._last_step = now, step
        model = self.model  # syncs JAX state: needed for the optimizer's lr and grad norm
        optimizer = model.optimizer
        record = {"step": step, "loss": loss,
                  "learning_rate": current_learning_rate(optimizer),
                  "images_per_second": images_per_second,
                  "seconds_per_step": seconds_per_step}
        grad_norm = getattr(optimizer, "grad_norm", None)
        if grad_norm is not None:
            record["grad_norm"] = _to_float(grad_norm)
        self.history.append((step, loss))
        if not self.is_chief:
            return
        eta = (self.max_steps - step) * seconds_per_step
        line = (f"step {step}/{self.max_steps}  loss {loss:.4f}  "
                f"lr {record['learning_rate']:.2e}  "
                + (f"|g| {record['grad_norm']:.3f}  " if "grad_norm" in record else "")
                + f"{images_per_second:.1f} img/s  {seconds_per_step:.3f} s/step  "
                f"ETA {_format_seconds(eta)}")
        print(line, file=self.stream, flush=True)
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.summary_writer is not None:
            self.summary_writer.scalars(step, {k: v for k, v in record.items() if k != "step"})


def _format_seconds(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Save a checkpoint every ``every`` steps, at the end, and when a stop signal arrived.

    Args:
        save_fn: ``save_fn(model, step)`` writes the checkpoint (atomically).
        initial_step: the global step the run started from.
        every: steps between checkpoints (0: only at the end / on a signal).
        stop_flag: object with a boolean ``requested`` attribute (set by a signal handler);
            when set, the callback saves and stops training after the current step.
    """

    def __init__(self, save_fn, initial_step, every, stop_flag=None):
        super().__init__()
        self.save_fn = save_fn
        self.initial_step = initial_step
        self.every = int(every)
        self.stop_flag = stop_flag
        self.last_saved_step = None
        self.step = initial_step

    def on_train_batch_end(self, batch, logs=None):
        self.step = self.initial_step + batch + 1
        stop = self.stop_flag is not None and self.stop_flag.requested
        if stop or (self.every and self.step % self.every == 0):
            self.save_fn(self.model, self.step)
            self.last_saved_step = self.step
        if stop:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.last_saved_step != self.step and self.step != self.initial_step:
            self.save_fn(self.model, self.step)
            self.last_saved_step = self.step


class SampleGrid(keras.callbacks.Callback):
    """Every ``every`` steps (and at the end) sample a grid from the EMA weights.

    Args:
        grid_fn: ``grid_fn(model, step)`` draws, saves (PNG) and logs the grid.
        initial_step, every: as in ``PeriodicCheckpoint``.
    """

    def __init__(self, grid_fn, initial_step, every, stop_flag=None):
        super().__init__()
        self.grid_fn = grid_fn
        self.stop_flag = stop_flag
        self.initial_step = initial_step
        self.every = int(every)
        self.step = initial_step
        self.last_step = None

    def on_train_batch_end(self, batch, logs=None):
        self.step = self.initial_step + batch + 1
        if self.every and self.step % self.every == 0:
            self.grid_fn(self.model, self.step)
            self.last_step = self.step

    def on_train_end(self, logs=None):
        if self.stop_flag is not None and self.stop_flag.requested:
            return  # stopping on a signal: exit promptly, the checkpoint is what matters
        if self.every and self.last_step != self.step and self.step != self.initial_step:
            self.grid_fn(self.model, self.step)
            self.last_step = self.step


def grid_labels(num_classes, num_samples):
    """Labels for a class grid: one row per class, ``max(1, num_samples // K)`` per row."""
    per_class = max(1, num_samples // num_classes)
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class), per_class


def make_grid_fn(workdir, sampler, num_samples, seed, writer=None, guidance_scale=0.0):
    """``grid_fn(model, step)`` for ``SampleGrid``: EMA samples → ``samples/grid-<step>.png``
    and TensorBoard. Class-conditional models: one row per class (``grid_labels``), guided
    with ``guidance_scale``."""
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

    def grid_fn(model, step):
        if model.conditional:
            labels, columns = grid_labels(model.num_classes, num_samples)
            images = model.sample(sampler, len(labels), seed=seed, use_ema=True, labels=labels,
                                  guidance_scale=guidance_scale)
        else:
            images = model.sample(sampler, num_samples, seed=seed, use_ema=True)
            columns = None
        grid = image_grid(keras.ops.convert_to_numpy(images), columns=columns)
        save_png(os.path.join(workdir, "samples", f"grid-{int(step):08d}.png"), grid)
        if writer is not None:
            writer.image("samples_ema", grid, step)

    return grid_fn


class PeriodicEvaluation(SampleGrid):
    """Every ``every`` steps (and at the end) score the model, e.g. held-out FD / KID; the
    schedule is ``SampleGrid``'s.

    ``eval_fn(model, step)`` returns ``{"metrics": {name: float}, "info": {...}}``; each call
    appends ``{"step", "eval/<name>": value, ..., **info}`` to ``metrics.jsonl``, writes the
    metrics as TensorBoard scalars ``eval/<name>`` and prints one line.

    Args:
        eval_fn: see above (``evaluation.evaluate.sample_quality_fn`` builds one).
        initial_step, every, stop_flag: as in ``SampleGrid`` (no evaluation when stopping on a
            signal: the checkpoint is what matters then).
        metrics_path, summary_writer, stream: where records go (None: not written).
    """

    def __init__(self, eval_fn, initial_step, every, stop_flag=None, metrics_path=None,
                 summary_writer=None, stream=None):
        super().__init__(self._evaluate, initial_step, every, stop_flag)
        self.eval_fn = eval_fn
        self.metrics_path = metrics_path
        self.summary_writer = summary_writer
        self.stream = stream or sys.stdout
        self.records = []

    def _evaluate(self, model, step):
        start = time.perf_counter()
        result = self.eval_fn(model, step)
        metrics = {f"eval/{k}": float(v) for k, v in result["metrics"].items()}
        record = {"step": step, **metrics, **result.get("info", {}),
                  "eval_seconds": time.perf_counter() - start}
        self.records.append(record)
        shown = "  ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items())
        print(f"step {step}  eval: {shown}  ({record['eval_seconds']:.0f} s)",
              file=self.stream, flush=True)
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.summary_writer is not None:
            self.summary_writer.scalars(step, metrics)


class UpdateEMATracks(keras.callbacks.Callback):
    """Step extra EMA tracks (``keras_etsdm.ema.EMATracks``) after every training step; the run
    driver saves them with its checkpoints."""

    def __init__(self, tracks):
        super().__init__()
        self.tracks = tracks

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018 -- on JAX the property syncs the trained state into the variables
        self.tracks.update()
