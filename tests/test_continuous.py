"""Continuous-time E-TSDM: schedules, training through the denoise seam, every sampler on the
continuous schedules against the closed-form Gaussian answer, the reverse-SDE samplers."""

import math

import numpy as np
import pytest

import keras
from keras import layers, ops

import keras_etsdm as ke
from keras_etsdm import config
from keras_etsdm.samplers import (DDIMSampler, DPMSolverSampler,
                                  EulerMaruyamaSampler, PredictorCorrectorSampler,
                                  ProbabilityFlowSampler, ReverseSDESampler, build_sampler)
from keras_etsdm.schedules import ContinuousVPSchedule, LinearVPSDE, schedule_from_config
from sampler_reference import execute_ddim_float64, execute_tables_float64, gaussian_flow

KINDS = ("linear", "quadratic", "cosine")
MU, S = 0.3, 0.5  # data N(μ, s²) per dimension


# ----- schedules ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_log_alpha_is_minus_half_the_integral_of_beta(kind):
    from scipy.integrate import quad
    sched = ContinuousVPSchedule(kind)
    for t in (sched.eps, 0.05, 0.5, sched.T):
        # β(u) = −2 f(u): log α(t) = −½ ∫₀ᵗ β(u) du.
        integral, _ = quad(lambda u: -2.0 * sched.marginal_log_mean_coeff_derivative(u),
                           0.0, t, epsabs=1e-13, epsrel=1e-12)
        assert float(sched.marginal_log_mean_coeff(t)) == pytest.approx(-0.5 * integral,
                                                                        rel=1e-9, abs=1e-13)
    assert float(sched.marginal_log_mean_coeff(0.0)) == pytest.approx(0.0, abs=1e-15)


def test_schedule_values_in_closed_form():
    lin, quad_, cos = (ContinuousVPSchedule(k) for k in KINDS)
    assert float(lin.marginal_log_mean_coeff(1.0)) == pytest.approx(-0.25 * 19.9 - 0.05)
    a, b = math.sqrt(0.1), math.sqrt(20.0) - math.sqrt(0.1)
    assert float(quad_.marginal_log_mean_coeff(1.0)) == pytest.approx(
        -((a + b) ** 3 - a**3) / (6 * b), rel=1e-12)
    s = 0.008
    expected = math.log(math.cos((0.5 + s) / (1 + s) * math.pi / 2) / math.cos(
        s / (1 + s) * math.pi / 2))
    assert float(cos.marginal_log_mean_coeff(0.5)) == pytest.approx(expected, rel=1e-12)
    assert cos.T == 0.9946 and lin.T == quad_.T == 1.0  # DPM-Solver's cosine end time


@pytest.mark.parametrize("kind", KINDS)
def test_inverses_derivative_and_ops_agree(kind):
    sched = ContinuousVPSchedule(kind)
    t = np.linspace(sched.eps, sched.T, 41)
    np.testing.assert_allclose(sched.time_of_log_mean_coeff(sched.marginal_log_mean_coeff(t)), t,
                               rtol=1e-10)
    np.testing.assert_allclose(sched.inverse_lambda(sched.marginal_lambda(t)), t, rtol=1e-9)
    h = 1e-7
    numeric = (sched.marginal_log_mean_coeff(t[:-1] + h)
               - sched.marginal_log_mean_coeff(t[:-1] - h)) / (2 * h)
    np.testing.assert_allclose(sched.marginal_log_mean_coeff_derivative(t[:-1]), numeric,
                               rtol=1e-5)
    alpha, sigma = sched.alpha_sigma(t.astype(np.float32))
    np.testing.assert_allclose(ops.convert_to_numpy(alpha), sched.marginal_alpha(t), rtol=2e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(sigma), sched.marginal_std(t), rtol=2e-6)


def test_continuous_schedule_config_round_trips_and_errors():
    for sched in (ContinuousVPSchedule("cosine", eps=1e-4), LinearVPSDE(beta_max=10.0)):
        again = schedule_from_config(sched.get_config())
        assert type(again) is type(sched) and again.get_config() == sched.get_config()
        assert keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(sched)).get_config() == sched.get_config()
    with pytest.raises(ValueError, match="Unknown continuous schedule kind"):
        ContinuousVPSchedule("sigmoid")
    with pytest.raises(ValueError, match="eps"):
        ContinuousVPSchedule(eps=1.0)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        ContinuousVPSchedule(beta_min=1.0, beta_max=0.5)


# ----- the model: training and the seam in continuous time --------------------------------
class Probe(layers.Layer):
    """Channel 0 echoes x_t, channel 1 holds the time condition the network received."""

    def call(self, inputs):
        x, t = inputs["x"], inputs["t"]
        t_map = ops.ones_like(x[..., :1]) * ops.reshape(t, (-1, 1, 1, 1))
        return ops.concatenate([x[..., :1], t_map], axis=-1)


def probe_model(schedule, sharing=None):
    x = keras.Input((4, 4, 2), name="x")
    t = keras.Input((), name="t")
    net = keras.Model({"x": x, "t": t}, Probe()({"x": x, "t": t}))
    return ke.DiffusionModel(net, schedule=schedule, sharing=sharing, seed=3)


def test_default_sharing_is_continuous_and_the_seam_rescales_after_sharing():
    model = probe_model(ContinuousVPSchedule())
    assert model.sharing == ke.TimestepSharing(0.1, 5)
    x = np.zeros((6, 4, 4, 2), np.float32)
    # Strictly inside pieces: 0.031 and 0.039 share the condition 0.02; 0.099 is in the last
    # piece [0.08, 0.1); at and above t̃ the time passes unchanged.
    t = np.array([0.001, 0.031, 0.039, 0.099, 0.1, 0.75], np.float32)
    out = ops.convert_to_numpy(model.denoise(x, t))[:, 0, 0, 1]
    np.testing.assert_allclose(out, 999.0 * np.array([0, 0.02, 0.02, 0.08, 0.1, 0.75]),
                               rtol=1e-6)


@pytest.mark.parametrize("use_etsdm", [True, False])
def test_training_draws_continuous_t_and_feeds_the_shared_condition(use_etsdm):
    sharing = None if use_etsdm else ke.TimestepSharing(0, 0)
    sched = ContinuousVPSchedule("cosine")
    model = probe_model(sched, sharing)
    # x0 = 0: x_t = σ(t) ε, so σ(t) = x_t / ε and t follows from the closed-form inverse.
    x0 = np.zeros((2048, 4, 4, 2), np.float32)
    out = model(x0, training=True)
    noise = ops.convert_to_numpy(out["noise"])[:, 0, 0, 0].astype(np.float64)
    x_t = ops.convert_to_numpy(out["noise_pred"])[:, 0, 0, 0].astype(np.float64)
    cond = ops.convert_to_numpy(out["noise_pred"])[:, 0, 0, 1].astype(np.float64)
    usable = np.abs(noise) > 0.2  # σ = x_t / ε is well conditioned
    noise, x_t, cond = noise[usable], x_t[usable], cond[usable]
    sigma = np.clip(x_t / noise, 0.0, 1.0 - 1e-7)
    t_true = sched.time_of_log_mean_coeff(0.5 * np.log1p(-sigma**2))
    assert t_true.min() >= sched.eps * 0.99 and t_true.max() <= sched.T * 1.0001
    assert np.mean(t_true < 0.1) == pytest.approx(0.1, abs=0.03)  # t ~ U(eps, T)
    expected = model.sharing(t_true.astype(np.float32))
    expected = 999.0 * ops.convert_to_numpy(expected).astype(np.float64)
    # Away from piece boundaries (float32 rounding of σ moves t by ~1e-5 there).
    inside = np.abs(np.mod(t_true + 0.01, 0.02) - 0.01) > 2e-4
    np.testing.assert_allclose(cond[inside], expected[inside], rtol=1e-3, atol=0.05)
    if use_etsdm:
        assert np.all(np.isin(np.round(cond[t_true < 0.099] / 999, 4),
                              [0.0, 0.02, 0.04, 0.06, 0.08]))


def test_continuous_bad_input_is_a_clear_error():
    sched = ContinuousVPSchedule()
    with pytest.raises(ValueError, match=r"continuous time interval"):
        probe_model(sched, ke.TimestepSharing(100, 5))  # a discrete t̃ on a continuous schedule
    with pytest.raises(ValueError, match=r"continuous time interval"):
        probe_model(sched, ke.TimestepSharing(1.0, 5))
    model = probe_model(sched)
    with pytest.raises(ValueError, match=r"\[eps, T\]"):
        model.denoise(np.zeros((2, 4, 4, 2), np.float32), np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="was built for"):
        DDIMSampler(5).sample(model, np.zeros((2, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="sharing-aware grid"):
        build_sampler("euler_maruyama", sched, 10, {"sharing_aware": True}, model.sharing)


def test_lipschitz_diagnostic_in_continuous_time():
    """Default grid: one network label (1/999 in t) per step; a shared continuous model is
    constant inside its pieces, so K is 0 there and non-zero at the piece ends."""
    from keras_etsdm.evaluation import lipschitz

    sched = ContinuousVPSchedule()
    model = probe_model(sched)
    x0 = np.random.default_rng(0).normal(size=(4, 4, 4, 2)).astype(np.float32)
    curve = lipschitz.lipschitz_curve(lipschitz.model_denoise_fn(model), x0, sched)
    assert curve["time_unit"] == "t" and curve["step"] == pytest.approx(1 / 999)
    t, k = curve["t"], curve["k_one_step"]
    assert t[0] == pytest.approx(sched.eps) and t[-1] + curve["step"] <= sched.T + 1e-9
    inside = (t > 0.021) & (t < 0.038)  # t and t + 1/999 both in the piece [0.02, 0.04)
    assert inside.sum() > 10 and np.all(k[inside] == 0.0)
    assert np.all(k[(t > 0.2) & (t < 0.9)] > 0)  # unshared: the condition moves with t


def tiny_unet():
    return ke.build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0)


def test_continuous_model_fits_saves_and_samples(tmp_path):
    sched = ContinuousVPSchedule("linear")
    model = ke.DiffusionModel(tiny_unet(), schedule=sched, ema_decay=0.9, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)).astype(np.float32)
    history = model.fit(x, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = str(tmp_path / "continuous.keras")
    model.save(path)
    again = keras.models.load_model(path)
    assert isinstance(again.schedule, ContinuousVPSchedule)
    assert again.schedule.get_config() == sched.get_config() and again.sharing == model.sharing
    probe = np.random.default_rng(1).standard_normal((2, 8, 8, 1)).astype(np.float32)
    t = np.array([0.031, 0.5], np.float32)
    np.testing.assert_allclose(ops.convert_to_numpy(again.denoise(probe, t)),
                               ops.convert_to_numpy(model.denoise(probe, t)), atol=1e-6)
    # Inside one piece the shared network is constant in t.
    np.testing.assert_array_equal(ops.convert_to_numpy(model.denoise(probe, 0.021)),
                                  ops.convert_to_numpy(model.denoise(probe, 0.039)))
    for sampler in (DDIMSampler(4, schedule=sched), DPMSolverSampler(4, schedule=sched),
                    EulerMaruyamaSampler(4, schedule=sched)):
        out = ops.convert_to_numpy(model.sample(sampler, 2, seed=0))
        assert out.shape == (2, 8, 8, 1) and np.all(np.isfinite(out))


def test_gin_continuous_configs(repo_root):
    import gin
    for name, bindings, sharing in (
            ("mnist_continuous.gin", [], ke.TimestepSharing(0.1, 5)),
            ("mnist_continuous.gin", ["USE_ETSDM = False"], ke.TimestepSharing(0, 0)),
            ("cifar10_continuous.gin", ["DATA_PATH = '/nowhere'"], ke.TimestepSharing(0.1, 5))):
        gin.clear_config()
        config.parse([name], bindings, search_paths=[repo_root + "/gin"])
        kwargs = {"network_fn": lambda **_: tiny_unet(), "image_size": 8, "channels": 1}
        model = config.build_model(**kwargs)
        assert isinstance(model.schedule, ContinuousVPSchedule) and model.sharing == sharing
        assert model.schedule.get_config()["kind"] == "linear"
    gin.clear_config()


# ----- samplers on continuous schedules vs the closed form -----------------------------------
def gaussian_eps_t(schedule):
    """ε*(x, t) for data N(μ, s²) on a continuous schedule (numpy float64; label = t)."""

    def eps(x, t):
        a, sig = schedule.marginal_alpha(t), schedule.marginal_std(t)
        return sig * (x - a * MU) / (a * a * S * S + sig * sig)

    return eps


def gaussian_eps_ops(schedule):
    """The same ε* in keras.ops float32, for the compiled loops."""

    def eps(x, t):
        alpha, sigma = schedule.alpha_sigma(t)
        alpha = ops.reshape(alpha, (-1, 1))
        sigma = ops.reshape(sigma, (-1, 1))
        return sigma * (x - alpha * MU) / (alpha * alpha * S * S + sigma * sigma)

    return eps


X_T = np.linspace(-2.5, 2.5, 11)


def exact_end(schedule, t_end):
    """The exact PF-ODE image of X_T at t = T under data N(μ, s²) (t_end = 0: α = 1, σ = 0)."""
    a_T, s_T = schedule.marginal_alpha(schedule.T), schedule.marginal_std(schedule.T)
    if t_end == 0.0:
        return gaussian_flow(X_T, MU, S, a_T, s_T, 1.0, 0.0)
    return gaussian_flow(X_T, MU, S, a_T, s_T, schedule.marginal_alpha(t_end),
                         schedule.marginal_std(t_end))


CASES = {
    "ddim": lambda n, sch: DDIMSampler(n, spacing="trailing", schedule=sch),
    "dpm++2M_logSNR": lambda n, sch: DPMSolverSampler(n, 2, skip_type="logSNR", schedule=sch,
                                                      lower_order_final=False),
    "dpm++3S_logSNR": lambda n, sch: DPMSolverSampler(n, 3, method="singlestep",
                                                      skip_type="logSNR", schedule=sch),
    "dpm2M_time_uniform": lambda n, sch: DPMSolverSampler(n, 2, algorithm="dpmsolver",
                                                          schedule=sch, lower_order_final=False),
}
EXPECTED_ORDER = {"ddim": 1, "dpm++2M_logSNR": 2, "dpm++3S_logSNR": 3, "dpm2M_time_uniform": 2}
# The reference's singlestep order schedule ends with an order-1 step when NFE % 3 is 0 or 1
# (asymptotically second order then); NFE ≡ 2 (mod 3) ends with order 2 and shows order 3.
ORDER_NFE = {"dpm++3S_logSNR": (98, 194, 386)}


def closed_form_error(name, nfe, schedule):
    sampler = CASES[name](nfe, schedule)
    eps = gaussian_eps_t(schedule)
    if name == "ddim":
        out, t_end = execute_ddim_float64(sampler, eps, X_T), 0.0
    else:
        out, t_end = execute_tables_float64(sampler, eps, X_T), schedule.eps
    return float(np.max(np.abs(out - exact_end(schedule, t_end))))


@pytest.mark.parametrize("kind", ("linear", "cosine"))
@pytest.mark.parametrize("name", sorted(CASES))
def test_samplers_converge_at_their_order_on_continuous_schedules(kind, name):
    """Float64 execution of each sampler's own tables vs the exact PF-ODE map: the error falls
    with NFE and the slope over 24 → 96 NFE is the solver's order (README table:
    benchmarks/continuous_closed_form.py)."""
    schedule = ContinuousVPSchedule(kind)
    fit = ORDER_NFE.get(name, (24, 48, 96))
    errors = {n: closed_form_error(name, n, schedule) for n in (10, 20, 50) + fit}
    assert errors[50] < errors[20] < errors[10]
    slope = -np.polyfit(np.log(fit), np.log([errors[n] for n in fit]), 1)[0]
    assert slope == pytest.approx(EXPECTED_ORDER[name], abs=0.35)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_samplers_match_their_float64_tables(kind):
    """The compiled float32 loops (the denoiser called at t itself) equal the float64 tables."""
    schedule = ContinuousVPSchedule(kind)
    x = X_T.reshape(-1, 1).astype(np.float32)
    for name in ("ddim", "dpm++3S_logSNR"):
        sampler = CASES[name](20, schedule)
        out = ops.convert_to_numpy(sampler.sample(gaussian_eps_ops(schedule), x))[:, 0]
        runner = execute_ddim_float64 if name == "ddim" else execute_tables_float64
        np.testing.assert_allclose(out, runner(sampler, gaussian_eps_t(schedule), X_T),
                                   atol=2e-4)


def test_pf_ode_on_cosine_meets_its_tolerance():
    schedule = ContinuousVPSchedule("cosine")
    sampler = ProbabilityFlowSampler(rtol=1e-5, atol=1e-5, schedule=schedule)
    out = ops.convert_to_numpy(sampler.sample(gaussian_eps_ops(schedule),
                                              X_T.reshape(-1, 1).astype(np.float32)))[:, 0]
    np.testing.assert_allclose(out, exact_end(schedule, schedule.eps), atol=5e-5)
    assert sampler.last_nfe > 10


# ----- reverse-SDE samplers -------------------------------------------------------------------
def em_law(sampler, schedule):
    """Exact mean and variance of the sampler's output for data N(μ, s²) from x_T ~ N(0, 1):
    with the linear ε* every step is x ← A x + c + n z, so both propagate in closed form."""
    tables = sampler.tables
    mean, var = 0.0, 1.0
    for i in range(sampler.num_iterations):
        t = float(tables["label"][i])
        a, sig = schedule.marginal_alpha(t), schedule.marginal_std(t)
        k = sig / (a * a * S * S + sig * sig)  # ε* = k (x − α μ)
        gain = tables["coef_x"][i] + tables["coef_eps"][i] * k
        mean = gain * mean - tables["coef_eps"][i] * k * a * MU
        var = gain * gain * var + tables["noise_std"][i] ** 2
    return mean, var


@pytest.mark.parametrize("predictor", ("euler_maruyama", "reverse_diffusion"))
def test_reverse_sde_is_weak_first_order(predictor):
    """The exact law of the discretised reverse SDE approaches the law of x_eps,
    N(α μ, α² s² + σ²), with mean and variance errors ∝ 1/S (weak order 1). (num_scales is
    raised only to allow S > 1000; ε* does not use it.)"""
    schedule = ContinuousVPSchedule("linear", num_scales=10000)
    a, sig = schedule.marginal_alpha(schedule.eps), schedule.marginal_std(schedule.eps)
    steps = (800, 1600, 3200)
    laws = [em_law(ReverseSDESampler(n, predictor, schedule=schedule), schedule) for n in steps]
    mean_err = [abs(m - a * MU) for m, _ in laws]
    var_err = [abs(v - (a * a * S * S + sig * sig)) for _, v in laws]
    for errors in (mean_err, var_err):
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert slope == pytest.approx(1.0, abs=0.1)
    assert max(mean_err[-1], var_err[-1]) < 1e-3


def test_compiled_euler_maruyama_samples_its_exact_law():
    schedule = ContinuousVPSchedule("cosine")
    sampler = EulerMaruyamaSampler(50, schedule=schedule)
    noise = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    out = ops.convert_to_numpy(sampler.sample(gaussian_eps_ops(schedule), noise, seed=3))
    mean, var = em_law(sampler, schedule)
    n = out.size
    assert out.mean() == pytest.approx(mean, abs=4 * math.sqrt(var / n))
    assert out.var() == pytest.approx(var, abs=4 * var * math.sqrt(2.0 / n))
    again = ops.convert_to_numpy(sampler.sample(gaussian_eps_ops(schedule), noise, seed=3))
    np.testing.assert_array_equal(out, again)  # the step noise is seeded


def test_predictor_corrector_samples_the_data_law():
    """score_sde's VP PC sampler (reverse diffusion + one Langevin step, snr 0.16): 2 NFE per
    step, and the samples' mean / variance match N(α μ, α² s² + σ²) at eps."""
    schedule = ContinuousVPSchedule("linear")
    sampler = PredictorCorrectorSampler(200, schedule=schedule)
    assert sampler.num_iterations == 400
    noise = np.random.default_rng(1).standard_normal((2048, 8)).astype(np.float32)
    out = ops.convert_to_numpy(sampler.sample(gaussian_eps_ops(schedule), noise, seed=0))
    a, sig = schedule.marginal_alpha(schedule.eps), schedule.marginal_std(schedule.eps)
    assert out.mean() == pytest.approx(a * MU, abs=0.02)
    assert out.std() == pytest.approx(math.sqrt(a * a * S * S + sig * sig), rel=0.03)


def test_reverse_sde_options_are_checked():
    with pytest.raises(ValueError, match="predictor"):
        ReverseSDESampler(10, predictor="heun")
    with pytest.raises(ValueError, match="snr"):
        PredictorCorrectorSampler(10, snr=0.0)
    with pytest.raises(ValueError, match="eps"):
        EulerMaruyamaSampler(10, eps=2.0, schedule=ContinuousVPSchedule())
    sampler = build_sampler("pc", ContinuousVPSchedule("quadratic"), 10, {"snr": 0.1})
    assert sampler.num_iterations == 20 and sampler.labels[0] == 1.0


# ----- zero terminal SNR in continuous time, v / x0 prediction ------------------------------------
@pytest.mark.parametrize("kind", ("linear", "cosine"))
def test_continuous_zero_terminal_snr_schedule(kind):
    base = ContinuousVPSchedule(kind)
    sched = ContinuousVPSchedule(kind, zero_terminal_snr=True)
    a_T = base.marginal_alpha(base.T)
    t = np.linspace(sched.eps, sched.T, 41)
    # α'(t) = (α(t) − α_T)/(1 − α_T): unchanged at 0, exactly 0 at T (Lin et al., Algorithm 1).
    np.testing.assert_allclose(sched.marginal_alpha(t), (base.marginal_alpha(t) - a_T) / (1 - a_T),
                               rtol=1e-12, atol=1e-15)
    assert sched.marginal_alpha(sched.T) == 0.0 and sched.marginal_std(sched.T) == 1.0
    assert float(sched.marginal_alpha(0.0)) == pytest.approx(1.0, abs=1e-15)
    inner = t[:-1]
    np.testing.assert_allclose(sched.time_of_log_mean_coeff(sched.marginal_log_mean_coeff(inner)),
                               inner, rtol=1e-9)
    h = 1e-7
    numeric = (sched.marginal_log_mean_coeff(inner[:-1] + h)
               - sched.marginal_log_mean_coeff(inner[:-1] - h)) / (2 * h)
    np.testing.assert_allclose(sched.marginal_log_mean_coeff_derivative(inner[:-1]), numeric,
                               rtol=1e-5)
    alpha, sigma = sched.alpha_sigma(t.astype(np.float32))
    np.testing.assert_allclose(ops.convert_to_numpy(alpha), sched.marginal_alpha(t), rtol=2e-5,
                               atol=1e-7)
    np.testing.assert_allclose(ops.convert_to_numpy(sigma), sched.marginal_std(t), rtol=2e-6)
    assert float(sched.marginal_alpha(sched.ode_T)) == pytest.approx(2.0**-12, rel=1e-9)
    assert schedule_from_config(sched.get_config()).get_config() == sched.get_config()
    assert "zero_terminal_snr" not in base.get_config()
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        probe_model(sched)  # an ε-prediction model cannot use it


def gaussian_v_t(schedule):
    """v*(x, t) = α ε* − σ x0* for data N(μ, s²) (numpy float64; exact at α = 0: v* = −μ)."""

    def v(x, t):
        a, sig = schedule.marginal_alpha(t), schedule.marginal_std(t)
        var = a * a * S * S + sig * sig
        eps = sig * (x - a * MU) / var
        x0 = MU + a * S * S * (x - a * MU) / var
        return a * eps - sig * x0

    return v


class GaussianV:
    """The same v* in keras.ops float32, marked as a v-prediction denoiser for the samplers."""

    prediction_type = "v"

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, x, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, sig = ops.reshape(alpha, (-1, 1)), ops.reshape(sigma, (-1, 1))
        var = a * a * S * S + sig * sig
        return a * sig * (x - a * MU) / var - sig * (MU + a * S * S * (x - a * MU) / var)


def execute_ddim_v_float64(sampler, v_fn, x):
    """A deterministic DDIMSampler's tables in float64 with a v-prediction (exact at α = 0)."""
    t, x = sampler.tables, np.asarray(x, np.float64)
    for i in range(sampler.num_iterations):
        v = v_fn(x, t["label"][i])
        eps = t["sigma"][i] * x + t["alpha"][i] * v
        x0 = t["alpha"][i] * x - t["sigma"][i] * v
        x = t["alpha_prev"][i] * x0 + t["direction"][i] * eps
    return x


def test_ddim_from_pure_noise_on_continuous_zero_terminal_snr():
    """DDIM (trailing) starts at t = T where α = 0 and converges at first order to the exact
    PF-ODE map from pure noise; the compiled float32 loop equals its float64 tables; an ε
    denoiser is refused there."""
    sched = ContinuousVPSchedule("cosine", zero_terminal_snr=True)
    exact = gaussian_flow(X_T, MU, S, 0.0, 1.0, 1.0, 0.0)  # from α = 0 to x0
    errors = {}
    for n in (10, 20, 50, 100, 200):
        sampler = DDIMSampler(n, spacing="trailing", schedule=sched)
        assert sampler.tables["alpha"][0] == 0.0
        errors[n] = np.max(np.abs(execute_ddim_v_float64(sampler, gaussian_v_t(sched), X_T)
                                  - exact))
    assert errors[200] < errors[100] < errors[50] < errors[20] < errors[10]
    slope = -np.polyfit(np.log([50, 100, 200]), np.log([errors[n] for n in (50, 100, 200)]), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.25)
    sampler = DDIMSampler(20, spacing="trailing", schedule=sched)
    out = ops.convert_to_numpy(sampler.sample(GaussianV(sched), X_T.reshape(-1, 1)
                                              .astype(np.float32)))[:, 0]
    np.testing.assert_allclose(out, execute_ddim_v_float64(sampler, gaussian_v_t(sched), X_T),
                               atol=2e-4)
    with pytest.raises(ValueError, match="α = 0"):
        sampler.sample(gaussian_eps_ops(sched), X_T.reshape(-1, 1).astype(np.float32))


def test_dpm_solver_on_continuous_zero_terminal_snr_starts_at_ode_T():
    sched = ContinuousVPSchedule("linear", zero_terminal_snr=True)
    sampler = DPMSolverSampler(50, order=2, skip_type="logSNR", schedule=sched)
    assert sampler.labels[0] == pytest.approx(sched.ode_T)
    x = X_T.reshape(-1, 1).astype(np.float32)
    out = ops.convert_to_numpy(sampler.sample(GaussianV(sched), x))[:, 0]
    start = sched.ode_T
    exact = gaussian_flow(X_T, MU, S, sched.marginal_alpha(start), sched.marginal_std(start),
                          sched.marginal_alpha(sched.eps), sched.marginal_std(sched.eps))
    assert np.max(np.abs(out - exact)) < 1e-2


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_v_target_in_continuous_time(zero_terminal_snr):
    """The v target uses the closed-form α(t), σ(t): with x0 = 0, target = α(t) ε."""
    sched = ContinuousVPSchedule("linear", zero_terminal_snr=zero_terminal_snr)
    x = keras.Input((4, 4, 2), name="x")
    t = keras.Input((), name="t")
    net = keras.Model({"x": x, "t": t}, Probe()({"x": x, "t": t}))
    model = ke.DiffusionModel(net, schedule=sched, prediction_type="v", seed=3)
    out = model(np.zeros((512, 4, 4, 2), np.float32), training=True)
    times = ops.convert_to_numpy(out["prediction"])[:, 0, 0, 1] / 999.0  # f(t) = t above t̃
    keep = times >= 0.1
    noise = ops.convert_to_numpy(out["noise"])[keep, 0, 0, 0]
    target = ops.convert_to_numpy(out["target"])[keep, 0, 0, 0]
    np.testing.assert_allclose(target, sched.marginal_alpha(times[keep]) * noise, atol=2e-5)


class GaussianX0(GaussianV):
    """x0*(x, t) = E[x0 | x_t = x] for data N(μ, s²), an x0-prediction denoiser."""

    prediction_type = "x0"

    def __call__(self, x, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, sig = ops.reshape(alpha, (-1, 1)), ops.reshape(sigma, (-1, 1))
        return MU + a * S * S * (x - a * MU) / (a * a * S * S + sig * sig)


def test_reverse_sde_samplers_convert_v_and_x0():
    """With the same step noise, v* and x0* denoisers give the ε* samples (the samplers convert
    with the α, σ of each t)."""
    sched = ContinuousVPSchedule("cosine")
    x = X_T.reshape(-1, 1).astype(np.float32)
    for sampler in (EulerMaruyamaSampler(30, schedule=sched),
                    PredictorCorrectorSampler(15, schedule=sched)):
        step_noise = np.random.default_rng(2).standard_normal(
            (sampler.num_iterations,) + x.shape).astype(np.float32)
        ref = ops.convert_to_numpy(sampler.sample(gaussian_eps_ops(sched), x,
                                                  step_noise=step_noise))
        for denoiser in (GaussianV(sched), GaussianX0(sched)):
            out = ops.convert_to_numpy(sampler.sample(denoiser, x, step_noise=step_noise))
            np.testing.assert_allclose(out, ref, atol=1e-4)
