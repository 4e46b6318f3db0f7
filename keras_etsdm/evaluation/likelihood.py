"""Likelihood in bits per dimension through the probability-flow ODE (score_sde ``likelihood.py``).

For the PF-ODE ``dx/dt = v(x, t)`` (``samplers/ode.py``: ``v = f(t)·(x − ε̂/σ_t)``), the
instantaneous change of variables gives

    log p_eps(x_eps) = log p_1(x_1) + ∫_eps^1 ∇·v(x_t, t) dt,
    ∇·v = f(t) · (D − ∇·ε̂(x, t) / σ_t),

with D the number of dimensions per sample and the prior ``p_1 = N(0, I)`` (score_sde's
``prior_logp``). [x, ∫∇·v] is integrated from eps to 1 with ``scipy.integrate.solve_ivp`` (the
whole batch as one vector, one rtol / atol, as score_sde), in the variable ``log α`` by
default (``samplers.ode.ODETime``: the same integral, smooth for the discrete schedule).

The divergence of ε̂ is the Hutchinson estimate ``E_v[vᵀ (∂ε̂/∂x) v]`` with K fixed probes v
per sample (Rademacher or Gaussian; score_sde: one probe, held fixed along the trajectory),
each ``vᵀJ`` one vector-Jacobian product of the denoiser (``backend.vector_jacobian_products``,
the only backend-specific code), or the exact trace (one VJP per dimension: small D only).
The network is only ever called through the denoiser (a ``DiffusionModel``'s ``denoise``).
For a v- or x0-prediction denoiser the VJPs are of its native output p; since
``ε = a x + b p`` with (a, b) set by α, σ alone (``parameterization.to_eps_and_x0``),
``∇·ε = a D + b ∇·p`` is the same conversion applied to (D, ∇·p), in float64 on the host.

Data and units (score_sde ``run_lib.evaluate`` with ``uniform_dequantization``): uint8 pixels
k ∈ {0..255} become ``x = 2·(k + u)/256 − 1`` with u ~ U[0, 1), i.e. data in [−1, 1) whose
256 bins have width 2/256; the density of the 256-level data is that density times
(2/256)^D, so

    bpd = −log p(x) / (D ln 2) + log2(256 / 2) = −log p(x) / (D ln 2) + 7.
"""

import collections
import math

import numpy as np
from keras import ops

from keras_etsdm import backend as etsdm_backend
from keras_etsdm.parameterization import check_prediction_type, to_eps_and_x0
from keras_etsdm.samplers import _compiled
from keras_etsdm.samplers.base import (_conditioning_tensors, denoiser_cache_key,
                                       prediction_type_of)
from keras_etsdm.samplers.ode import (
    TIME_VARIABLES,
    ODETime,
    check_denoiser_schedule,
    check_ode_options,
    parse_schedule,
    solve,
)

PROBES = ("rademacher", "gaussian")
TRACES = ("hutchinson", "exact")
# The exact trace unrolls one VJP per dimension into the compiled function.
MAX_EXACT_DIM = 256

LikelihoodResult = collections.namedtuple(
    "LikelihoodResult", ["logp", "prior_logp", "delta_logp", "z", "nfe"])
LikelihoodResult.__doc__ = """Output of ``log_likelihood`` (numpy float64).

    logp: ``[B]`` log p_eps(x) in nats (the whole sample, not per dimension).
    prior_logp: ``[B]`` log N(z; 0, I) at t = 1.
    delta_logp: ``[B]`` ∫_eps^1 ∇·v dt (the change-of-variables term).
    z: ``[B, ...]`` the ODE's image of x at t = 1.
    nfe: network evaluations (each a forward pass plus K VJPs).
"""

_CACHE_SIZE = 16
_COMPILED = collections.OrderedDict()  # (denoiser key, K) -> CompiledSegment, LRU


def _divergence_segment(denoise_fn):
    """Pure ``(x, t, probes) -> (ε̂, vᵀJv [K, B])`` in the ``CompiledSegment`` form."""

    def segment(tables, carry, extra, start, stop):
        x, t, probes = carry
        num = probes.shape[0]
        eps, products = etsdm_backend.vector_jacobian_products(
            lambda xx: ops.cast(denoise_fn(xx, t), xx.dtype), x,
            [probes[k] for k in range(num)])
        axes = tuple(range(1, len(x.shape)))
        quad = ops.stack([ops.sum(g * probes[k], axis=axes) for k, g in enumerate(products)])
        return (eps, quad)

    return segment


def _compiled_divergence(denoiser, num_probes):
    key = (denoiser_cache_key(denoiser), int(num_probes))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    compiled = _compiled.CompiledSegment(_divergence_segment, denoiser)
    _COMPILED[key] = compiled
    while len(_COMPILED) > _CACHE_SIZE:
        _COMPILED.popitem(last=False)
    return compiled


def prior_logp(z):
    """``log N(z; 0, I)`` per sample in nats: ``−D/2 log 2π − ½‖z‖²`` (``[B]`` float64)."""
    z = np.asarray(z, np.float64).reshape(z.shape[0], -1)
    return -0.5 * z.shape[1] * math.log(2 * math.pi) - 0.5 * np.sum(z * z, axis=1)


def make_probes(shape, trace="hutchinson", probe="rademacher", num_probes=1, seed=0):
    """The probe vectors ``[K, B, ...]`` float32 and their weights ``[K]``.

    Hutchinson: K i.i.d. Rademacher (±1) or standard normal probes per sample from
    ``numpy.random.default_rng(seed)`` (the same on every backend), weights 1/K (the mean).
    Exact: the D basis vectors (the same for every sample), weights 1 (the sum = the trace).
    """
    if trace not in TRACES:
        raise ValueError(f"Unknown trace {trace!r}; expected one of {TRACES}.")
    if probe not in PROBES:
        raise ValueError(f"Unknown probe {probe!r}; expected one of {PROBES}.")
    shape = tuple(int(d) for d in shape)
    dim = int(np.prod(shape[1:]))
    if trace == "exact":
        if dim > MAX_EXACT_DIM:
            raise ValueError(f"trace='exact' needs one VJP per dimension; D = {dim} > "
                             f"{MAX_EXACT_DIM}: use trace='hutchinson'.")
        basis = np.eye(dim, dtype=np.float32).reshape((dim, 1) + shape[1:])
        return np.broadcast_to(basis, (dim,) + shape).copy(), np.ones(dim)
    if isinstance(num_probes, bool) or int(num_probes) != num_probes or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}.")
    rng = np.random.default_rng(seed)
    size = (int(num_probes),) + shape
    if probe == "rademacher":
        probes = rng.integers(0, 2, size=size).astype(np.float32) * 2.0 - 1.0
    else:
        probes = rng.standard_normal(size).astype(np.float32)
    return probes, np.full(int(num_probes), 1.0 / num_probes)


def log_likelihood(denoiser, x, schedule=None, rtol=1e-5, atol=1e-5, method="RK45", eps=None,
                   trace="hutchinson", probe="rademacher", num_probes=1, probes=None, seed=0,
                   time_variable="log_alpha", **conditioning):
    """``log p_eps(x)`` (nats per sample) of data ``x`` under the PF-ODE of ``denoiser``.

    Args:
        denoiser: a ``DiffusionModel`` (``denoise``) or a ``keras.ops`` callable
            ``(x [B, ...], t [B] float labels, **conditioning) -> ε̂``.
        x: ``[B, ...]`` float data at t = eps (in the model's scale, e.g. [−1, 1]).
        schedule: the denoiser's ``DiscreteVPSchedule`` (default) or ``ContinuousVPSchedule``.
        rtol, atol, method, eps, time_variable: as ``ProbabilityFlowSampler`` (score_sde:
            rtol = atol = 1e-5, RK45, eps = 1e-5 for the VP-SDE; here eps = schedule.eps).
        trace: "hutchinson" (default) or "exact" (D VJPs per NFE; D ≤ 256).
        probe: "rademacher" (default) or "gaussian"; num_probes: K probes per sample.
        probes: optional explicit ``[K, B, ...]`` probes (then ``probe`` / ``num_probes`` /
            ``seed`` are unused), averaged with weights 1/K.
        seed: numpy seed of the probes.
        **conditioning: tensors handed to the denoiser at every NFE (e.g. ``y``).
    Returns:
        ``LikelihoodResult`` (see its docstring).
    """
    schedule = parse_schedule(schedule)
    rtol, atol, method, eps = check_ode_options(rtol, atol, method, eps, schedule)
    if time_variable not in TIME_VARIABLES:
        raise ValueError(f"Unknown time_variable {time_variable!r}; expected one of "
                         f"{TIME_VARIABLES}.")
    check_denoiser_schedule("log_likelihood", schedule, denoiser)
    prediction_type = check_prediction_type(prediction_type_of(denoiser))
    x = etsdm_backend.to_numpy(x).astype(np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [B, ...] with B >= 1, got {x.shape}.")
    shape, batch = x.shape, x.shape[0]
    dim = int(np.prod(shape[1:]))
    if probes is None:
        probes, weights = make_probes(shape, trace, probe, num_probes, seed)
    else:
        probes = np.asarray(probes, np.float32)
        if probes.ndim != len(shape) + 1 or probes.shape[1:] != shape:
            raise ValueError(f"probes must have shape [K] + {shape}, got {probes.shape}.")
        weights = np.full(probes.shape[0], 1.0 / probes.shape[0])
    conditioning = _conditioning_tensors(conditioning, batch)
    segment = _compiled_divergence(denoiser, probes.shape[0])
    probes_in = ops.convert_to_tensor(probes)
    clock = ODETime(schedule, time_variable, eps, schedule.ode_T)
    state = {"nfe": 0}

    def rhs(v, y):
        state["nfe"] += 1
        t = clock.time(v)
        xt = y[:-batch].reshape(shape)
        labels = ops.convert_to_tensor(np.full((batch,), schedule.label(t), np.float32))
        eps_hat, quad = segment({}, (ops.convert_to_tensor(xt.astype(np.float32)), labels,
                                     probes_in), None, 0, 1, conditioning)
        eps_hat = etsdm_backend.to_numpy(eps_hat).astype(np.float64)
        div_eps = weights @ etsdm_backend.to_numpy(quad).astype(np.float64)  # [B]
        sigma = float(schedule.marginal_std(t))
        if prediction_type != "epsilon":
            # ε = a x + b p is affine in (x, p): ∇·ε = a D + b ∇·p, the same map on (D, ∇·p).
            alpha = float(schedule.marginal_alpha(t))
            eps_hat, _ = to_eps_and_x0(eps_hat, prediction_type, xt, alpha, sigma)
            div_eps, _ = to_eps_and_x0(div_eps, prediction_type, float(dim), alpha, sigma)
        factor = clock.factor(t)
        drift = factor * (xt - eps_hat / sigma)
        div_drift = factor * (dim - div_eps / sigma)
        return np.concatenate([drift.reshape(-1), div_drift])

    y0 = np.concatenate([x.reshape(-1), np.zeros(batch)])
    y1, nfe = solve(rhs, clock.span, y0, rtol, atol, method)
    z = y1[:-batch].reshape(shape)
    delta = y1[-batch:]
    prior = prior_logp(z)
    return LikelihoodResult(prior + delta, prior, delta, z, nfe)


def dequantize(images_uint8, seed=0, uniform=True):
    """uint8 images → float64 data in [−1, 1) as score_sde evaluates likelihoods.

    ``uniform=True``: ``2·(k + u)/256 − 1``, u ~ U[0, 1) from ``default_rng(seed)`` (uniform
    dequantization). ``uniform=False``: ``k/127.5 − 1`` (the training scale, no noise).
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"bits_per_dim expects uint8 images in [0, 255], got {images.dtype}.")
    k = images.astype(np.float64)
    if not uniform:
        return k / 127.5 - 1.0
    u = np.random.default_rng(seed).uniform(0.0, 1.0, size=k.shape)
    return 2.0 * (k + u) / 256.0 - 1.0


def logp_to_bits_per_dim(logp, dim):
    """Nats per sample of data in [−1, 1] → bits per dimension of the 256-level data:
    ``−logp / (D ln 2) + log2(256/2)`` (score_sde's offset ``7 − inverse_scaler(−1)`` = 7)."""
    return -np.asarray(logp, np.float64) / (dim * math.log(2.0)) + math.log2(256.0 / 2.0)


def bits_per_dim(denoiser, images_uint8, schedule=None, seed=0, uniform_dequantization=True,
                 **kwargs):
    """Bits per dimension of uint8 images (``[B, ...]``) under the PF-ODE of ``denoiser``.

    ``seed`` seeds the dequantization noise and the probes; ``kwargs`` go to
    ``log_likelihood``. Returns ``(bpd [B] float64, nfe)``.
    """
    x = dequantize(images_uint8, seed, uniform_dequantization)
    result = log_likelihood(denoiser, x, schedule, seed=seed, **kwargs)
    dim = int(np.prod(x.shape[1:]))
    return logp_to_bits_per_dim(result.logp, dim), result.nfe
