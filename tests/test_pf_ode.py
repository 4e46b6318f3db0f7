"""The probability-flow ODE sampler and the PF-ODE likelihood against closed-form answers.

For Gaussian data the PF-ODE is linear and its solution exact (etsdm.md §6), for any α(t)
path: the sampler must meet its tolerance against ``gaussian_flow``. For data N(μ, Σ) with a
non-diagonal Σ the log-density under the ODE with prior N(0, I) is closed-form too, and the
Hutchinson estimate with given probes has a closed-form value (its Jacobian is not diagonal,
so a Rademacher probe is not trivially exact). The denoisers are ε* in keras.ops (float32);
the ODE state is float64 (scipy).
"""

import math
import os
import sys

import keras
import numpy as np
import pytest
from keras import ops

sys.path.insert(0, os.path.dirname(__file__))
from sampler_reference import gaussian_flow  # noqa: E402
from test_samplers import keras_gaussian_eps  # noqa: E402

from keras_etsdm import DiffusionModel, TimestepSharing, build_unet, cli  # noqa: E402
from keras_etsdm.evaluation import likelihood  # noqa: E402
from keras_etsdm.samplers import (  # noqa: E402
    ProbabilityFlowSampler,
    build_sampler,
    deserialize,
    get_sampler,
    serialize,
)
from keras_etsdm.samplers.ode import drift_coefficient, time_of_log_alpha  # noqa: E402
from keras_etsdm.schedules import (ContinuousVPSchedule, DiscreteVPSchedule,  # noqa: E402
                                   LinearVPSDE)

SCHED = DiscreteVPSchedule()
SDE = LinearVPSDE()
MU, S = 0.3, 0.5
X_T = np.random.default_rng(0).standard_normal((4, 256))
TOLS = (1e-3, 1e-4, 1e-5)


def sde_gaussian_eps(sde=SDE, mu=MU, s=S):
    """ε*(x, t) for data N(μ, s²) on the linear VP-SDE (its label is t itself), in keras.ops."""

    def eps(x, label):
        t = label
        log_a = -0.25 * t**2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
        log_a = ops.reshape(log_a, (-1,) + (1,) * (len(x.shape) - 1))
        a, sig = ops.exp(log_a), ops.sqrt(-ops.expm1(2.0 * log_a))
        return sig * (x - a * mu) / (a * a * s * s + sig * sig)

    return eps


def exact_flow(schedule, x, end=None):
    """The exact PF-ODE map from t = 1 to t = end (default schedule.eps) for N(μ, s²):
    ``gaussian_flow`` with α, σ of that schedule's continuous view."""
    end = schedule.eps if end is None else end
    return gaussian_flow(x, MU, S, schedule.marginal_alpha(1.0), schedule.marginal_std(1.0),
                         schedule.marginal_alpha(end), schedule.marginal_std(end))


def max_err(sampler, eps_fn, schedule):
    x = np.asarray(ops.convert_to_numpy(sampler.sample(eps_fn, X_T.astype(np.float32))))
    return float(np.max(np.abs(x.astype(np.float64) - exact_flow(schedule, X_T))))


# ----- (a) the sampler meets its tolerance against the exact map ------------------------------
def test_schedule_calculus():
    """f = dlog α/dt (piecewise constant for the discrete view) and the inverse of log α."""
    t = np.linspace(SCHED.eps, 1.0, 997)
    for schedule in (SCHED, SDE):
        np.testing.assert_allclose(
            time_of_log_alpha(schedule, schedule.marginal_log_mean_coeff(t)), t, atol=1e-12)
    # Inside knot interval n the discrete slope is T·(log α_{n+1} − log α_n).
    mid = (SCHED.t_knots[:-1] + SCHED.t_knots[1:]) / 2
    np.testing.assert_allclose(drift_coefficient(SCHED, mid), np.diff(SCHED.log_alphas) * 1000,
                               rtol=1e-12)
    h = 1e-6
    np.testing.assert_allclose(drift_coefficient(SDE, t[1:-1]),
                               (SDE.marginal_log_mean_coeff(t[1:-1] + h)
                                - SDE.marginal_log_mean_coeff(t[1:-1] - h)) / (2 * h), rtol=1e-6)


@pytest.mark.parametrize("name", ["discrete", "linear_vp_sde"])
def test_pf_ode_meets_tolerance_on_gaussian_data(name):
    """max |x − exact| over 1,024 values ≤ 4× the tolerance at rtol = atol ∈ {1e-3, 1e-4,
    1e-5}, and it falls as the tolerance tightens while the NFE grows."""
    schedule, eps_fn = (SCHED, keras_gaussian_eps()) if name == "discrete" else \
        (SDE, sde_gaussian_eps())
    errors, nfes = [], []
    for tol in TOLS:
        sampler = ProbabilityFlowSampler(rtol=tol, atol=tol, schedule=schedule)
        errors.append(max_err(sampler, eps_fn, schedule))
        nfes.append(sampler.last_nfe)
        assert sampler.nfe_history == [sampler.last_nfe] == [sampler.num_iterations]
        assert sampler.labels.shape == (sampler.last_nfe,)
    print(f"\n{name} (log_alpha): tol {TOLS} NFE {nfes} max error {errors}")
    for tol, err in zip(TOLS, errors):
        assert err <= 4 * tol, (tol, err)
    assert errors[0] > errors[1] > errors[2]
    assert nfes[0] < nfes[1] <= nfes[2]
    # Labels: first at t = 1 (label T−1 or N−1), all in [0, top].
    top = schedule.label(1.0)
    assert sampler.labels[0] == pytest.approx(top) and sampler.labels.min() >= -1e-6


def test_time_variable_t_is_score_sdes_form():
    """In t (score_sde's variable) the smooth VP-SDE stays near the tolerance (≤ 5·tol;
    measured 3.4·tol on JAX, 4.7·tol on TensorFlow, whose float32 ε̂ rounds differently and so
    steers the adaptive steps differently); on the discrete schedule the jumps of f(t) break
    RK45's error control, > 10·tol (measured 24·tol JAX, 219·tol TF): why log α is the
    default."""
    sde_t = ProbabilityFlowSampler(rtol=1e-5, atol=1e-5, schedule=SDE, time_variable="t")
    err = max_err(sde_t, sde_gaussian_eps(), SDE)
    disc_t = ProbabilityFlowSampler(rtol=1e-5, atol=1e-5, time_variable="t")
    err_disc = max_err(disc_t, keras_gaussian_eps(), SCHED)
    print(f"\ntime_variable='t' at 1e-5: VP-SDE NFE {sde_t.last_nfe} error {err:.3g}; discrete "
          f"NFE {disc_t.last_nfe} error {err_disc:.3g}")
    assert err <= 5e-5
    assert err_disc > 10e-5


# ----- (b) log-density of Gaussian data -------------------------------------------------------
D = 8
_rng = np.random.default_rng(3)
Q, _ = np.linalg.qr(_rng.standard_normal((D, D)))
LAM = np.linspace(0.1, 1.5, D) ** 2  # eigenvalues of Σ = Q diag(LAM) Qᵀ
MU_VEC = _rng.uniform(-0.5, 0.5, D)


def correlated_eps(schedule):
    """ε*(x, label) = σ (α² Σ + σ² I)⁻¹ (x − α μ) for data N(μ, Σ), in keras.ops float32."""
    q = Q.astype(np.float32)
    lam, mu = LAM.astype(np.float32), MU_VEC.astype(np.float32)

    def eps(x, label):
        if schedule.is_continuous:  # a continuous schedule's label is the time itself
            log_a = schedule.log_alpha_ops(label)
        else:
            table = ops.convert_to_tensor(schedule.log_alphas.astype(np.float32))
            low = ops.clip(ops.floor(label), 0.0, float(schedule.num_timesteps - 2))
            w = label - low
            low = ops.cast(low, "int32")
            log_a = ops.take(table, low) * (1.0 - w) + ops.take(table, low + 1) * w
        log_a = ops.reshape(log_a, (-1, 1))
        a, sig = ops.exp(log_a), ops.sqrt(-ops.expm1(2.0 * log_a))
        y = ops.matmul(x - a * mu, q) * (sig / (a * a * lam + sig * sig))
        return ops.matmul(y, ops.transpose(q))

    return eps


def exact_logp(schedule, x, eps=None):
    """(log p under the ODE with prior N(0, I), z, per-eigendirection ∫ f/(α²λ+σ²) dt, L)."""
    eps = schedule.eps if eps is None else eps
    a_e, s_e = schedule.marginal_alpha(eps), schedule.marginal_std(eps)
    a_1, s_1 = schedule.marginal_alpha(schedule.T), schedule.marginal_std(schedule.T)
    var_e, var_1 = a_e**2 * LAM + s_e**2, a_1**2 * LAM + s_1**2
    z = a_1 * MU_VEC + ((x - a_e * MU_VEC) @ Q) * np.sqrt(var_1 / var_e) @ Q.T
    g = 0.5 * np.log(var_1 / var_e)  # ∫ f (1 − 1/(α²λ+σ²)) dt per eigendirection
    big_l = float(schedule.marginal_log_mean_coeff(schedule.T)
                  - schedule.marginal_log_mean_coeff(eps))
    m = big_l - g  # ∫ f / (α²λ + σ²) dt
    return likelihood.prior_logp(z) + g.sum(), z, m, big_l


def data_points(schedule, n=3):
    """Samples of p_eps = N(α μ, α²Σ + σ²I), the data the likelihood is evaluated at."""
    a, s = schedule.marginal_alpha(schedule.eps), schedule.marginal_std(schedule.eps)
    e = np.random.default_rng(5).standard_normal((n, D))
    return a * MU_VEC + (e * np.sqrt(a * a * LAM + s * s)) @ Q.T


def bits(logp):
    return -np.asarray(logp) / (D * math.log(2))


@pytest.mark.parametrize("schedule", [SCHED, SDE, ContinuousVPSchedule("cosine")],
                         ids=["discrete", "linear_vp_sde", "continuous_cosine"])
def test_exact_trace_log_density(schedule):
    """Exact trace at rtol = atol = tol ∈ {1e-5, 1e-6}: −log p in bits/dim within 4·tol of
    the closed form, z within 10·tol (measured: ≈ 3·tol and ≈ 7·tol at 1e-5)."""
    x = data_points(schedule)
    expected, z, _, _ = exact_logp(schedule, x)
    for tol in (1e-5, 1e-6):
        result = likelihood.log_likelihood(correlated_eps(schedule), x, schedule,
                                           trace="exact", rtol=tol, atol=tol)
        err = np.max(np.abs(bits(result.logp) - bits(expected)))
        print(f"\nexact trace ({type(schedule).__name__}) tol {tol:g}: NFE {result.nfe}, "
              f"|Δ bits/dim| {err:.2g}, |Δz| {np.max(np.abs(result.z - z)):.2g}")
        assert err <= 4 * tol
        np.testing.assert_allclose(result.z, z, rtol=0, atol=10 * tol)
        np.testing.assert_allclose(result.logp, result.prior_logp + result.delta_logp)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_log_density(probe):
    """Hutchinson with K = 8 probes on R = 128 copies of each of 3 points (1,024 probes per
    point). (1) Given its probes, each estimate equals its closed form D·L − Σᵢ w̄ᵢ mᵢ
    (w̄ = mean_k (Qᵀv_k)², m = ∫ f/(α²λ+σ²) dt): RMS over samples ≤ 4·tol bits/dim. (2) The mean over the copies
    is within 4 standard deviations (from M = Q diag(m) Qᵀ: Var vᵀMv = 2 Σ_{i≠j} M_ij²
    Rademacher, 2 Σ M_ij² Gaussian, over 1,024 probes) + 1e-4 nats of the exact log-density."""
    copies, k = 128, 8
    x = np.repeat(data_points(SCHED), copies, axis=0)
    eps_fn = correlated_eps(SCHED)
    expected, _, m, big_l = exact_logp(SCHED, x[::copies])
    probes, _ = likelihood.make_probes(x.shape, probe=probe, num_probes=k, seed=1)
    result = likelihood.log_likelihood(eps_fn, x, SCHED, probes=probes)
    w = np.mean((probes.astype(np.float64) @ Q) ** 2, axis=0)  # [B·R, D]
    estimate = result.prior_logp + D * big_l - w @ m
    # scipy controls the RMS of the error over the state vector, not its largest entry: the
    # RMS over the 384 samples is asserted (≤ 4·tol, as above); single samples reach ≈ 8·tol.
    gap = bits(result.logp) - bits(estimate)
    print(f"\ngiven probes: RMS |Δ bits/dim| {np.sqrt(np.mean(gap**2)):.2g}, "
          f"max {np.max(np.abs(gap)):.2g}")
    assert np.sqrt(np.mean(gap**2)) <= 4e-5
    mat = Q @ np.diag(m) @ Q.T
    off = mat - np.diag(np.diag(mat))
    std = (2 * np.sum((off if probe == "rademacher" else mat) ** 2) / (copies * k)) ** 0.5
    dev = np.abs(result.logp.reshape(-1, copies).mean(axis=1) - expected)
    print(f"\nHutchinson {probe} 1,024 probes: NFE {result.nfe}, |Δ log p| {dev} nats "
          f"(bits/dim {dev / (D * math.log(2))}), σ {std:.3g} nats")
    assert np.all(dev <= 4 * std + 1e-4)
    # The same probes through num_probes / seed.
    again = likelihood.log_likelihood(eps_fn, x[:4], SCHED, probe=probe, num_probes=2, seed=7)
    own, _ = likelihood.make_probes(x[:4].shape, probe=probe, num_probes=2, seed=7)
    given = likelihood.log_likelihood(eps_fn, x[:4], SCHED, probes=own)
    np.testing.assert_allclose(again.logp, given.logp, rtol=0, atol=1e-9)


def test_dequantization_and_units():
    """uint8 → [−1, 1) inside each pixel's bin; the uniform density on [−1, 1]^D (log p =
    −D log 2) is exactly 8 bits/dim of 256-level data."""
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = likelihood.dequantize(images, seed=0)
    k = images.astype(np.float64)
    assert np.all(x >= 2 * k / 256 - 1) and np.all(x < 2 * (k + 1) / 256 - 1)
    np.testing.assert_allclose(likelihood.dequantize(images, uniform=False), k / 127.5 - 1)
    assert likelihood.logp_to_bits_per_dim(-256 * math.log(2.0), 256) == pytest.approx(8.0)


# ----- (c) a DiffusionModel with E-TSDM sharing: the network only through denoise -------------
class HalvedDenoise(DiffusionModel):
    """A subclass whose denoise differs: the samplers must call it."""

    def denoise(self, x_t, t, y=None, training=False):
        return 0.5 * super().denoise(x_t, t, y=y, training=training)


def _tiny_model(cls=DiffusionModel):
    keras.utils.set_random_seed(0)
    network = build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    rng = np.random.default_rng(0)
    for w in network.weights:  # the final conv is zero-initialised: randomise everything
        w.assign(rng.normal(0, 0.05, w.shape).astype("float32") + ops.convert_to_numpy(w))
    return cls(network, sharing=TimestepSharing(100, 5))


@pytest.fixture(scope="module")
def models():
    base = _tiny_model()
    halved = _tiny_model(HalvedDenoise)
    halved.set_weights(base.get_weights())
    return base, halved


def test_sampler_and_likelihood_use_model_denoise(models):
    model, halved = models
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 1)).astype(np.float32)
    sampler = build_sampler("pf_ode", model.schedule, None, {"rtol": 1e-3, "atol": 1e-3})
    out = ops.convert_to_numpy(sampler.sample(model, noise))
    # The same ODE through the seam written out by hand: network(x, f(t)).
    by_hand = ops.convert_to_numpy(sampler.sample(
        lambda x, t: model.network({"x": x, "t": model.sharing(t)}), noise))
    other = ops.convert_to_numpy(sampler.sample(halved, noise))
    assert np.all(np.isfinite(out)) and out.shape == noise.shape
    np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-4 * np.max(np.abs(out)))
    # The solver evaluates labels inside the shared pieces [0, t̃ = 100), down to label 0.
    assert sampler.labels.min() == pytest.approx(0.0, abs=1e-6)
    assert np.sum(sampler.labels < 100) >= 2
    assert np.max(np.abs(out - other)) > 1e-2 * np.max(np.abs(out))
    assert sampler.nfe_history[-1] == sampler.last_nfe > 0

    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    bpd, nfe = likelihood.bits_per_dim(model, images, model.schedule, rtol=1e-3, atol=1e-3)
    bpd_halved, _ = likelihood.bits_per_dim(halved, images, model.schedule, rtol=1e-3,
                                            atol=1e-3)
    print(f"\ntiny model: sample NFE {sampler.last_nfe}, bpd {bpd} (NFE {nfe})")
    assert bpd.shape == (2,) and np.all(np.isfinite(bpd)) and nfe > 0
    assert np.all(np.abs(bpd - bpd_halved) > 1e-3)


def test_eval_cli_bpd(models, tmp_path, monkeypatch):
    """``bin/eval --metrics=bpd``'s library side on 8×8 digits. The model is handed in by
    patching the loader (loading .keras files is tested in test_eval_cli.py), so the compiled
    divergence of the previous test is reused: on TensorFlow each XLA compile costs seconds."""
    model, _ = models
    loaded = {}

    def fake_load_model(workdir=None, checkpoint=None, use_ema=True):
        loaded.update(checkpoint=checkpoint, use_ema=use_ema)
        return model

    monkeypatch.setattr(cli, "load_model", fake_load_model)
    out = str(tmp_path / "bpd.json")
    record = cli.run_eval(metrics="bpd", checkpoint="model.keras", data="embedded:digits",
                          bpd_num_images=4, batch_size=2, seed=3, output=out,
                          bpd_options={"rtol": 1e-3, "atol": 1e-3})
    assert loaded == {"checkpoint": "model.keras", "use_ema": True}
    assert set(record["metrics"]) == {"bpd", "bpd_std"}
    assert np.isfinite(record["metrics"]["bpd"]) and record["metrics"]["bpd_std"] > 0
    assert record["bpd"]["num_images"] == 4 and len(record["bpd"]["nfe"]) == 2
    assert record["bpd"]["dequantization"] == "uniform" and os.path.exists(out)
    # The same numbers as bits_per_dim on those images with the per-batch seeds [3, b].
    from keras_etsdm.evaluation import evaluate
    images = evaluate.load_reference_images("embedded:digits", 8, 1, 4)
    first, _ = likelihood.bits_per_dim(model, images[:2], model.schedule, seed=[3, 0],
                                       rtol=1e-3, atol=1e-3)
    second, _ = likelihood.bits_per_dim(model, images[2:], model.schedule, seed=[3, 1],
                                        rtol=1e-3, atol=1e-3)
    assert record["metrics"]["bpd"] == pytest.approx(np.mean(np.concatenate([first, second])),
                                                     rel=1e-12)


# ----- (d) configuration and errors -----------------------------------------------------------
def test_registry_config_and_errors(models):
    model, _ = models
    sampler = get_sampler("pf-ode", rtol=1e-4, schedule=SDE)
    again = deserialize(serialize(sampler))
    assert type(again) is ProbabilityFlowSampler and again.get_config() == sampler.get_config()
    assert isinstance(again.schedule, LinearVPSDE) and again.eps == SDE.eps
    assert ProbabilityFlowSampler().eps == 1.0 / 1000
    for bad in ({"rtol": 0.0}, {"atol": -1e-5}, {"rtol": float("nan")}, {"rtol": True},
                {"method": "Euler"}, {"eps": 0.0}, {"eps": 1.0}, {"eps": 1e-4},
                {"time_variable": "lambda"}):
        with pytest.raises(ValueError):
            ProbabilityFlowSampler(**bad)
    with pytest.raises(ValueError, match="adaptive"):
        build_sampler("pf_ode", SCHED, 20)
    with pytest.raises(ValueError, match="schedule"):
        ProbabilityFlowSampler(schedule=SDE).sample(model, np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="schedule"):
        likelihood.log_likelihood(model, np.zeros((1, 8, 8, 1)), SDE)
    x = np.zeros((1, D))
    eps_fn = correlated_eps(SCHED)
    for bad in ({"probe": "uniform"}, {"trace": "diag"}, {"num_probes": 0},
                {"probes": np.ones((2, 2, D))}, {"rtol": 0}):
        with pytest.raises(ValueError):
            likelihood.log_likelihood(eps_fn, x, SCHED, **bad)
    with pytest.raises(ValueError, match="exact"):
        likelihood.make_probes((1, 17, 17), trace="exact")
    with pytest.raises(ValueError, match="uint8"):
        likelihood.bits_per_dim(eps_fn, np.zeros((1, D), np.float32), SCHED)
    with pytest.raises(ValueError, match="metric"):
        cli.run_eval(metrics="nll", checkpoint="unused.keras")
