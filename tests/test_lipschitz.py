"""The Lipschitz-in-t diagnostic on closed-form ε* (where the answer is known) and on a model."""

import numpy as np
import pytest

import keras
from keras_etsdm import DiffusionModel, DiscreteVPSchedule, LinearVPSDE, TimestepSharing
from keras_etsdm.evaluation import lipschitz

MU, S, DIM = 0.3, 0.1, 4


@pytest.fixture(scope="module")
def schedule():
    return DiscreteVPSchedule()


@pytest.fixture(scope="module")
def x0():
    return np.random.default_rng(0).normal(MU, S, (64, DIM))


def _gaussian_eps(schedule, sharing=None):
    return lipschitz.GaussianMixtureEpsStar(np.full(DIM, MU), S, schedule, sharing=sharing)


def test_gaussian_mixture_eps_star_matches_the_single_gaussian_formula(schedule):
    eps = _gaussian_eps(schedule)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, DIM))
    t = rng.integers(0, 1000, 10).astype(np.float64)
    a, s = schedule.alphas[t.astype(int)], schedule.sigmas[t.astype(int)]
    expected = s[:, None] * (x - a[:, None] * MU) / (a[:, None] ** 2 * S**2 + s[:, None] ** 2)
    np.testing.assert_allclose(eps(x, t), expected, rtol=1e-10)


def test_mixture_posterior_mean_uses_the_nearest_mode_when_modes_are_far(schedule):
    means = np.array([[1.0, 0.0], [-1.0, 0.0]])
    std = 0.01
    eps = lipschitz.GaussianMixtureEpsStar(means, std, schedule)
    x = np.array([[0.9, 0.05], [-1.1, 0.0]])
    x0_hat = eps.posterior_mean(x, np.zeros(2))
    # One-component posterior E[x0 | x] = μ + α s² (x − α μ) / (α² s² + σ²) of the nearer mode.
    a, s = schedule.alphas[0], schedule.sigmas[0]
    expected = means + a * std**2 * (x - a * means) / (a**2 * std**2 + s**2)
    np.testing.assert_allclose(x0_hat, expected, rtol=1e-9)


def test_baseline_one_step_difference_matches_the_closed_form(schedule, x0):
    curve = lipschitz.lipschitz_curve(_gaussian_eps(schedule), x0, schedule, seed=5)
    t = np.arange(999)
    assert np.array_equal(curve["t"], t) and curve["delta"] == 0.0
    assert np.all(np.isnan(curve["k_shared_slope"]))
    # ε*(x,t) − ε*(x,t+1) = (c_t − c_{t+1}) x − (c_t α_t − c_{t+1} α_{t+1}) μ,
    # c_t = σ_t / (α_t² s² + σ_t²), with x = α_t x0 + σ_t ε and the diagnostic's seeded ε.
    noise = np.random.default_rng(5).standard_normal(x0.shape).astype(np.float32)
    a, s = schedule.alphas, schedule.sigmas
    c = s / (a**2 * S**2 + s**2)
    x0f = x0.astype(np.float32).astype(np.float64)
    expected = []
    for ti in [0, 1, 19, 20, 99, 100, 500, 998]:
        x = (a[ti] * x0f + s[ti] * noise).astype(np.float32).astype(np.float64)
        diff = (c[ti] - c[ti + 1]) * x - (c[ti] * a[ti] - c[ti + 1] * a[ti + 1]) * MU
        expected.append(np.linalg.norm(diff, axis=1).mean())
    np.testing.assert_allclose(curve["k_one_step"][[0, 1, 19, 20, 99, 100, 500, 998]], expected,
                               rtol=1e-9)
    # Largest at t = 0 and decreasing over the first steps (where σ changes fastest).
    k = curve["k_one_step"]
    assert k[0] == k.max()
    assert np.all(np.diff(k[:15]) < 0)
    assert k[0] > 50 * k[500]


def test_baseline_k_grows_without_bound_as_t_goes_to_zero():
    """Continuous VP-SDE (σ_t → 0 as t → 0): K(t) = |∂ε*/∂t| grows like t^(−1/2), unbounded.

    Near 0, σ_t² ≈ β_min t and ε* ≈ σ_t α_t (x0 − μ) / s², so ∂ε*/∂t ∝ t^(−1/2) once σ_t ≪ s
    (t ≪ s² / β_min = 0.1 here).
    """
    sde = LinearVPSDE()
    eps = lipschitz.GaussianMixtureEpsStar(np.full(DIM, MU), S, sde)
    x0 = np.random.default_rng(0).normal(MU, S, (64, DIM))
    times = np.array([1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7])
    k = np.array([lipschitz.lipschitz_curve(eps, x0, sde, timesteps=[t], step=t / 1000)
                  ["k_one_step"][0] for t in times])
    assert np.all(np.diff(k) > 0)
    slope = np.polyfit(np.log(times[3:]), np.log(k[3:]), 1)[0]  # asymptotic regime
    assert slope == pytest.approx(-0.5, abs=0.01)
    assert k[-1] > 50 * k[0]


def test_shared_one_step_difference_is_zero_inside_pieces(schedule, x0):
    sharing = TimestepSharing(100, 5)
    shared = lipschitz.lipschitz_curve(_gaussian_eps(schedule, sharing), x0, schedule,
                                       sharing=sharing, seed=5)
    base = lipschitz.lipschitz_curve(_gaussian_eps(schedule), x0, schedule, seed=5)
    k = shared["k_one_step"]
    jumps = [19, 39, 59, 79, 99]  # t and t + 1 in different pieces (99 → 100 leaves sharing)
    inside = np.setdiff1d(np.arange(100), jumps)
    assert np.all(k[inside] == 0.0)
    assert np.all(k[jumps] > 0.0)
    # From t̃ on the shared denoiser is the baseline one.
    np.testing.assert_array_equal(k[100:], base["k_one_step"][100:])
    np.testing.assert_array_equal(shared["k_shared_slope"][100:], base["k_one_step"][100:])
    assert shared["delta"] == 20.0 and shared["t_tilde"] == 100.0
    assert "slope between adjacent shared values" in shared["description"]


def test_shared_slope_is_the_slope_between_adjacent_shared_values(schedule, x0):
    sharing = TimestepSharing(100, 5)
    shared_eps = _gaussian_eps(schedule, sharing)
    plain_eps = _gaussian_eps(schedule)
    curve = lipschitz.lipschitz_curve(shared_eps, x0, schedule, sharing=sharing, seed=5,
                                      timesteps=[0, 7, 19, 20, 55, 99])
    noise = np.random.default_rng(5).standard_normal(x0.shape).astype(np.float32)
    x0f = x0.astype(np.float32)
    for i, (t, lo) in enumerate([(0, 0), (7, 0), (19, 0), (20, 20), (55, 40), (99, 80)]):
        x = (schedule.alphas[t] * x0f + schedule.sigmas[t] * noise).astype(np.float32)
        hi = lo + 20
        diff = plain_eps(x, np.full(len(x), float(hi))) - plain_eps(x, np.full(len(x), float(lo)))
        expected = np.linalg.norm(diff, axis=1).mean() / 20.0
        assert curve["k_shared_slope"][i] == pytest.approx(expected, rel=1e-6), t
    # Sharing flattens the curve near 0: the shared slope at t = 0 is far below the baseline's
    # one-step K(0).
    base = lipschitz.lipschitz_curve(plain_eps, x0, schedule, timesteps=[0], seed=5)
    assert curve["k_shared_slope"][0] < 0.6 * base["k_one_step"][0]


def test_lipschitz_input_errors(schedule, x0):
    eps = _gaussian_eps(schedule)
    with pytest.raises(ValueError, match="step"):
        lipschitz.lipschitz_curve(eps, x0, schedule, timesteps=[0], step=0)
    with pytest.raises(ValueError, match="batch"):
        lipschitz.lipschitz_curve(eps, np.zeros(3), schedule, timesteps=[0])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        lipschitz.lipschitz_curve(eps, x0, schedule, timesteps=[999])


def test_chunking_does_not_change_the_result(schedule, x0):
    eps = _gaussian_eps(schedule, TimestepSharing(100, 5))
    kwargs = dict(sharing=TimestepSharing(100, 5), timesteps=np.arange(0, 130, 3), seed=2)
    a = lipschitz.lipschitz_curve(eps, x0, schedule, max_rows=10**6, **kwargs)
    b = lipschitz.lipschitz_curve(eps, x0, schedule, max_rows=300, **kwargs)
    np.testing.assert_allclose(a["k_one_step"], b["k_one_step"], rtol=1e-12)
    np.testing.assert_allclose(a["k_shared_slope"], b["k_shared_slope"], rtol=1e-12)


def test_csv_and_png_outputs(schedule, x0, tmp_path):
    sharing = TimestepSharing(100, 5)
    t = np.arange(0, 300)
    curves = {
        "ddpm": lipschitz.lipschitz_curve(_gaussian_eps(schedule), x0[:8], schedule,
                                          timesteps=t),
        "etsdm": lipschitz.lipschitz_curve(_gaussian_eps(schedule, sharing), x0[:8], schedule,
                                           timesteps=t, sharing=sharing),
    }
    csv_path, png_path = lipschitz.write_lipschitz_outputs(str(tmp_path), curves,
                                                           title="Gaussian ε*")
    lines = open(csv_path).read().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    rows = [line for line in lines if not line.startswith("#")]
    assert len(comments) == 2 and "slope between adjacent shared values" in comments[1]
    assert rows[0] == "t,ddpm_k_one_step,etsdm_k_one_step,etsdm_k_shared_slope"
    assert len(rows) == 1 + len(t)
    first = rows[1].split(",")
    assert first[0] == "0" and float(first[2]) == 0.0 and float(first[1]) > 0
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same timesteps"):
        lipschitz.write_lipschitz_csv(str(tmp_path / "x.csv"), {
            "a": curves["ddpm"],
            "b": lipschitz.lipschitz_curve(_gaussian_eps(schedule), x0[:8], schedule,
                                           timesteps=[0])})


def _tiny_network(seed):
    """A small functional {"x": [B,8,8,1], "t": [B]} → ε network (a U-Net is not needed to test
    the wiring, and builds much slower)."""
    keras.utils.set_random_seed(seed)
    x_in = keras.Input((8, 8, 1), name="x")
    t_in = keras.Input((), name="t")
    t = keras.ops.expand_dims(t_in, -1) / 1000.0
    t_features = keras.ops.concatenate([keras.ops.sin(t * 3.0), keras.ops.cos(t * 7.0), t], -1)
    h = keras.ops.concatenate([keras.layers.Flatten()(x_in), t_features], -1)
    h = keras.layers.Dense(32, activation="silu")(h)
    out = keras.layers.Reshape((8, 8, 1))(keras.layers.Dense(64)(h))
    return keras.Model({"x": x_in, "t": t_in}, out)


@pytest.fixture(scope="module")
def tiny_models():
    """A baseline and an E-TSDM DiffusionModel around networks with identical weights."""
    return {name: DiffusionModel(_tiny_network(0), sharing=sharing)
            for name, sharing in [("ddpm", TimestepSharing(0, 0)),
                                  ("etsdm", TimestepSharing(100, 5))]}


def test_diagnostic_on_a_diffusion_model(tiny_models):
    x0 = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    timesteps = np.array([0, 5, 18, 19, 20, 98, 99, 100, 101])
    curves = {}
    for name, model in tiny_models.items():
        fn = lipschitz.model_denoise_fn(model)
        curves[name] = lipschitz.lipschitz_curve(fn, x0, model.schedule, timesteps=timesteps,
                                                 sharing=model.sharing, max_rows=64)
    base, shared = curves["ddpm"]["k_one_step"], curves["etsdm"]["k_one_step"]
    assert np.all(base > 0)
    # The shared network sees the same label for t and t + 1 inside a piece: exactly 0.
    np.testing.assert_array_equal(shared[[0, 1, 2, 4, 5]], 0.0)
    assert np.all(shared[[3, 6]] > 0)  # 19 → 20 and 99 → 100 cross piece boundaries
    # Beyond t̃ both feed the true label to networks with the same weights.
    np.testing.assert_allclose(shared[[7, 8]], base[[7, 8]], rtol=1e-4)
    # model_denoise_fn is model.denoise.
    fn = lipschitz.model_denoise_fn(tiny_models["etsdm"])
    t = np.array([3.0, 57.0, 150.0, 999.0], np.float32)
    np.testing.assert_allclose(fn(x0, t), keras.ops.convert_to_numpy(
        tiny_models["etsdm"].denoise(x0, t)), rtol=1e-4, atol=1e-5)
