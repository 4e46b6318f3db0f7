"""Schedule tables against hand-computed values, and the continuous-time view."""

import math

import numpy as np
import pytest

from keras_etsdm.schedules import DiscreteVPSchedule, LinearVPSDE, make_betas


@pytest.fixture(scope="module")
def linear():
    return DiscreteVPSchedule("linear", 1000)


def test_linear_table_ends(linear):
    assert linear.betas[0] == pytest.approx(1e-4, abs=0)
    assert linear.betas[-1] == pytest.approx(0.02, rel=1e-15)
    assert linear.alphas_cumprod[0] == pytest.approx(1 - 1e-4, rel=1e-15)
    # ᾱ_{T-1} = Π (1 − β_k), computed independently in plain python.
    prod = 1.0
    for k in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * k / 999)
    assert linear.alphas_cumprod[-1] == pytest.approx(prod, rel=1e-10)
    assert prod == pytest.approx(4.036e-5, rel=1e-3)  # the published DDPM value


def test_lambda_at_both_ends(linear):
    assert linear.lambdas[0] == pytest.approx(0.5 * math.log((1 - 1e-4) / 1e-4), rel=1e-12)
    ab = linear.alphas_cumprod[-1]
    assert linear.lambdas[-1] == pytest.approx(0.5 * math.log(ab / (1 - ab)), rel=1e-12)
    assert linear.lambdas[0] == pytest.approx(4.60512, abs=1e-5)


def test_alpha_sigma_identities(linear):
    np.testing.assert_allclose(linear.alphas**2 + linear.sigmas**2, 1.0, rtol=1e-14)
    np.testing.assert_allclose(linear.alphas, np.sqrt(linear.alphas_cumprod), rtol=1e-14)
    assert np.all(np.diff(linear.lambdas) < 0)


def test_quadratic_and_cosine():
    quad = make_betas("quadratic", 1000)
    assert quad[0] == pytest.approx(1e-4) and quad[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(np.sqrt(quad)), (0.02**0.5 - 1e-4**0.5) / 999, rtol=1e-9)
    cos = DiscreteVPSchedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for n in (0, 1, 500, 900):
        assert cos.alphas_cumprod[n] == pytest.approx(f(n + 1) / f(0), rel=1e-10)
    assert cos.betas.max() <= 0.999


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown schedule kind 'cosin'"):
        make_betas("cosin")


def test_continuous_view_hits_the_knots(linear):
    t = linear.t_knots
    np.testing.assert_allclose(linear.marginal_log_mean_coeff(t), linear.log_alphas, rtol=1e-13)
    np.testing.assert_allclose(linear.marginal_lambda(t), linear.lambdas, rtol=1e-10)
    np.testing.assert_allclose(linear.label(t), np.arange(1000), atol=1e-9)
    assert linear.eps == 1e-3 and linear.label(1.0) == pytest.approx(999)


def test_interpolation_is_linear_between_knots(linear):
    t = (linear.t_knots[10] + linear.t_knots[11]) / 2
    expected = (linear.log_alphas[10] + linear.log_alphas[11]) / 2
    assert linear.marginal_log_mean_coeff(t) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine"])
def test_inverse_lambda_round_trip(kind):
    sched = DiscreteVPSchedule(kind, 1000)
    t = np.linspace(sched.eps, 1.0, 2001)
    np.testing.assert_allclose(sched.inverse_lambda(sched.marginal_lambda(t)), t, atol=1e-9)


def test_linear_vpsde():
    sde = LinearVPSDE()
    assert sde.marginal_log_mean_coeff(1.0) == pytest.approx(-0.25 * 19.9 - 0.05)
    t = np.linspace(1e-3, 1.0, 101)
    np.testing.assert_allclose(sde.inverse_lambda(sde.marginal_lambda(t)), t, rtol=1e-9)
    # The denoiser's time coordinate is t; only the network input is rescaled (score_sde: 999 t).
    assert sde.label(0.25) == 0.25
    assert float(sde.network_time(np.float32(1.0))) == pytest.approx(999)


def test_q_sample_uses_the_table(linear):
    from keras import ops
    x0 = np.ones((3, 2, 2, 1), np.float32)
    noise = np.full((3, 2, 2, 1), 2.0, np.float32)
    t = np.array([0, 99, 999])
    out = ops.convert_to_numpy(linear.q_sample(x0, t, noise))
    expected = linear.alphas[t] + 2.0 * linear.sigmas[t]
    np.testing.assert_allclose(out[:, 0, 0, 0], expected, rtol=1e-6)


def test_config_round_trip():
    sched = DiscreteVPSchedule("cosine", 500)
    again = DiscreteVPSchedule.from_config(sched.get_config())
    np.testing.assert_array_equal(again.betas, sched.betas)
