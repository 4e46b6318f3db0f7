"""The sampler interface and the compiled loop shared by every sampler.

Using a sampler
---------------
A sampler is configured once and then called on any denoiser::

    sampler = DPMSolverSampler(num_steps=20, order=3, algorithm="dpmsolver++")
    x0 = sampler.sample(model, noise)             # model: a DiffusionModel
    x0 = sampler.sample(eps_fn, noise)            # eps_fn(x [B,...], t [B]) -> eps, keras.ops

``denoiser(x, t)`` returns the network's prediction (shape of ``x``) for float time labels ``t``
of shape ``[B]`` in ``[0, T-1]``: ε̂ by default, or v̂ / x̂0 when the denoiser has a
``prediction_type`` attribute saying so (a ``DiffusionModel`` or ``ClassifierFreeGuidance``
does; a bare callable is taken as ε). The loop converts with the α, σ of the state
(``keras_etsdm.parameterization``). For a ``DiffusionModel`` the sampler calls
``model.denoise``, so E-TSDM time sharing is applied there and the sampler never knows whether
it is on.

The schedule is a constructor argument (``schedule=DiscreteVPSchedule()`` by default) because
every coefficient is precomputed from it when the sampler is built. When the denoiser carries
its own ``.schedule`` (a ``DiffusionModel``), ``sample`` checks that the two agree and raises
otherwise: build the sampler with ``schedule=model.schedule``.

How the loop works
------------------
Every sampler is a sequence of ``num_iterations`` network evaluations (NFE). All per-iteration
coefficients (time labels, α, σ, λ, φ terms, noise scales) are computed once in numpy float64
by ``_make_tables`` and stored as float32 tables of leading dimension ``num_iterations``. The
loop body (``_step``) gathers row ``i`` of the tables, calls the denoiser once and combines
tensors with those scalars; so the loop's own arithmetic is a handful of axpys per NFE and all
the exact math is testable in numpy.

The loop state ("carry") is a tuple of tensors of the sample's shape, created by
``_init_carry(noise)`` and read out by ``_result(carry)``.

Pure building block (for jit / tf.function / jax2tf export)
-----------------------------------------------------------
``loop = sampler.build_loop(denoise_fn, prediction_type="epsilon")`` returns a pure function::

    x0 = loop(noise, seed=None, step_noise=None)

* ``denoise_fn(x, t) -> prediction`` must itself be pure ``keras.ops`` code (e.g. a closure over
  ``network.stateless_call`` with weight values, or ``model.denoise`` under ``tf.function``).
* ``noise``: ``[B, ...]`` float32, the starting sample x_T.
* ``seed``: int32 ``[2]`` tensor; stochastic samplers (DDPM, DDIM with η > 0) draw the noise of
  step ``i`` statelessly from ``fold_in(seed, i)``. Ignored by deterministic samplers.
* ``step_noise``: optional ``[num_iterations, B, ...]`` explicit per-step noise instead of
  ``seed`` (bit-identical runs across backends, golden tests).
The loop has no Python side effects and no variables: it can be traced by ``jax.jit``,
``tf.function`` or ``jax2tf`` and exported whole into a SavedModel.

``sample`` runs the same loop compiled once per (denoiser, backend): on JAX with ``jax.jit``
and the network weights passed as state, on TensorFlow with ``tf.function`` (XLA or, on CPUs
where it measured faster, TensorFlow's own graph: see ``_compiled.py``). The coefficient tables
are INPUTS of the compiled loop (zero-padded to ``T`` rows; the trip count is an input too), not
constants baked into it. Compiled loops are
cached per (denoiser, loop structure) in a module-level LRU, where the structure is the sampler
class plus the options that change the traced loop body (``_trace_key``: e.g. DPM-Solver's order,
algorithm and thresholding, but not its step count, grid or method) plus the denoiser's
prediction type (it changes the conversions in the body). So a second call with the
same shapes does not retrace, and neither does a sampler that only differs in its steps or grid
(sampling at 10, 20 and 50 steps compiles the network's loop once).
"""

import collections
import itertools
import math
import types

import keras
import numpy as np
from keras import ops

from keras_etsdm.parameterization import check_prediction_type, to_eps_and_x0
from keras_etsdm.samplers import _compiled
from keras_etsdm.schedules import ContinuousVPSchedule, DiscreteVPSchedule, schedule_from_config
from keras_etsdm.time_sharing import TimestepSharing

_CACHE_SIZE = 32
# (denoiser key, sampler trace key) -> CompiledSegment, least recently used first.
_COMPILED = collections.OrderedDict()


def clear_compiled_cache():
    """Drop every compiled sampling loop (and the denoisers they keep alive)."""
    _COMPILED.clear()


def _validate_num_steps(num_steps, num_timesteps, name="num_steps"):
    if isinstance(num_steps, bool) or int(num_steps) != num_steps:
        raise ValueError(f"{name} must be an integer, got {num_steps!r}.")
    num_steps = int(num_steps)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"{name} must be between 1 and the number of diffusion timesteps "
                         f"T={num_timesteps}, got {num_steps}.")
    return num_steps


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {tuple(choices)}.")
    return value


class Sampler:
    """Base class: configuration, precomputed tables and the compiled sampling loop.

    Subclasses implement ``_make_tables() -> dict[str, np.ndarray]`` (each of leading dimension
    ``num_iterations``; must contain ``"label"``), ``_init_carry``, ``_step`` and ``_result``,
    and set ``stochastic``. See the module docstring for the contract.

    Args:
        schedule: the ``DiscreteVPSchedule`` or ``ContinuousVPSchedule`` the denoiser was
            trained with (its config dict works too). On a continuous schedule the denoiser is
            called with times t in ``[eps, T]`` (``schedule.label`` is the identity there).
        sharing: None (default) or the model's ``TimestepSharing`` (or its config dict): makes
            the grid sharing-aware (see ``sharing_segments``); the denoiser must then use this
            very sharing map.
        sharing_labels: with ``sharing``, whether samplers that evaluate a step at its piece's
            shared label (DDIM, DPM-Solver) do so (True, default). False keeps the knots (and
            DPM-Solver's restarts) but calls the network at the true labels; the denoiser may
            then share its time condition differently or not at all — the same grid for a
            model without E-TSDM, the control that separates grid from relabelling.
    """

    stochastic = False
    # get_config() keys that only change the coefficient tables, never the traced loop body.
    # Every other key is part of the compiled loop's cache key (safe default for new options).
    _TABLE_ONLY_CONFIG = ("schedule", "sharing")

    def __init__(self, schedule=None, sharing=None, sharing_labels=True):
        if schedule is None:
            schedule = DiscreteVPSchedule()
        if isinstance(schedule, dict):
            schedule = schedule_from_config(schedule)
        if not isinstance(schedule, (DiscreteVPSchedule, ContinuousVPSchedule)):
            raise TypeError(f"schedule must be a DiscreteVPSchedule or a ContinuousVPSchedule, "
                            f"got {type(schedule)}.")
        self.schedule = schedule
        self.sharing = _parse_sharing(sharing, schedule)
        if not isinstance(sharing_labels, bool):
            raise TypeError(f"sharing_labels must be True or False, got {sharing_labels!r}.")
        if not sharing_labels and self.sharing is None:
            raise ValueError("sharing_labels=False keeps a sharing-aware grid's knots without "
                             "its piece labels: it needs sharing (the E-TSDM map of the grid).")
        self.sharing_labels = sharing_labels
        self._loop_tables_cache = None

    # ----- to implement -----------------------------------------------------------------------
    def _make_tables(self):
        raise NotImplementedError

    def _init_carry(self, noise):
        return (noise,)

    def _step(self, denoise_fn, carry, row, step_noise, prediction_type="epsilon"):
        raise NotImplementedError

    def _result(self, carry):
        return carry[0]

    # ----- tables -----------------------------------------------------------------------------
    def _finish_init(self):
        """Build and check the coefficient tables (call at the end of a subclass __init__)."""
        tables = {k: np.asarray(v, dtype=np.float64) for k, v in self._make_tables().items()}
        lengths = {k: v.shape[0] for k, v in tables.items()}
        if len(set(lengths.values())) != 1:
            raise AssertionError(f"inconsistent table lengths {lengths}")
        for key, value in tables.items():
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{type(self).__name__}: non-finite coefficient in {key!r} for "
                                 f"this configuration ({self.get_config()}).")
        self.tables = tables

    @property
    def num_iterations(self):
        """Number of network evaluations (NFE) of one ``sample`` call."""
        return int(self.tables["label"].shape[0])

    @property
    def labels(self):
        """float64 ``[num_iterations]``: the time label of each network evaluation."""
        return self.tables["label"].copy()

    def _trace_key(self):
        """What the traced loop body depends on: class, stochasticity, non-table options."""
        structural = tuple(sorted((k, repr(v)) for k, v in self.get_config().items()
                                  if k not in self._TABLE_ONLY_CONFIG))
        return (type(self), bool(self.stochastic), structural)

    def _float32_tables(self):
        return {k: v.astype(np.float32) for k, v in self.tables.items()}

    def _loop_tables(self):
        """The float32 tables as tensors zero-padded to ``max(T, NFE)`` rows (cached): one
        table shape per schedule, so samplers that differ in steps share a compiled loop. The
        padding rows are never read (the loop stops at ``num_iterations``)."""
        if self._loop_tables_cache is None:
            rows = max(self.schedule.num_timesteps, self.num_iterations)
            padded = {}
            for key, value in self._float32_tables().items():
                table = np.zeros((rows,), np.float32)
                table[:value.shape[0]] = value
                padded[key] = ops.convert_to_tensor(table)
            self._loop_tables_cache = padded
        return self._loop_tables_cache

    # ----- the pure loop ----------------------------------------------------------------------
    def _segment_fn(self, denoise_fn, prediction_type="epsilon"):
        """Pure ``(tables, carry, extra, start, stop) -> carry`` running iterations
        ``start..stop-1``.

        ``tables``: dict of float32 ``[rows]`` coefficient tables, ``rows >= stop`` (constants or
        inputs). ``extra`` is None, an int ``[2]`` seed, or ``{"step_noise": [num_iterations, B,
        ...]}``. ``prediction_type``: what ``denoise_fn`` returns. The body may only depend on
        the options in ``_trace_key`` and on ``prediction_type`` (it is shared by all samplers
        with the same key).
        """

        def segment(tables, carry, extra, start, stop):
            tables = {k: ops.convert_to_tensor(v) for k, v in tables.items()}
            carry = tuple(carry)
            shape = tuple(carry[0].shape)
            if any(d is None for d in shape):
                # Unknown batch under tf.function (a SavedModel signature with batch None):
                # the step noise needs the dynamic shape. (JAX shapes are always concrete or
                # symbolic, never None.)
                shape = ops.shape(carry[0])

            def body(i, carry):
                row = {k: ops.take(v, i, axis=0) for k, v in tables.items()}
                step_noise = None
                if self.stochastic:
                    if isinstance(extra, dict):
                        step_noise = ops.take(extra["step_noise"], i, axis=0)
                    else:
                        step_noise = _compiled.stateless_normal(shape, extra, i, carry[0].dtype)
                return tuple(self._step(denoise_fn, carry, row, step_noise,
                                        prediction_type=prediction_type))

            return ops.fori_loop(start, stop, body, carry)

        return segment

    def _extra(self, seed, step_noise, noise_shape):
        if not self.stochastic:
            return None
        if step_noise is not None:
            step_noise = ops.convert_to_tensor(step_noise, dtype="float32")
            expected = (self.num_iterations,) + tuple(noise_shape)
            if tuple(step_noise.shape) != expected:
                raise ValueError(f"step_noise must have shape {expected} ([num_iterations] + "
                                 f"noise shape), got {tuple(step_noise.shape)}.")
            return {"step_noise": step_noise}
        return seed_tensor(seed)

    def build_loop(self, denoise_fn, prediction_type="epsilon"):
        """A pure ``loop(noise, seed=None, step_noise=None, **conditioning) -> x0`` (see the
        module docstring).

        Args:
            denoise_fn: pure ``keras.ops`` function ``(x [B, ...], t [B] float32,
                **conditioning) -> prediction``; ``conditioning`` (e.g. ``y`` class labels,
                ``guidance_scale``) is passed through at every NFE.
            prediction_type: what ``denoise_fn`` returns: "epsilon" (default), "v" or "x0"
                (given explicitly here: a pure function carries no model to ask).
        """
        self._check_prediction_type(prediction_type)
        tables = self._float32_tables()  # constants of the exported function

        def loop(noise, seed=None, step_noise=None, **conditioning):
            noise = ops.convert_to_tensor(noise, dtype="float32")
            extra = self._extra(0 if seed is None else seed, step_noise, noise.shape)
            segment = self._segment_fn(_compiled._bind(denoise_fn, conditioning),
                                       prediction_type)
            carry = segment(tables, self._init_carry(noise), extra, 0, self.num_iterations)
            return self._result(carry)

        return loop

    # ----- the compiled public entry point ----------------------------------------------------
    def _check_denoiser(self, denoiser):
        schedule = getattr(denoiser, "schedule", None)
        if schedule is not None and hasattr(schedule, "get_config"):
            if schedule.get_config() != self.schedule.get_config():
                raise ValueError(
                    f"{type(self).__name__} was built for {self.schedule.get_config()} but the "
                    f"denoiser uses {schedule.get_config()}; build the sampler with "
                    f"schedule=model.schedule.")
        model_sharing = getattr(denoiser, "sharing", None)
        if self.sharing is not None and self.sharing_labels \
                and isinstance(model_sharing, TimestepSharing) \
                and not same_pieces(model_sharing, self.sharing):
            raise ValueError(
                f"{type(self).__name__} is sharing-aware for {self.sharing!r} but the denoiser "
                f"shares its time condition with {model_sharing!r}; build the sampler with "
                f"sharing=model.sharing (a model without E-TSDM needs sharing=None, or "
                f"sharing_labels=False for the same knots at the true labels).")
        if not callable(denoiser):
            raise TypeError(f"denoiser must be a DiffusionModel or a callable (x, t) -> eps, got "
                            f"{type(denoiser)}.")
        self._check_prediction_type(prediction_type_of(denoiser))

    def _check_prediction_type(self, prediction_type):
        """Known type, and no ε-prediction on a grid that visits α = 0 (a zero-terminal-SNR
        schedule's last label), where x̂0 = (x − σ ε̂)/α is undefined."""
        check_prediction_type(prediction_type)
        alpha = self.tables.get("alpha")
        if prediction_type == "epsilon" and alpha is not None and np.any(alpha == 0.0):
            raise ValueError(
                f"{type(self).__name__} visits a label with α = 0 (zero terminal SNR), where an "
                f"ε-prediction denoiser cannot give x̂0; sample a v- or x0-prediction model "
                f"there, or use a grid that does not start at the last label.")

    def compiled_segment(self, denoiser):
        """The cached ``CompiledSegment`` for ``denoiser`` and this sampler's loop structure
        (built on first use; shared with every sampler of the same ``_trace_key``).

        Call it as ``segment(sampler._loop_tables(), carry, extra, start, stop)``.
        """
        prediction_type = prediction_type_of(denoiser)
        key = (denoiser_cache_key(denoiser), self._trace_key(), prediction_type)
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]

        def make_segment(denoise_fn):
            return self._segment_fn(denoise_fn, prediction_type)

        compiled = _compiled.CompiledSegment(make_segment, denoiser)
        _COMPILED[key] = compiled
        while len(_COMPILED) > _CACHE_SIZE:
            _COMPILED.popitem(last=False)
        return compiled

    def sample(self, denoiser, noise, seed=0, step_noise=None, progress=False,
               **conditioning):
        """Run the sampler from ``noise`` (x_T) to x_0.

        Args:
            denoiser: a ``DiffusionModel`` (its ``denoise`` is used, E-TSDM sharing included), a
                ``ClassifierFreeGuidance`` wrapper, or any callable ``(x [B, ...], t [B] float
                labels in [0, T-1], **conditioning) -> eps`` in keras.ops (a callable with a
                ``prediction_type`` attribute "v" / "x0" returns that prediction instead).
            noise: ``[B, ...]`` starting sample (standard normal for generation).
            seed: int or int ``[2]`` seed of the per-step noise of stochastic samplers.
            step_noise: optional explicit per-step noise ``[num_iterations, B, ...]``.
            progress: show a progress bar (the loop then runs compiled in ~20 chunks).
            **conditioning: tensors handed to the denoiser at every NFE, e.g. ``y`` (int class
                labels ``[B]``) for a conditional model, plus ``guidance_scale`` (a scalar) for
                ``ClassifierFreeGuidance``. Inputs of the compiled loop: new values do not
                recompile. ``model.sample(..., labels=, guidance_scale=)`` builds them for you.
        Returns:
            ``[B, ...]`` float32 samples x_0.
        """
        self._check_denoiser(denoiser)
        noise = ops.convert_to_tensor(noise, dtype="float32")
        if len(noise.shape) < 1 or noise.shape[0] is None:
            raise ValueError(f"noise must have a static shape [B, ...], got {noise.shape}.")
        conditioning = _conditioning_tensors(conditioning, noise.shape[0])
        extra = self._extra(seed, step_noise, noise.shape)
        segment = self.compiled_segment(denoiser)
        tables = self._loop_tables()
        carry = tuple(self._init_carry(noise))
        total = self.num_iterations
        if not progress:
            carry = segment(tables, carry, extra, 0, total, conditioning)
        else:
            bar = keras.utils.Progbar(total, unit_name="NFE")
            chunk = max(1, math.ceil(total / 20))
            for start in range(0, total, chunk):
                stop = min(total, start + chunk)
                carry = segment(tables, carry, extra, start, stop, conditioning)
                bar.update(stop)
        return self._result(tuple(carry))

    # ----- serialisation ----------------------------------------------------------------------
    def get_config(self):
        return {"schedule": self.schedule.get_config(), "sharing": self._sharing_config()}

    def _sharing_config(self):
        return None if self.sharing is None else self.sharing.get_config()

    def _sharing_options(self):
        """``sharing`` (and ``sharing_labels`` when False: earlier configs stay as they were)
        for ``get_config``."""
        options = {"sharing": self._sharing_config()}
        if not self.sharing_labels:
            options["sharing_labels"] = False
        return options

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items()
                         if k != "schedule" and not (k == "sharing" and v is None))
        return f"{type(self).__name__}({args})"


def prediction_type_of(denoiser):
    """What ``denoiser`` predicts: its ``prediction_type`` attribute (a ``DiffusionModel``, a
    ``ClassifierFreeGuidance`` wrapper, a model's bound ``denoise``), else "epsilon"."""
    owner = denoiser.__self__ if isinstance(denoiser, types.MethodType) else denoiser
    return getattr(denoiser, "prediction_type", getattr(owner, "prediction_type", "epsilon"))


def denoiser_cache_key(denoiser):
    """The key under which compiled code for ``denoiser`` is cached: the identity of the
    model / callable (a bound method by its object and function; a wrapper with ``cache_key``,
    e.g. ``ClassifierFreeGuidance``, one per model)."""
    if isinstance(denoiser, types.MethodType):
        return (id(denoiser.__self__), id(denoiser.__func__))
    if hasattr(denoiser, "cache_key"):
        return denoiser.cache_key()
    return id(denoiser)


def _parse_sharing(sharing, schedule):
    if sharing is None:
        return None
    if isinstance(sharing, dict):
        sharing = TimestepSharing.from_config(sharing)
    if not isinstance(sharing, TimestepSharing):
        raise TypeError(f"sharing must be a TimestepSharing (the model's .sharing), its config "
                        f"dict or None, got {type(sharing)}.")
    if not sharing.enabled:
        return None  # the baseline: no pieces, the plain grid
    low, top = schedule.label_range
    if not low < sharing.t_tilde < top:
        raise ValueError(f"sharing t_tilde={sharing.t_tilde} must lie strictly inside the "
                         f"schedule's time labels ({low:g}, {top:g}).")
    return sharing


def same_pieces(a, b):
    """Whether two ``TimestepSharing`` maps have the same pieces (``num_timesteps`` aside)."""
    if not a.enabled or not b.enabled:
        return a.enabled == b.enabled
    return float(a.t_tilde) == float(b.t_tilde) and a.n == b.n


def sharing_segments(sharing, start, end):
    """Split the label interval ``[end, start]`` (walked downwards) at the sharing knots.

    Args:
        sharing: an enabled ``TimestepSharing`` or None (one segment).
        start, end: labels (float), ``start > end``.
    Returns:
        The segment ends, descending: ``[start, t̃, t̃ − Δ, …, Δ, end]`` restricted to the knots
        strictly between ``end`` and ``start``.
    """
    knots = [] if sharing is None else sharing.knots()
    return [float(start)] + [float(k) for k in knots if end < k < start] + [float(end)]


def allocate_steps(lengths, total, caps=None):
    """Split ``total`` steps over segments of the given ``lengths`` (in the grid's variable):
    one step each, then each further step to the segment whose steps are currently longest
    (ties: the earlier one). This minimises the longest step of the grid; a segment never gets
    more than its ``caps`` entry (e.g. the number of integer labels it holds).

    Returns:
        list of ints, one per segment, summing to ``total``.
    """
    lengths = [float(v) for v in lengths]
    caps = [None] * len(lengths) if caps is None else list(caps)
    if total < len(lengths):
        raise ValueError(f"a sharing-aware grid needs at least one step per segment: "
                         f"{len(lengths)} segments, got {total} steps.")
    if sum(total if c is None else c for c in caps) < total:
        raise ValueError(f"{total} steps do not fit into segments holding {caps} labels.")
    counts = [1] * len(lengths)
    for _ in range(total - len(lengths)):
        open_ = [i for i in range(len(lengths)) if caps[i] is None or counts[i] < caps[i]]
        best = max(open_, key=lambda i: (lengths[i] / counts[i], -i))
        counts[best] += 1
    return counts


def sharing_aware_labels(sharing, num_steps, top, end, measure=None, integer=True):
    """Labels of a DDIM/DDPM grid with a knot on every sharing boundary.

    The labels ``[end, top]`` are cut at the knots (``sharing_segments``); each segment
    ``(hi, lo)`` gets ``m`` steps (``allocate_steps`` over its length in ``measure(label)``,
    default the label itself; with ``integer`` at most ``hi − lo``) and visits
    ``hi − j (hi − lo) / m`` (rounded with ``integer``), j = 0..m−1, so every piece boundary is
    visited and no step crosses one.

    Args:
        num_steps: S, the number of labels visited.
        top: the first (largest) label visited (T − 1, or T in continuous time).
        end: where the last step lands: −1 for ᾱ = 1 (x̂0), 0 for label 0 (continuous time:
            0 for ᾱ = 1, or eps).
        integer: discrete labels (int64, rounded); False: float64 continuous times.
    Returns:
        ``[S]`` labels, strictly increasing.
    """
    measure = measure or (lambda label: label)
    segments = list(itertools.pairwise(sharing_segments(sharing, top, end)))
    lengths = [measure(hi) - measure(lo) for hi, lo in segments]
    caps = [round(hi - lo) for hi, lo in segments] if integer else None  # labels in (lo, hi]
    counts = allocate_steps(lengths, num_steps, caps)
    labels = []
    for (hi, lo), m in zip(segments, counts):
        points = [hi - j * (hi - lo) / m for j in range(m)]
        labels.extend([round(p) for p in points] if integer else points)
    labels = np.asarray(labels[::-1], np.int64 if integer else np.float64)
    if np.any(np.diff(labels) <= 0):
        raise AssertionError(f"sharing-aware labels not strictly increasing: {labels}")
    return labels


def explicit_labels(timesteps, schedule):
    """User-given DDIM timesteps → sorted unique labels (int64 in ``[0, T − 1]``; continuous
    schedules: float64 times in ``[eps, T]``), or a ``ValueError`` saying what was wrong."""
    steps = np.asarray(timesteps)
    low, top = schedule.label_range
    if schedule.is_continuous:
        if steps.ndim != 1 or steps.size == 0 or steps.dtype.kind not in "iuf":
            raise ValueError(f"timesteps must be a non-empty list of times, got {timesteps!r}.")
        steps = np.unique(steps.astype(np.float64))
        if steps.size != len(timesteps) or steps[0] < low or steps[-1] > top:
            raise ValueError(f"timesteps must be distinct times in [{low:g}, {top:g}], got "
                             f"{timesteps!r}.")
        return steps
    if steps.ndim != 1 or steps.size == 0 or np.any(steps != np.round(steps)):
        raise ValueError(f"timesteps must be a non-empty list of integers, got {timesteps!r}.")
    steps = np.unique(steps.astype(np.int64))
    if steps.size != len(timesteps) or steps[0] < 0 or steps[-1] > top:
        raise ValueError(f"timesteps must be distinct labels in [0, {top:.0f}], got "
                         f"{timesteps!r}.")
    return steps


def _conditioning_tensors(conditioning, batch):
    """Conditioning values → tensors (ints → int32, floats → float32); batched ones (rank >= 1)
    must have ``batch`` rows."""
    tensors = {}
    for key, value in conditioning.items():
        array = np.asarray(keras.ops.convert_to_numpy(value)) if ops.is_tensor(value) \
            else np.asarray(value)
        dtype = "int32" if array.dtype.kind in "iub" else "float32"
        if array.ndim >= 1 and array.shape[0] != batch:
            raise ValueError(f"Conditioning input {key!r} has {array.shape[0]} rows for a batch "
                             f"of {batch} samples; give one per sample.")
        tensors[key] = ops.convert_to_tensor(array, dtype=dtype)
    return tensors


def labels_below(sampler, t_tilde):
    """The distinct network labels ``sampler`` evaluates inside ``[0, t̃)``, ascending, rounded
    to 3 decimals: with E-TSDM those are the labels whose time condition is shared."""
    labels = np.asarray(sampler.labels, np.float64)
    return sorted({round(float(v), 3) for v in labels[labels < t_tilde]})


def seed_tensor(seed):
    """An int or ``[2]`` seed → int32 ``[2]`` tensor (``[seed, 0]`` for an int)."""
    if isinstance(seed, (int, np.integer)):
        seed = [int(seed) & 0x7FFFFFFF, 0]
    return ops.convert_to_tensor(seed, dtype="int32")


def broadcast_label(label, x):
    """A scalar time label → float32 ``[B]`` for the denoiser."""
    return ops.broadcast_to(ops.cast(label, "float32"), (ops.shape(x)[0],))


def predict_eps_and_x0(denoise_fn, x, row, clip_x0=False, prediction_type="epsilon"):
    """One network call at ``row["label"]`` → ``(ε̂, x̂0)`` (``parameterization.to_eps_and_x0``
    with the row's α, σ: for ε ``x̂0 = (x − σ ε̂) / α``; v and x0 are exact at α = 0).

    With ``clip_x0``, x̂0 is clipped to [−1, 1] and ε̂ recomputed to match it. Shared by the
    DDPM and DDIM steps (``row`` holds the step's ``label``, ``alpha`` and ``sigma``).
    """
    prediction = ops.cast(denoise_fn(x, broadcast_label(row["label"], x)), x.dtype)
    eps, x0 = to_eps_and_x0(prediction, prediction_type, x, row["alpha"], row["sigma"])
    if clip_x0:
        x0 = ops.clip(x0, -1.0, 1.0)
        eps = (x - row["alpha"] * x0) / row["sigma"]
    return eps, x0
