"""Prediction types ε / v / x0 and the zero-terminal-SNR schedule (issue 13, item 4).

* The conversions of ``keras_etsdm.parameterization`` are exact round trips, at α = 0 too for
  v and x0 (float64 numpy: 1e-12; keras float32: 1e-6).
* Every sampler gives the same samples from the closed-form v* / x0* denoiser of Gaussian data
  N(μ, s²) as from ε*: the compiled float32 loops against the float64 execution of the ε*
  tables (``sampler_reference``), within float32 round-off scaled as in test_samplers.
* On a zero-terminal-SNR schedule DDIM "trailing" and DDPM start at α = 0 and are exact with
  v* / x0* (float64 execution in x0 form), DPM-Solver and the PF-ODE start from the clamped α
  of the continuous view; ε-prediction there is refused.
* Training targets, ``get_config`` / ``.keras`` round trips, gin bindings and the errors.
"""

import os
import sys
import types

import gin
import keras
import numpy as np
import pytest
from keras import layers, ops

sys.path.insert(0, os.path.dirname(__file__))
from sampler_reference import (execute_ddim_float64, execute_tables_float64,  # noqa: E402
                               gaussian_eps, gaussian_flow)

import keras_etsdm as ke  # noqa: E402
from keras_etsdm.evaluation import likelihood  # noqa: E402
from keras_etsdm.guidance import ClassifierFreeGuidance  # noqa: E402
from keras_etsdm.parameterization import (PREDICTION_TYPES, from_eps, from_x0,  # noqa: E402
                                          to_eps_and_x0)
from keras_etsdm.samplers import (DDIMSampler, DDPMSampler, DPMSolverSampler,  # noqa: E402
                                  ProbabilityFlowSampler)
from keras_etsdm.schedules import DiscreteVPSchedule  # noqa: E402

SCHED = DiscreteVPSchedule()
ZSCHED = DiscreteVPSchedule(zero_terminal_snr=True)
MU, S = 0.3, 0.5
X_T = np.random.default_rng(0).standard_normal((4, 32))
X_T32 = X_T.astype(np.float32)


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


# ----- closed-form denoisers -----------------------------------------------------------------
def gaussian_denoiser(kind, schedule=SCHED, discrete=False, mu=MU, s=S):
    """The Bayes-optimal prediction of type ``kind`` for data N(μ, s²), keras.ops float32.

    ``discrete=False``: α, σ of the schedule's continuous view (log α interpolated between
    knots, as DPM-Solver and the PF-ODE see it; ε* is test_samplers' ``keras_gaussian_eps``).
    ``discrete=True``: the exact tables at integer labels (α = 0 at the last label of a
    zero-terminal-SNR schedule: ε* = x, x0* = μ, v* = −μ there, all finite).
    """
    log_alphas = schedule.marginal_log_mean_coeff(schedule.t_knots).astype(np.float32)
    last = schedule.num_timesteps - 2

    def coefficients(x, label):
        shape = (-1,) + (1,) * (len(x.shape) - 1)
        if discrete:
            index = ops.cast(ops.round(label), "int32")
            a = ops.reshape(ops.take(schedule.alpha_table, index), shape)
            sig = ops.reshape(ops.take(schedule.sigma_table, index), shape)
            return a, sig
        table = ops.convert_to_tensor(log_alphas)
        low = ops.clip(ops.floor(label), 0.0, float(last))
        w = label - low
        low = ops.cast(low, "int32")
        log_a = ops.take(table, low) * (1.0 - w) + ops.take(table, low + 1) * w
        log_a = ops.reshape(log_a, shape)
        return ops.exp(log_a), ops.sqrt(-ops.expm1(2.0 * log_a))

    def denoise(x, label):
        a, sig = coefficients(x, label)
        denom = a * a * s * s + sig * sig
        eps = sig * (x - a * mu) / denom
        x0 = mu + a * s * s * (x - a * mu) / denom
        return {"epsilon": eps, "v": a * eps - sig * x0, "x0": x0}[kind]

    denoise.prediction_type = kind
    return denoise


DENOISERS = {kind: gaussian_denoiser(kind) for kind in PREDICTION_TYPES}
ZDENOISERS = {kind: gaussian_denoiser(kind, ZSCHED, discrete=True) for kind in ("v", "x0")}
ZCONTINUOUS = {kind: gaussian_denoiser(kind, ZSCHED) for kind in ("v", "x0")}


def run(sampler, denoiser, x=X_T32, **kw):
    return to_np(sampler.sample(denoiser, x, **kw))


# ----- (a) conversions --------------------------------------------------------------------------
def test_conversions_are_exact_round_trips_including_alpha_zero():
    rng = np.random.default_rng(1)
    alpha = np.array([0.0, 1e-4, 0.3, 0.8, 0.99995, 1.0])[:, None, None]
    sigma = np.sqrt(1.0 - alpha**2)
    x0, eps = (np.broadcast_to(v, (6, 5, 7)) for v in rng.standard_normal((2, 5, 7)))
    x = alpha * x0 + sigma * eps
    # ε: x0 undefined at α = 0; x0: ε undefined at σ = 0 (α = 1); v: exact everywhere.
    defined = {"epsilon": slice(1, None), "v": slice(None), "x0": slice(0, -1)}
    for kind, ok in defined.items():
        p = {"epsilon": eps, "v": alpha * eps - sigma * x0, "x0": x0}[kind]  # definitions
        with np.errstate(divide="ignore", invalid="ignore"):
            e_hat, x0_hat = to_eps_and_x0(p, kind, x, alpha, sigma)
        np.testing.assert_allclose(e_hat[ok], eps[ok], rtol=0, atol=1e-11, err_msg=kind)
        np.testing.assert_allclose(x0_hat[ok], x0[ok], rtol=0, atol=1e-11, err_msg=kind)
    # from_eps (divides by α) and from_x0 (by σ) invert it where α, σ > 0 (1e-9: α = 1e-4
    # and σ = 0.01 amplify round-off); the α = 0 / σ = 0 rows are checked above.
    inner = slice(1, -1)
    for kind in PREDICTION_TYPES:
        for inverse, given in ((from_eps, eps), (from_x0, x0)):
            p = inverse(given[inner], kind, x[inner], alpha[inner], sigma[inner])
            e_hat, x0_hat = to_eps_and_x0(p, kind, x[inner], alpha[inner], sigma[inner])
            np.testing.assert_allclose(e_hat, eps[inner], rtol=0, atol=1e-9, err_msg=kind)
            np.testing.assert_allclose(x0_hat, x0[inner], rtol=0, atol=1e-9, err_msg=kind)
    # v at α = 0 is −x0: no division anywhere.
    np.testing.assert_array_equal(from_x0(x0[0], "v", eps[0], 0.0, 1.0), -x0[0])


def test_conversions_in_keras_float32():
    rng = np.random.default_rng(2)
    x0, eps = rng.standard_normal((2, 3, 4)).astype(np.float32)
    alpha, sigma = np.float32(0.0), np.float32(1.0)
    x = alpha * x0 + sigma * eps
    for kind in ("v", "x0"):
        p = ops.convert_to_tensor(from_x0(x0, kind, x, alpha, sigma))
        e_hat, x0_hat = to_eps_and_x0(p, kind, ops.convert_to_tensor(x), alpha, sigma)
        np.testing.assert_allclose(to_np(e_hat), eps, atol=1e-6)
        np.testing.assert_allclose(to_np(x0_hat), x0, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        to_eps_and_x0(x, "score", x, 1.0, 0.0)


def test_guidance_combination_is_valid_for_every_type():
    """(1+w)·p_c − w·p_u converts to (1+w)·ε_c − w·ε_u (the conversion is affine, weights sum
    to 1), and the wrapper forwards the model's prediction type to the samplers."""
    rng = np.random.default_rng(3)
    x, pc, pu = rng.standard_normal((3, 6))
    w, alpha, sigma = 2.5, 0.6, 0.8
    for kind in PREDICTION_TYPES:
        guided = to_eps_and_x0((1 + w) * pc - w * pu, kind, x, alpha, sigma)
        ec, xc = to_eps_and_x0(pc, kind, x, alpha, sigma)
        eu, xu = to_eps_and_x0(pu, kind, x, alpha, sigma)
        np.testing.assert_allclose(guided[0], (1 + w) * ec - w * eu, atol=1e-12)
        np.testing.assert_allclose(guided[1], (1 + w) * xc - w * xu, atol=1e-12)
    fake = types.SimpleNamespace(conditional=True, prediction_type="v", null_id=3, schedule=SCHED)
    assert ClassifierFreeGuidance(fake).prediction_type == "v"


# ----- (b) samplers: v* / x0* == ε* --------------------------------------------------------------
_DPM = [(alg, method, order) for alg in ("dpmsolver", "dpmsolver++")
        for method in ("multistep", "singlestep") for order in (1, 2, 3)]


@pytest.mark.parametrize("kind", ["v", "x0"])
def test_dpm_solver_from_v_and_x0_equals_eps_tables(kind):
    """Every algorithm × method × order 1–3: the float32 loop on v* / x0* == the float64
    execution of the same tables on ε*, within 4e-6 × the largest step coefficient (the
    tolerance of test_samplers' ε loop check)."""
    eps64 = gaussian_eps(SCHED, MU, S)
    for alg, method, order in _DPM:
        sampler = DPMSolverSampler(7, order=order, method=method, algorithm=alg)
        expected = execute_tables_float64(sampler, eps64, X_T)
        t = sampler.tables
        conditioning = np.max(np.abs(t["anchor"]) + sum(np.abs(t[f"c{k}"]) for k in range(order)))
        np.testing.assert_allclose(run(sampler, DENOISERS[kind]), expected, rtol=0,
                                   atol=4e-6 * max(conditioning, 1.0),
                                   err_msg=f"{alg} {method} {order}")


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0"])
def test_ddim_and_ddpm_from_every_type_equal_eps_tables(kind):
    """DDIM (10 uniform steps, to ᾱ = 1) and DDPM (20 respaced steps, fixed step noise): the
    float32 loop on p* == the float64 ε* tables, atol 2e-5 on samples of scale ~1."""
    eps64 = gaussian_eps(SCHED, MU, S)
    ddim = DDIMSampler(10)
    np.testing.assert_allclose(run(ddim, DENOISERS[kind]), execute_ddim_float64(ddim, eps64, X_T),
                               rtol=0, atol=2e-5)
    ddpm = DDPMSampler(20)
    z = np.random.default_rng(4).standard_normal((20,) + X_T.shape).astype(np.float32)
    expected = execute_ddpm_float64(ddpm, lambda x, label: eps64(x, label), X_T, z, "epsilon")
    np.testing.assert_allclose(run(ddpm, DENOISERS[kind], step_noise=z), expected, rtol=0,
                               atol=2e-5)


def execute_ddpm_float64(sampler, fn, x, z, kind):
    """A DDPMSampler's tables in float64 with explicit step noise; ``fn`` returns ``kind``."""
    t, x = sampler.tables, np.asarray(x, np.float64)
    for i in range(sampler.num_iterations):
        _, x0 = to_eps_and_x0(fn(x, t["label"][i]), kind, x, t["alpha"][i], t["sigma"][i])
        x = t["coef_x0"][i] * x0 + t["coef_xt"][i] * x + t["noise_std"][i] * z[i]
    return x


def test_pf_ode_and_likelihood_from_v_and_x0():
    """PF-ODE (rtol = atol = 1e-4) from v* and x0*: within 4e-4 of the exact Gaussian flow, as
    from ε*; the PF-ODE log-likelihood (exact trace, D = 4) from v* / x0* equals ε*'s to 1e-3
    nats (the solvers' tolerance; ∇·ε is converted from ∇·p)."""
    x = X_T32[:2, :8]
    exact = gaussian_flow(x, MU, S, SCHED.marginal_alpha(1.0), SCHED.marginal_std(1.0),
                          SCHED.alphas[0], SCHED.sigmas[0])
    sampler = ProbabilityFlowSampler(rtol=1e-4, atol=1e-4)
    for kind in PREDICTION_TYPES:
        np.testing.assert_allclose(run(sampler, DENOISERS[kind], x), exact, rtol=0, atol=4e-4,
                                   err_msg=kind)
    data = np.random.default_rng(5).normal(MU, S, (2, 4))
    logp = {kind: likelihood.log_likelihood(DENOISERS[kind], data, trace="exact", rtol=1e-5,
                                            atol=1e-5).logp for kind in PREDICTION_TYPES}
    for kind in ("v", "x0"):
        np.testing.assert_allclose(logp[kind], logp["epsilon"], rtol=0, atol=1e-3)


# ----- zero terminal SNR ------------------------------------------------------------------------
def test_zero_terminal_snr_schedule():
    z, base = ZSCHED, SCHED
    assert z.alphas[-1] == 0.0 and z.sigmas[-1] == 1.0 and z.lambdas[-1] == -np.inf
    assert z.alphas[0] == base.alphas[0] and z.betas[0] == base.betas[0] and z.betas[-1] == 1.0
    np.testing.assert_allclose(np.cumprod(1.0 - z.betas), z.alphas_cumprod, rtol=1e-10,
                               atol=1e-15)
    # Algorithm 1 of Lin et al.: √ᾱ shifted and scaled.
    s = base.alphas
    np.testing.assert_allclose(z.alphas, (s - s[-1]) * s[0] / (s[0] - s[-1]), rtol=1e-12,
                               atol=1e-15)
    # Continuous view: finite, strictly decreasing, equal to the tables but at the last knot.
    cont = z.marginal_log_mean_coeff(z.t_knots)
    assert np.all(np.isfinite(cont)) and np.all(np.diff(cont) < 0)
    np.testing.assert_array_equal(cont[:-1], z.log_alphas[:-1])
    assert z.marginal_alpha(1.0) <= 2.0**-12
    np.testing.assert_allclose(z.inverse_lambda(z.marginal_lambda(1.0)), 1.0, rtol=1e-12)
    for kind, T in (("cosine", 1000), ("linear", 10), ("quadratic", 2)):
        other = DiscreteVPSchedule(kind, T, zero_terminal_snr=True)
        cont = other.marginal_log_mean_coeff(other.t_knots)
        assert np.all(np.isfinite(cont)) and np.all(np.diff(cont) < 0), kind
    assert "zero_terminal_snr" not in base.get_config()
    assert DiscreteVPSchedule.from_config(z.get_config()).get_config() == z.get_config()
    with pytest.raises(ValueError, match="num_timesteps >= 2"):
        DiscreteVPSchedule(num_timesteps=1, zero_terminal_snr=True)


def execute_x0_float64(sampler, kind, x, z=None):
    """DDIM / DDPM tables in float64 on the discrete-table Gaussian p*, from α = 0."""
    t, x = sampler.tables, np.asarray(x, np.float64)
    for i in range(sampler.num_iterations):
        a, sig = t["alpha"][i], t["sigma"][i]
        x0 = MU + a * S * S * (x - a * MU) / (a * a * S * S + sig * sig)
        eps = (x - a * x0) / sig
        if isinstance(sampler, DDIMSampler):
            x = t["alpha_prev"][i] * x0 + t["direction"][i] * eps
        else:
            x = t["coef_x0"][i] * x0 + t["coef_xt"][i] * x + t["noise_std"][i] * z[i]
    return x


def test_zero_terminal_snr_ddim_trailing_and_ddpm_from_alpha_zero():
    """DDIM "trailing" (10 steps) and DDPM (all 1000 steps and 10 respaced, fixed step noise)
    start at label T−1 with α = 0 exactly; from v* and from x0* they equal the float64
    execution of their tables (atol 2e-5), and with an ε denoiser they refuse."""
    ddim = DDIMSampler(10, spacing="trailing", schedule=ZSCHED)
    assert ddim.tables["alpha"][0] == 0.0
    expected = execute_x0_float64(ddim, "v", X_T)
    for kind in ("v", "x0"):
        np.testing.assert_allclose(run(ddim, ZDENOISERS[kind]), expected, rtol=0, atol=2e-5)
    for ddpm in (DDPMSampler(10, schedule=ZSCHED), DDPMSampler(schedule=ZSCHED)):
        assert ddpm.tables["alpha"][0] == 0.0
        z = np.random.default_rng(6).standard_normal(
            (ddpm.num_iterations,) + X_T.shape).astype(np.float32)
        expected = execute_x0_float64(ddpm, "v", X_T, z)
        for kind in ("v", "x0"):
            np.testing.assert_allclose(run(ddpm, ZDENOISERS[kind], step_noise=z), expected,
                                       rtol=0, atol=1e-4 if ddpm.num_iterations > 10 else 2e-5)
    bare_eps = gaussian_denoiser("epsilon", ZSCHED, discrete=True)
    del bare_eps.prediction_type  # a bare callable: taken as ε
    with pytest.raises(ValueError, match="α = 0"):
        ddim.sample(bare_eps, X_T32)
    with pytest.raises(ValueError, match="α = 0"):
        ddim.build_loop(bare_eps)
    # A grid that never visits the last label is fine for ε ("uniform" stops below T−1).
    assert np.all(np.isfinite(run(DDIMSampler(10, schedule=ZSCHED), bare_eps)))


def test_zero_terminal_snr_dpm_solver_and_pf_ode_use_the_clamped_view():
    """DPM-Solver from v* / x0* of the continuous view: equal to the float64 ε* tables (which
    exist: α(1) is clamped, λ finite); the PF-ODE from v* within 4e-4 of the exact flow from
    the clamped (α, σ) at t = 1. Not the noise-prediction singlestep solver: from α(1) ≈ 4e-5
    its stages multiply float32 round-off by anchor ratios α_t/α_s up to ~1e4 (ε*, v* and x0*
    alike miss the float64 tables by 0.4 (2S) to 33 (3S), and the float64 result is itself
    far off the data); dpmsolver++ (the default) is exact to 5e-7 there."""
    eps64 = gaussian_eps(ZSCHED, MU, S)
    cases = [("dpmsolver", "multistep", 2), ("dpmsolver++", "multistep", 2),
             ("dpmsolver++", "multistep", 3), ("dpmsolver++", "singlestep", 3)]
    for alg, method, order in cases:
        if True:
            sampler = DPMSolverSampler(6, order=order, method=method, algorithm=alg,
                                       schedule=ZSCHED)
            expected = execute_tables_float64(sampler, eps64, X_T)
            t = sampler.tables
            conditioning = np.max(np.abs(t["anchor"]) + sum(np.abs(t[f"c{k}"])
                                                            for k in range(order)))
            for kind in ("v", "x0"):
                got = run(sampler, ZCONTINUOUS[kind])
                assert np.all(np.isfinite(got))
                np.testing.assert_allclose(got, expected, rtol=0,
                                           atol=4e-6 * max(conditioning, 1.0),
                                           err_msg=f"{alg} {method} {kind}")
    x = X_T32[:2, :8]
    exact = gaussian_flow(x, MU, S, ZSCHED.marginal_alpha(1.0), ZSCHED.marginal_std(1.0),
                          ZSCHED.alphas[0], ZSCHED.sigmas[0])
    sampler = ProbabilityFlowSampler(rtol=1e-4, atol=1e-4, schedule=ZSCHED)
    np.testing.assert_allclose(run(sampler, ZCONTINUOUS["v"], x), exact, rtol=0, atol=4e-4)


def test_prediction_type_is_part_of_the_compiled_loop_key():
    sampler = DDIMSampler(5)

    def fn(x, t):
        return x

    eps_segment = sampler.compiled_segment(fn)
    fn.prediction_type = "v"
    assert sampler.compiled_segment(fn) is not eps_segment
    del fn.prediction_type
    assert sampler.compiled_segment(fn) is eps_segment
    with pytest.raises(ValueError, match="prediction_type"):
        sampler.build_loop(fn, prediction_type="score")


# ----- (c)–(e) the model ------------------------------------------------------------------------
class Probe(layers.Layer):
    """Returns x_t's first channel and the time condition: exposes what the model feeds."""

    def call(self, inputs):
        x, t = inputs["x"], inputs["t"]
        t_map = ops.ones_like(x[..., :1]) * ops.reshape(t, (-1, 1, 1, 1))
        return ops.concatenate([x[..., :1], t_map], axis=-1)


def probe_model(prediction_type, schedule=None):
    x = keras.Input((4, 4, 2), name="x")
    t = keras.Input((), name="t")
    net = keras.Model({"x": x, "t": t}, Probe()({"x": x, "t": t}))
    return ke.DiffusionModel(net, schedule=schedule, sharing=ke.TimestepSharing(0, 0), seed=3,
                             prediction_type=prediction_type)


def test_training_targets_and_loss():
    """Same seed → the same t and ε for every prediction type (the draws do not change); the
    target is ε, α_t ε − σ_t x0 or x0 (t read back from the probe; float32 tables, atol 1e-6);
    ε models keep ``noise_pred``; the loss is the MSE of target and prediction."""
    x0 = np.random.default_rng(7).uniform(-1, 1, (64, 4, 4, 2)).astype(np.float32)
    outs = {kind: {k: to_np(v) for k, v in probe_model(kind)(x0, training=True).items()}
            for kind in PREDICTION_TYPES}
    eps_out = outs["epsilon"]
    assert set(eps_out) == {"noise", "noise_pred", "target", "prediction"}
    np.testing.assert_array_equal(eps_out["target"], eps_out["noise"])
    np.testing.assert_array_equal(eps_out["noise_pred"], eps_out["prediction"])
    t = eps_out["prediction"][:, 0, 0, 1].astype(np.int64)
    assert len(np.unique(t)) > 40
    shape = (-1, 1, 1, 1)
    alpha = SCHED.alphas.astype(np.float32)[t].reshape(shape)
    sigma = SCHED.sigmas.astype(np.float32)[t].reshape(shape)
    for kind in ("v", "x0"):
        out = outs[kind]
        assert set(out) == {"noise", "target", "prediction"}
        np.testing.assert_array_equal(out["noise"], eps_out["noise"])
        np.testing.assert_array_equal(out["prediction"], eps_out["prediction"])
    np.testing.assert_allclose(outs["v"]["target"], alpha * eps_out["noise"] - sigma * x0,
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(outs["x0"]["target"], x0)
    model = probe_model("v")
    y_pred = model(x0, training=True)
    loss = float(to_np(model.compute_loss(x0, None, y_pred)))
    expected = np.mean((to_np(y_pred["target"]) - to_np(y_pred["prediction"])) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_zero_terminal_snr_training_target_at_alpha_zero():
    """With a zero-terminal-SNR schedule the last label's x_t is pure noise and v = −x0
    (exactly: α = 0, σ = 1 in the float32 tables)."""
    model = probe_model("v", ZSCHED)
    rng = np.random.default_rng(8)
    x0, noise = rng.uniform(-1, 1, (2, 3, 4, 4, 2)).astype(np.float32)
    t = np.full((3,), ZSCHED.num_timesteps - 1, np.int32)
    np.testing.assert_array_equal(to_np(ZSCHED.q_sample(x0, t, noise)), noise)
    np.testing.assert_array_equal(to_np(model._target(x0, t, noise)), -x0)


def tiny_network():
    return ke.build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)


def test_v_model_fits_on_a_zero_terminal_snr_schedule():
    """The one compiled train step of this file: a v model on a ZTSNR schedule trains with
    ``fit`` (finite loss, EMA updated) and draws exactly t and ε per step, as ε models do."""
    model = ke.DiffusionModel(tiny_network(), schedule=ZSCHED, prediction_type="v", seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(11).uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32)
    history = model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    state = to_np(model.seed_generator.state.value)
    assert int(state[1]) == 2 * 2  # two steps, two draws (t, ε) each
    assert float(to_np(model.ema_updates.value)) == 2


def test_v_model_config_and_keras_round_trip(tmp_path):
    model = ke.DiffusionModel(tiny_network(), schedule=ZSCHED, prediction_type="v")
    config = model.get_config()
    assert config["prediction_type"] == "v"
    assert config["schedule"]["zero_terminal_snr"] is True
    eps_config = ke.DiffusionModel(tiny_network()).get_config()
    assert "prediction_type" not in eps_config
    assert "zero_terminal_snr" not in eps_config["schedule"]
    path = tmp_path / "v.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    assert again.prediction_type == "v" and again.schedule.zero_terminal_snr
    x = np.random.default_rng(9).standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.array([0.0, 999.0], np.float32)
    np.testing.assert_array_equal(to_np(again.denoise(x, t)), to_np(model.denoise(x, t)))
    # The samplers learn the type from the model.
    from keras_etsdm.samplers.base import prediction_type_of
    assert prediction_type_of(again) == "v" and prediction_type_of(again.denoise) == "v"


def test_export_endpoints_of_an_x0_model():
    """The exported ``denoise`` names its output "x0"; the exported ``sample`` loop (run
    eagerly here, as traced for the SavedModel) converts x̂0 itself, from α = 0 on a trailing
    grid, and equals ``build_loop(model.denoise, prediction_type="x0")``."""
    from keras_etsdm import export

    model = ke.DiffusionModel(tiny_network(), schedule=ZSCHED, prediction_type="x0")
    sampler = DDIMSampler(2, spacing="trailing", schedule=ZSCHED)
    endpoints = export._endpoint_functions(model, sampler)
    x = np.random.default_rng(10).standard_normal((2, 8, 8, 1)).astype(np.float32)
    out = endpoints["denoise"][0](x, np.array([3.0, 999.0], np.float32))
    assert set(out) == {"x0"}
    assert set(export._signature_docs(model, sampler)["denoise"]["outputs"]) == {"x0"}
    images = to_np(endpoints["sample"][0](x)["images"])
    by_hand = to_np(export.images_to_uint8(
        sampler.build_loop(model.denoise, prediction_type="x0")(x)))
    np.testing.assert_array_equal(images, by_hand)


def test_bad_inputs_are_clear_errors():
    net = tiny_network()
    with pytest.raises(ValueError, match="prediction_type"):
        ke.DiffusionModel(net, prediction_type="eps")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        ke.DiffusionModel(net, schedule=ZSCHED)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        ke.DiffusionModel(net, schedule=ZSCHED, prediction_type="epsilon")
    model = ke.DiffusionModel(net, schedule=ZSCHED, prediction_type="x0")
    with pytest.raises(ValueError, match="schedule=model.schedule"):
        DDIMSampler(5).sample(model, np.zeros((1, 8, 8, 1), np.float32))


def test_gin_bindings():
    import keras_etsdm.config as config

    gin.clear_config()
    try:
        gin.parse_config("""
            keras_etsdm.DiscreteVPSchedule.zero_terminal_snr = True
            keras_etsdm.DiscreteVPSchedule.num_timesteps = 100
            keras_etsdm.build_model.schedule = @keras_etsdm.DiscreteVPSchedule()
            keras_etsdm.build_model.prediction_type = 'v'
        """)
        model = config.build_model(image_size=8, channels=1,
                                   network_fn=lambda **kw: tiny_network())
        assert model.prediction_type == "v"
        assert model.schedule.zero_terminal_snr and model.schedule.num_timesteps == 100
    finally:
        gin.clear_config()


# ----- the Lipschitz diagnostic on v / x0 models ------------------------------------------------
class _EchoTime(layers.Layer):
    """Channel 0 echoes x_t, channel 1 the time condition: a stand-in v / x0 network."""

    def call(self, inputs):
        x, t = inputs["x"], inputs["t"]
        return ops.concatenate(
            [x[..., :1], ops.ones_like(x[..., :1]) * ops.reshape(t, (-1, 1, 1, 1))], axis=-1)


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_lipschitz_fn_converts_v_and_x0_to_the_eps_they_imply(prediction_type):
    from keras_etsdm.evaluation import lipschitz

    x_in, t_in = keras.Input((4, 4, 2), name="x"), keras.Input((), name="t")
    net = keras.Model({"x": x_in, "t": t_in}, _EchoTime()({"x": x_in, "t": t_in}))
    model = ke.DiffusionModel(net, prediction_type=prediction_type)
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
    t = np.array([5.0, 37.0, 640.0])  # 37: inside the piece [20, 40), condition 20
    native = lipschitz.model_denoise_fn(model, output="native")(x, t)
    eps = lipschitz.model_denoise_fn(model)(x, t)
    np.testing.assert_allclose(native[:, 0, 0, 1], [0.0, 20.0, 640.0])
    alpha, sigma = model.schedule.alphas[t.astype(int)], model.schedule.sigmas[t.astype(int)]
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    expected = s * x + a * native if prediction_type == "v" else (x - a * native) / s
    np.testing.assert_allclose(eps, expected, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="output"):
        lipschitz.model_denoise_fn(model, output="score")
