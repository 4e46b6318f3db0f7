"""Keras callbacks for the side jobs of training."""

import math

import keras


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
