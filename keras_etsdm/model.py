"""``DiffusionModel``: a diffusion model with E-TSDM time sharing, trained by ``fit``.

The network never sees the raw time label: ``denoise(x_t, t, y) = network(x_t, sharing(t), y)``
is the single seam through which training, every sampler (compiled on every backend), the
Lipschitz diagnostic and export reach the network, so E-TSDM lives in one place and the DDPM
baseline (``TimestepSharing(0, 0)``) shares all other code. A subclass that overrides
``denoise`` changes all of them at once.

The network predicts ε (default), v or x0 (``prediction_type``, see
``keras_etsdm.parameterization``); ``denoise`` returns that native prediction and every consumer
converts it with the α, σ of the state it holds, so the seam stays one network call.

Class-conditional models (``num_classes=K``) train on ``(images, labels)`` with label dropout
(``class_dropout``) to the null class ``K``, which is what classifier-free guidance
(``keras_etsdm.guidance``) queries for its unconditional branch.
"""

import contextlib
import numbers

import keras
import numpy as np
from keras import ops

from keras_etsdm import backend as etsdm_backend
from keras_etsdm.callbacks import StopOnNonFiniteLoss
from keras_etsdm.guidance import sampling_inputs
from keras_etsdm.parameterization import check_prediction_type
from keras_etsdm.schedules import DiscreteVPSchedule
from keras_etsdm.time_sharing import TimestepSharing
from keras_etsdm.unet import check_num_classes, network_num_classes


def ema_decay_at(step, decay):
    """EMA decay with warm-up: ``min(decay, (1 + k) / (10 + k))`` after ``k`` updates.

    Without warm-up a 2,000-step run with decay 0.999 would still hold 13.5 % of the random
    initial weights; with it the EMA tracks the weights closely early on.
    """
    step = ops.cast(step, "float32")
    return ops.minimum(ops.cast(decay, "float32"), (1.0 + step) / (10.0 + step))


@keras.saving.register_keras_serializable(package="keras_etsdm")
class DiffusionModel(keras.Model):
    """A DDPM-style diffusion model (ε-, v- or x0-prediction) with the E-TSDM shared time
    condition.

    Args:
        network: a Keras model ``{"x": [B,H,W,C], "t": [B]} -> prediction [B,H,W,C]`` (see
            ``keras_etsdm.build_unet``).
        schedule: a ``DiscreteVPSchedule`` (default: linear β 1e-4..0.02, T = 1000; time
            labels 0..T−1) or a ``ContinuousVPSchedule`` (continuous time t ∈ [eps, T]: the
            training draw is ``t ~ U(eps, T)`` and the network sees ``(N − 1)·f(t)``).
        sharing: a ``TimestepSharing``; None (default) is E-TSDM with the paper's t̃ = T/10
            (100 of T = 1000) and n = 5 (``TimestepSharing.default_for``), as in
            ``build_model`` and gin; on a continuous schedule t̃ = 0.1, n = 5.
            ``TimestepSharing(0, 0)`` is the DDPM baseline.
        ema_decay: decay of the exponential moving average of the weights (0.9999); the EMA is
            updated after every training step with warm-up (``ema_decay_at``).
        seed: seed of the ``keras.random.SeedGenerator`` that draws t and ε in training.
        num_classes: K for a class-conditional model (the network must take a ``"y"`` input,
            ``build_unet(num_classes=K)``); inferred from the network when None. Class ids are
            ``0..K−1``; ``null_id = K`` means "no label".
        class_dropout: probability with which a training label is replaced by the null class
            (classifier-free guidance training; Ho & Salimans use 0.1–0.2).
        prediction_type: what the network predicts: "epsilon" (ε, default), "v"
            (``v = α ε − σ x0``, Salimans & Ho 2022) or "x0" (the clean image). Only the
            training target changes (same loss, same draws of t and ε); ``denoise`` returns this
            prediction and the samplers convert it (``keras_etsdm.parameterization``). A
            schedule with ``zero_terminal_snr`` needs "v" or "x0".
        min_snr_gamma: None (default): the plain MSE of the paper (every t weighted alike).
            A number γ > 0: Min-SNR-γ loss weighting (Hang et al., ICCV 2023), which weights
            each example's MSE by ``min(SNR_t, γ) / SNR_t`` (ε-prediction), ``min(SNR_t, γ) /
            (SNR_t + 1)`` (v) or ``min(SNR_t, γ)`` (x0), ``SNR_t = α_t² / σ_t²`` of the TRUE t,
            so that the many low-noise steps stop dominating the gradient; γ = 5 is the paper's
            choice. Only the weights change (same draws of t and ε), and E-TSDM is unaffected:
            the sharing acts on the network's time input, the weight on the true t.

    Calling the model on clean images ``x0 [B,H,W,C]`` in [−1, 1] (conditional models:
    ``{"x0": images, "y": int labels [B]}``) draws ``t ~ U{0..T−1}`` (continuous schedules:
    ``t ~ U(eps, T)``) and ``ε ~ N(0, I)``, noises
    with the TRUE t and returns ``{"noise": ε, "target": target, "prediction": p}`` with
    ``target`` ε, ``α_t ε − σ_t x0`` or x0 per ``prediction_type`` and ``p`` the network
    output; ε-prediction models also keep their historical key ``"noise_pred"`` (= p). ``fit``
    / ``evaluate`` apply the compiled loss (default ``MeanSquaredError``) to target and p.
    ``fit`` takes images (unconditional) or ``(images, labels)`` (conditional), as arrays or a
    ``tf.data`` pipeline. For inference use ``denoise`` and the samplers.
    """

    def __init__(self, network, schedule=None, sharing=None, ema_decay=0.9999, seed=0,
                 num_classes=None, class_dropout=0.1, prediction_type="epsilon",
                 min_snr_gamma=None, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.schedule = schedule if schedule is not None else DiscreteVPSchedule()
        self.prediction_type = check_prediction_type(prediction_type)
        if getattr(self.schedule, "zero_terminal_snr", False) and prediction_type == "epsilon":
            raise ValueError(
                "A zero_terminal_snr schedule has α = 0 at its last label, where x_t is pure "
                "noise: an ε-prediction network could only return its input and x̂0 = (x − σε̂)/α "
                "is undefined. Use prediction_type='v' (or 'x0') with zero_terminal_snr.")
        if sharing is None:
            sharing = self.schedule.default_sharing()
        self.schedule.check_sharing(sharing)
        self.sharing = sharing
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        self.ema_decay = float(ema_decay)
        self.seed = seed
        check_num_classes(num_classes)
        network_classes = network_num_classes(network)
        if num_classes is None:
            num_classes = network_classes
        elif network_classes != num_classes:
            raise ValueError(
                f"DiffusionModel(num_classes={num_classes}) needs a network with a class input "
                f"for {num_classes} classes, but the network has "
                f"{'none' if network_classes is None else network_classes}; build it with "
                f"build_unet(..., num_classes={num_classes}).")
        self.num_classes = None if num_classes is None else int(num_classes)
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}.")
        self.class_dropout = float(class_dropout)
        if min_snr_gamma is not None and not (
                isinstance(min_snr_gamma, numbers.Real) and not isinstance(min_snr_gamma, bool)
                and np.isfinite(min_snr_gamma) and min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be None (unweighted MSE) or a number > 0 "
                             f"(5 is the Min-SNR paper's choice), got {min_snr_gamma!r}.")
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self._default_loss = keras.losses.MeanSquaredError()
        self.seed_generator = etsdm_backend.ReplicaSeedGenerator(seed, name="train_noise")
        input_shape = network.input["x"].shape if isinstance(network.input, dict) else None
        self.image_shape = tuple(input_shape[1:]) if input_shape is not None else None
        self._network_weights = list(network.trainable_variables)
        # The EMA starts at the weights, copied without a compiled op per weight shape on JAX.
        self.ema_weights = [
            self.add_weight(shape=w.shape, initializer=etsdm_backend.copy_initializer(w),
                            trainable=False, name=f"ema_{i}", aggregation="only_first_replica")
            for i, w in enumerate(self._network_weights)
        ]
        self.ema_updates = self.add_weight(shape=(), initializer="zeros", dtype="float32",
                                           trainable=False, name="ema_updates",
                                           aggregation="only_first_replica")
        self.built = True

    # ----- the seam -------------------------------------------------------------------------
    @property
    def conditional(self):
        """True for a class-conditional model (``num_classes`` set)."""
        return self.num_classes is not None

    @property
    def null_id(self):
        """The class id meaning "no label" (``num_classes``); None for unconditional models."""
        return self.num_classes

    def check_labels(self, labels, allow_null=True):
        """Validate concrete class labels (python / numpy); returns int32 numpy ``[N]``.

        Raises ``ValueError`` for an unconditional model, non-integer labels or ids outside
        ``[0, K−1]`` (``[0, K]`` with ``allow_null``: K is the null class).
        """
        if not self.conditional:
            raise ValueError("Class labels were given but this model is unconditional "
                             "(num_classes=None); build it with num_classes=K to train and "
                             "sample with labels.")
        values = np.asarray(labels)
        if values.dtype.kind not in "iu" and not (
                values.dtype.kind == "f" and np.all(np.equal(np.mod(values, 1), 0))):
            raise ValueError(f"Class labels must be integers, got {labels!r}.")
        values = values.astype(np.int64).reshape(-1)
        high = self.num_classes if allow_null else self.num_classes - 1
        bad = values[(values < 0) | (values > high)]
        if bad.size:
            null = f"; {self.num_classes} = null / unconditional" if allow_null else ""
            raise ValueError(f"Class label {int(bad[0])} is out of range: this model has "
                             f"{self.num_classes} classes (ids 0..{self.num_classes - 1}{null}).")
        return values.astype(np.int32)

    def _label_input(self, y, batch):
        if not self.conditional:
            if y is not None:
                self.check_labels(y)  # raises: labels for an unconditional model
            return None
        if y is None:
            return ops.full((batch,), self.null_id, dtype="int32")
        if not ops.is_tensor(y):
            y = self.check_labels(y)
        y = ops.cast(y, "int32")
        if len(y.shape) == 0:
            y = ops.broadcast_to(y, (batch,))
        return y

    def denoise(self, x_t, t, y=None, training=False):
        """The network's prediction for noisy images — the one seam between the network and
        everything else.

        Args:
            x_t: ``[B, H, W, C]`` noisy images.
            t: float time labels in ``[0, T−1]`` (a ``ContinuousVPSchedule``: times in
                ``[eps, T]``), shape ``[B]`` or a scalar (broadcast). The E-TSDM map acts on
                this coordinate; the network then gets ``schedule.network_time(f(t))`` (the
                label itself, or ``(N − 1)·f(t)`` in continuous time).
            y: class-conditional models only: int class ids ``[B]`` or a scalar; None or the
                null id (``num_classes``) is unconditional.
        Returns:
            ``[B, H, W, C]`` native prediction ``net_θ(x_t, f(t), y)`` with f the E-TSDM map:
            ε̂, v̂ or x̂0 per ``self.prediction_type`` (convert with
            ``parameterization.to_eps_and_x0`` and the α, σ of the TRUE t).
        """
        x_t = ops.convert_to_tensor(x_t)
        if not ops.is_tensor(t):
            self.schedule.check_times(t)  # concrete values: a clear error, not a silent fit
        t = ops.convert_to_tensor(t, dtype="float32")
        batch = ops.shape(x_t)[0]
        if len(t.shape) == 0:
            t = ops.broadcast_to(t, (batch,))
        inputs = {"x": x_t, "t": self.schedule.network_time(self.sharing(t))}
        y = self._label_input(y, batch)
        if y is not None:
            inputs["y"] = y
        return self.network(inputs, training=training)

    def _check_images(self, x0):
        if len(x0.shape) != 4:
            raise ValueError(f"DiffusionModel expects images of shape [B, H, W, C], got a tensor "
                             f"of rank {len(x0.shape)} with shape {tuple(x0.shape)}.")
        if self.image_shape is not None:
            expected = self.image_shape
            got = tuple(x0.shape[1:])
            if any(e is not None and g is not None and e != g for e, g in zip(expected, got)):
                raise ValueError(f"DiffusionModel expects images of shape [B, {expected[0]}, "
                                 f"{expected[1]}, {expected[2]}] (H, W, C), got {tuple(x0.shape)}."
                                 f" Check the image size and channel count of the data.")

    def call(self, x0, training=False):
        y = None
        if isinstance(x0, dict):
            x0, y = x0["x0"], x0.get("y")
        self._check_images(x0)
        x0 = ops.cast(x0, self.compute_dtype)
        batch = ops.shape(x0)[0]
        t = self.schedule.training_labels(batch, self.seed_generator)
        noise = keras.random.normal(ops.shape(x0), seed=self.seed_generator,
                                    dtype=self.compute_dtype)
        x_t = self.schedule.q_sample(x0, t, noise)
        if self.conditional and y is None:  # Keras' symbolic build calls with images only
            y = ops.full((batch,), self.null_id, dtype="int32")
        elif y is not None:
            y = ops.cast(ops.reshape(y, (-1,)), "int32")
            if training and self.class_dropout > 0.0:
                # Drawn after t and ε, so those streams equal an unconditional model's.
                drop = keras.random.uniform((batch,), seed=self.seed_generator) \
                    < self.class_dropout
                y = ops.where(drop, ops.full_like(y, self.null_id), y)
        prediction = self.denoise(x_t, ops.cast(t, "float32"), y=y, training=training)
        weight = {} if self.min_snr_gamma is None else {"weight": self.loss_weight(t)}
        if self.prediction_type == "epsilon":
            return {"noise": noise, "noise_pred": prediction, "target": noise,
                    "prediction": prediction, **weight}
        # α, σ of the TRUE t as in q_sample; no extra random draws, so
        # t and ε are the draws an ε model makes with the same seed.
        return {"noise": noise, "target": self._target(x0, t, noise), "prediction": prediction,
                **weight}

    def loss_weight(self, t):
        """Per-example loss weight ``[B]`` (float32) at TRUE times ``t [B]``: Min-SNR-γ
        (``min_snr_gamma``), or ones when the model trains with the plain MSE."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = ops.cast(alpha, "float32"), ops.cast(sigma, "float32")
        if self.min_snr_gamma is None:
            return ops.ones_like(alpha)
        snr = ops.square(alpha) / ops.square(sigma)  # σ > 0 at every label ε / v / x0 train on
        clipped = ops.minimum(snr, self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v":
            return clipped / (snr + 1.0)
        return clipped

    def _target(self, x0, t, noise):
        """v = α_t ε − σ_t x0 or x0 (the regression target of a v / x0 model)."""
        if self.prediction_type == "x0":
            return x0
        alpha, sigma = self.schedule.alpha_sigma_like(t, x0)  # the α, σ q_sample used
        return alpha * noise - sigma * x0

    def _pack_labels(self, data):
        """``(images, labels)`` → ``({"x0": images, "y": labels},)`` for conditional models.

        Keras hands ``fit``'s second element to the loss as a target; here it is the class
        condition, so it is moved into the model's input before ``train_step`` unpacks it.
        """
        first = data[0] if isinstance(data, (tuple, list)) and data else data
        if isinstance(first, dict):  # already {"x0": images, "y": labels}
            return data
        labels = data[1] if isinstance(data, (tuple, list)) and len(data) > 1 else None
        if labels is None:
            if self.conditional:
                raise ValueError(
                    f"This model is class-conditional ({self.num_classes} classes): train it "
                    f"on (images, labels), e.g. model.fit(images, labels) or a tf.data "
                    f"pipeline of (images, labels) pairs.")
            return data
        if not self.conditional:
            raise ValueError("fit / evaluate got (images, labels) but this model is "
                             "unconditional (num_classes=None): pass images only, or build the "
                             "model with num_classes=K.")
        packed = {"x0": data[0], "y": labels}
        return (packed,) if len(data) < 3 else (packed, None, data[2])  # keep sample weights

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Loss between ``y_pred["target"]`` (ε, v or x0) and the network's prediction: the
        compiled loss, or ``MeanSquaredError`` when none was given.

        A ``keras.losses.Loss`` object (not a bare mean) so that ``tf.distribute`` scales it by
        the number of replicas correctly.
        """
        target = y_pred["target"]
        prediction = ops.cast(y_pred["prediction"], "float32")
        if "weight" in y_pred:  # per example [B] → per pixel [B, H, W] (MSE averages channels)
            per_example = (-1,) + (1,) * (len(target.shape) - 2)
            weight = ops.broadcast_to(ops.reshape(y_pred["weight"], per_example),
                                      ops.shape(target)[:-1])
            if sample_weight is not None:
                weight = weight * ops.reshape(ops.cast(sample_weight, "float32"), per_example)
            sample_weight = weight
        if self._compile_loss is not None:
            return super().compute_loss(x=x, y=target, y_pred=prediction,
                                        sample_weight=sample_weight, training=training)
        loss = self._default_loss(target, prediction, sample_weight)
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y_pred["target"], y_pred["prediction"], sample_weight)

    # ----- EMA ------------------------------------------------------------------------------
    @staticmethod
    def _ema_decrement(ema, weight, decay):
        """(1 − β)(e − w): e − this = β·e + (1 − β)·w. The one expression of both the
        functional (JAX) and the in-place update, so both backends round alike."""
        return ops.cast(1.0 - decay, ema.dtype) * (ema - ops.cast(weight, ema.dtype))

    def _ema_new_values(self, ema_values, weight_values, count):
        decay = ema_decay_at(count, self.ema_decay)
        new = [e - self._ema_decrement(e, w, decay) for e, w in zip(ema_values, weight_values)]
        return new, count + 1.0

    def update_ema(self):
        """Stateful EMA update (TensorFlow / torch train steps, or by hand), in place:
        ``ema -= (1 − β)(ema − w)``. One temporary per weight fewer than assigning
        ``β·ema + (1 − β)·w``: TensorFlow's training peak RSS on the CIFAR-10 U-Net −109 MiB
        (benchmarks/results/memory_ema_in_place)."""
        decay = ema_decay_at(self.ema_updates.value, self.ema_decay)
        for ema, w in zip(self.ema_weights, self._network_weights):
            ema.assign_sub(self._ema_decrement(ema.value, w.value, decay))
        self.ema_updates.assign(self.ema_updates.value + 1.0)

    def train_step(self, *args, **kwargs):
        if etsdm_backend.backend_name() == "jax":
            return self._jax_train_step(*args, **kwargs)
        data, = args
        logs = super().train_step(self._pack_labels(data), **kwargs)
        self.update_ema()
        return logs

    def test_step(self, *args, **kwargs):
        if etsdm_backend.backend_name() == "jax":
            state, data = args
            return super().test_step(state, self._pack_labels(data), **kwargs)
        data, = args
        return super().test_step(self._pack_labels(data), **kwargs)

    def _jax_train_step(self, state, data):
        logs, state = super().train_step(state, self._pack_labels(data))
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        index = self._jax_variable_index()
        weight_values = [trainable[i] for i in index["weights"]]
        ema_values = [non_trainable[i] for i in index["ema"]]
        new, count = self._ema_new_values(ema_values, weight_values,
                                          non_trainable[index["count"]])
        non_trainable = list(non_trainable)
        for i, value in zip(index["ema"], new):
            non_trainable[i] = value
        non_trainable[index["count"]] = count
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def _jax_variable_index(self):
        if getattr(self, "_jax_index_cache", None) is None:
            trainable = {id(v): i for i, v in enumerate(self.trainable_variables)}
            non_trainable = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
            self._jax_index_cache = {
                "weights": [trainable[id(w)] for w in self._network_weights],
                "ema": [non_trainable[id(e)] for e in self.ema_weights],
                "count": non_trainable[id(self.ema_updates)],
            }
        return self._jax_index_cache

    def swap_ema_weights(self):
        """Exchange the network's weights with their EMA (calling it twice restores them)."""
        for ema, w in zip(self.ema_weights, self._network_weights):
            tmp = ops.copy(w.value)
            w.assign(ema.value)
            ema.assign(tmp)

    def load_ema_into_network(self):
        """Copy the EMA into the network's weights; ``ema_weights`` keep the EMA as well.

        What the checkpoint loaders do for ``use_ema=True``: afterwards the network holds the
        EMA, and ``sample(use_ema=True)`` (which swaps) still samples the EMA, however often.
        """
        for ema, w in zip(self.ema_weights, self._network_weights):
            w.assign(ema.value)

    @contextlib.contextmanager
    def ema_scope(self, use_ema=True):
        """Context in which the network holds its EMA weights (``use_ema=False``: no-op)."""
        if not use_ema:
            yield self
            return
        self.swap_ema_weights()
        try:
            yield self
        finally:
            self.swap_ema_weights()

    def _make_function(self, step_function, *args, **kwargs):
        # Both trainers build their train / test functions here. JAX: the first call of the
        # jitted step compiles it, gives the compiler's freed memory back, then runs
        # (backend.compile_then_release). TensorFlow traces and compiles inside the first
        # call, so the freed memory is given back after it (backend.run_then_release). JAX's
        # training step on the CPU takes its own compiler options where the user set them
        # (backend.with_train_compiler_options).
        step_function = etsdm_backend.with_train_compiler_options(step_function, self.train_step)
        function = super()._make_function(etsdm_backend.compile_then_release(step_function),
                                          *args, **kwargs)
        return etsdm_backend.run_then_release(function)

    # ----- compile: optimizer state before the first trace ---------------------------------
    def compile(self, *args, **kwargs):
        """``keras.Model.compile``; on TensorFlow it also creates the optimizer's slots.

        Why: without a distribution strategy Keras's TensorFlow trainer creates them inside
        the first trace of the training step, and a ``tf.function`` that creates variables is
        traced a second time: on the CIFAR-10 U-Net the first ``fit`` / ``train_on_batch``
        took 31 s instead of 18 (benchmarks/results/first_call_tf_trace_once). JAX builds them
        before tracing anyway. Skipped while the network is unbuilt (Keras then builds as
        before)."""
        super().compile(*args, **kwargs)
        if (etsdm_backend.backend_name() == "tensorflow" and self.optimizer is not None
                and not self.optimizer.built
                and all(layer.built for layer in self._flatten_layers())):
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    # ----- fit with the non-finite guard ----------------------------------------------------
    def fit(self, *args, callbacks=None, stop_on_non_finite=True, **kwargs):
        """``keras.Model.fit`` plus one callback of its own, unless switched off.

        Args:
            stop_on_non_finite: add ``callbacks.StopOnNonFiniteLoss`` (first in the list, unless
                one is already there), which raises ``NonFiniteLossError`` naming the step when
                the loss becomes NaN / inf, so a diverged run stops before a checkpoint can
                hold non-finite weights. False: exactly the callbacks given.
            *args, callbacks, **kwargs: as ``keras.Model.fit``.
        """
        callbacks = list(callbacks or [])
        if stop_on_non_finite and not any(isinstance(c, StopOnNonFiniteLoss) for c in callbacks):
            callbacks.insert(0, StopOnNonFiniteLoss())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    # ----- sampling convenience -------------------------------------------------------------
    def sample(self, sampler, num_samples, seed=0, use_ema=True, labels=None,
               guidance_scale=0.0, **kwargs):
        """Draw ``num_samples`` images with ``sampler`` from seeded Gaussian noise.

        Args:
            sampler: a ``keras_etsdm.samplers`` sampler built on ``self.schedule``.
            num_samples: N.
            seed: seed of the starting noise (``keras.random.normal``).
            use_ema: sample with the EMA weights.
            labels: class-conditional models: an int or N class ids in ``[0, K]`` (K = null,
                unconditional); None samples unconditionally.
            guidance_scale: classifier-free guidance weight w (``ε̂ = (1+w)ε_y − wε_∅``, one
                batched call of 2N per NFE); 0 is no guidance.
            **kwargs: further ``sampler.sample`` arguments (``step_noise``, ``progress``).

        Returns float images ``[N, H, W, C]`` (nominally in [−1, 1]).
        """
        if self.image_shape is None:
            raise ValueError("The network has no static image shape; call sampler.sample "
                             "with your own noise instead.")
        denoiser, conditioning = sampling_inputs(self, num_samples, labels, guidance_scale)
        noise = keras.random.normal((num_samples,) + self.image_shape, seed=seed)
        with self.ema_scope(use_ema):
            return sampler.sample(denoiser, noise, **kwargs, **conditioning)

    # ----- serialisation ----------------------------------------------------------------------
    # The training-noise RNG state is not a layer variable in Keras (seed generators are tracked
    # apart), so it is stored next to the EMA weights: a resumed run draws the same t and ε as
    # an uninterrupted one.
    _SEED_KEY = "train_noise_seed_state"

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[self._SEED_KEY] = etsdm_backend.to_numpy(self.seed_generator.state.value)

    def load_own_variables(self, store):
        keys = list(store.keys())
        if self._SEED_KEY in keys:
            self.seed_generator.state.assign(store[self._SEED_KEY][...])
        super().load_own_variables({k: store[k] for k in keys if k != self._SEED_KEY})

    def get_config(self):
        return {
            "name": self.name,
            "network": keras.saving.serialize_keras_object(self.network),
            "schedule": _part_config(self.schedule, DiscreteVPSchedule),
            "sharing": _part_config(self.sharing, TimestepSharing),
            "ema_decay": self.ema_decay,
            "seed": self.seed,
            # Only for conditional models, so unconditional configs (and the work directories
            # that compare them on resume) are unchanged.
            **({"num_classes": self.num_classes, "class_dropout": self.class_dropout}
               if self.conditional else {}),
            # Likewise only when not the default ε.
            **({"prediction_type": self.prediction_type}
               if self.prediction_type != "epsilon" else {}),
            **({"min_snr_gamma": self.min_snr_gamma} if self.min_snr_gamma is not None else {}),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        config["schedule"] = _part_from_config(config["schedule"], DiscreteVPSchedule)
        config["sharing"] = _part_from_config(config["sharing"], TimestepSharing)
        return cls(**config)


def _part_config(part, base):
    """A schedule / sharing map in the model config: the plain ``get_config()`` dict for the
    library's own class (the format of every earlier checkpoint), a Keras-serialised object for
    a subclass or another registered class, so those round-trip through ``.keras`` too."""
    if type(part) is base:
        return part.get_config()
    return keras.saving.serialize_keras_object(part)


def _part_from_config(config, base):
    if isinstance(config, dict) and "class_name" in config:
        return keras.saving.deserialize_keras_object(config)
    return base.from_config(config)
