"""The optimizer of training: Adam with linear warm-up and replica-correct gradient clipping.

``make_optimizer`` is the gin entry point (``make_optimizer.learning_rate`` etc.); the classes are
Keras-serialisable, so compiled models save and load with their optimizer.
"""

import keras

from keras_etsdm import backend as etsdm_backend
from keras_etsdm import distribute


@keras.saving.register_keras_serializable(package="keras_etsdm")
class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """``lr · min(1, (step + 1) / warmup_steps)``: linear warm-up, then constant.

    ``step`` is the optimizer's iteration count before the update, so the first update already
    uses ``lr / warmup_steps`` (not 0).
    """

    def __init__(self, learning_rate, warmup_steps=0):
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        lr = keras.ops.convert_to_tensor(self.learning_rate, "float32")
        if self.warmup_steps <= 0:
            return lr
        step = keras.ops.cast(step, "float32")
        return lr * keras.ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))

    def get_config(self):
        return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="keras_etsdm")
class ClippedAdam(keras.optimizers.Adam):
    """Adam that records the global gradient norm and clips by it correctly under replicas.

    ``grad_norm`` (an optimizer variable, checkpointed with the rest) holds the norm of the
    full-batch gradient of the latest step, before clipping. Keras' own ``global_clipnorm``
    clips each ``tf.distribute`` replica's partial gradient before the all-reduce, so the clip
    would depend on the replica count; here the norm is taken of the all-reduced gradient and
    every replica scales its part by the same factor (scaling commutes with the sum).

    On TensorFlow each variable's update is one fused kernel (``backend.fused_adam_update``,
    the same arithmetic as Keras's Adam): a shorter first call (tracing) and a lower peak, at
    the same step speed.

    Args:
        clip_norm: clip the gradient to this global norm (None or 0: no clipping).
        fused: on TensorFlow, update each variable with one fused kernel (not with AMSGrad,
            which keeps Keras's update). False: Keras's update everywhere.
        **kwargs: ``keras.optimizers.Adam`` arguments.
    """

    def __init__(self, clip_norm=None, fused=True, **kwargs):
        super().__init__(**kwargs)
        self.clip_norm = float(clip_norm) if clip_norm else None
        self.fused = bool(fused)

    def build(self, variables):
        if self.built:  # Adam's build is a no-op then; a second grad_norm would be orphaned
            return
        super().build(variables)
        self.grad_norm = self.add_variable((), initializer="zeros", dtype="float32",
                                           aggregation="only_first_replica", name="grad_norm")

    def _clip_gradients(self, grads):
        grads = super()._clip_gradients(grads)
        present = [g for g in grads if g is not None]
        summed = distribute.cross_replica_sum(present)
        norm = keras.ops.sqrt(sum(keras.ops.sum(keras.ops.square(keras.ops.cast(g, "float32")))
                                  for g in summed))
        self.grad_norm.assign(norm)
        if not self.clip_norm:
            return grads
        scale = keras.ops.minimum(1.0, self.clip_norm / keras.ops.maximum(norm, 1e-12))
        return [None if g is None else g * keras.ops.cast(scale, g.dtype) for g in grads]

    def update_step(self, gradient, variable, learning_rate):
        if not (self.fused and not self.amsgrad
                and etsdm_backend.backend_name() == "tensorflow"):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        etsdm_backend.fused_adam_update(
            variable, self._momentums[index], self._velocities[index], gradient,
            self._fused_scalars(learning_rate, variable.dtype))

    def _fused_scalars(self, learning_rate, dtype):
        # Once per step, not per variable: every variable of a step gets the same
        # learning-rate tensor (held here, so no later step's tensor can be the same object).
        cached = getattr(self, "_fused_step", None)
        if cached is None or cached[0] is not learning_rate or cached[1] != dtype:
            scalars = etsdm_backend.fused_adam_scalars(
                learning_rate, self.iterations + 1, self.beta_1, self.beta_2, self.epsilon,
                dtype)
            cached = self._fused_step = (learning_rate, dtype, scalars)
        return cached[2]

    def get_config(self):
        return {**super().get_config(), "clip_norm": self.clip_norm, "fused": self.fused}


def make_optimizer(learning_rate=2e-4, warmup_steps=0, grad_clip_norm=1.0, beta_1=0.9,
                   beta_2=0.999, epsilon=1e-8, weight_decay=None, fused=True):
    """``ClippedAdam`` with a linear warm-up (the DDPM / ADM recipe: Adam, clip 1.0);
    ``fused``: TensorFlow's one-kernel update (``ClippedAdam``)."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
    return ClippedAdam(clip_norm=grad_clip_norm,
                       learning_rate=WarmupConstant(learning_rate, warmup_steps),
                       beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, weight_decay=weight_decay,
                       fused=fused)
