"""Min-SNR-γ loss weighting (``DiffusionModel(min_snr_gamma=γ)``, issue 18's recipe lever).

* The per-example weights equal the closed form ``min(SNR, γ)/SNR`` (ε), ``min(SNR, γ)/(SNR+1)``
  (v), ``min(SNR, γ)`` (x0) with ``SNR = ᾱ/(1−ᾱ)`` of the float64 schedule table, at the TRUE
  label (the probe network reads the label back), also with E-TSDM sharing on, where the
  network's time input differs from the label the weight uses.
* The training loss is the weighted mean of the per-pixel squared errors; the draws of t and ε
  are those of the unweighted model; ``get_config`` / ``.keras`` keep γ; bad γ is refused.
"""

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_etsdm as ke
from keras_etsdm.schedules import ContinuousVPSchedule, DiscreteVPSchedule

SCHED = DiscreteVPSchedule()
GAMMA = 5.0


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


class LabelProbe(layers.Layer):
    """Channel 0: x_t; channel 1: the network's time input (what the model feeds)."""

    def call(self, inputs):
        x, t = inputs["x"], inputs["t"]
        return ops.concatenate([x[..., :1], ops.ones_like(x[..., :1])
                                * ops.reshape(t, (-1, 1, 1, 1))], axis=-1)


def probe_model(prediction_type="epsilon", gamma=GAMMA, sharing=None, schedule=None):
    x = keras.Input((4, 4, 2), name="x")
    t = keras.Input((), name="t")
    net = keras.Model({"x": x, "t": t}, LabelProbe()({"x": x, "t": t}))
    return ke.DiffusionModel(net, schedule=schedule, seed=5, prediction_type=prediction_type,
                             sharing=sharing or ke.TimestepSharing(0, 0), min_snr_gamma=gamma)


def closed_form_weight(labels, prediction_type, gamma=GAMMA):
    alpha_bar = SCHED.alphas_cumprod[labels]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = np.minimum(snr, gamma)
    return {"epsilon": clipped / snr, "v": clipped / (snr + 1.0), "x0": clipped}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_weights_equal_the_closed_form_at_every_label(prediction_type):
    labels = np.arange(SCHED.num_timesteps)
    weight = to_np(probe_model(prediction_type).loss_weight(ops.convert_to_tensor(labels)))
    np.testing.assert_allclose(weight, closed_form_weight(labels, prediction_type), rtol=2e-5)
    snr = SCHED.alphas_cumprod / (1.0 - SCHED.alphas_cumprod)
    if prediction_type == "epsilon":  # 1 exactly where SNR ≤ γ, γ/SNR below it
        assert np.all(weight[snr <= GAMMA] == 1.0) and weight[0] < 1e-3


def test_training_loss_is_the_weighted_mse_at_the_true_label_with_sharing_on():
    """E-TSDM on: inside the shared pieces the network's time input is not the label, yet the
    weight follows the label that noised x_t (read back through x_t = α x0 + σ ε)."""
    model = probe_model(sharing=ke.TimestepSharing(100, 5))
    x0 = np.random.default_rng(3).uniform(-1, 1, (256, 4, 4, 2)).astype(np.float32)
    out = model(x0, training=True)
    noise, pred = to_np(out["noise"]), to_np(out["prediction"])
    # The true label: the one whose α, σ reproduce x_t's first pixel from x0 and ε.
    candidates = (SCHED.alphas[None, :] * x0[:, 0, 0, 0, None]
                  + SCHED.sigmas[None, :] * noise[:, 0, 0, 0, None])
    labels = np.argmin(np.abs(candidates - pred[:, 0, 0, 0, None]), axis=1)
    fed = pred[:, 0, 0, 1]
    inside = labels < 100
    assert np.sum(inside & (fed != labels)) > 5  # sharing really moved the network's input
    np.testing.assert_allclose(to_np(out["weight"]), closed_form_weight(labels, "epsilon"),
                               rtol=2e-5)
    per_example = np.mean((noise - pred) ** 2, axis=(1, 2, 3))
    expected = np.mean(closed_form_weight(labels, "epsilon") * per_example)
    loss = float(to_np(model.compute_loss(x0, None, out)))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Same seed, no weighting: the same t and ε (only the weights differ).
    plain = probe_model(gamma=None, sharing=ke.TimestepSharing(100, 5))(x0, training=True)
    assert "weight" not in plain
    np.testing.assert_array_equal(to_np(plain["noise"]), noise)
    np.testing.assert_array_equal(to_np(plain["prediction"]), pred)


def test_continuous_schedule_weights():
    schedule = ContinuousVPSchedule("cosine")
    model = probe_model("v", schedule=schedule)
    t = np.array([0.01, 0.2, 0.5, 0.9], np.float32)
    alpha, sigma = (to_np(a) for a in schedule.alpha_sigma(ops.convert_to_tensor(t)))
    snr = alpha ** 2 / sigma ** 2
    np.testing.assert_allclose(to_np(model.loss_weight(ops.convert_to_tensor(t))),
                               np.minimum(snr, GAMMA) / (snr + 1.0), rtol=1e-5)


def test_fit_config_round_trip_and_errors(tmp_path):
    network = ke.build_unet(image_size=8, channels=1, base_channels=8, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    model = ke.DiffusionModel(network, min_snr_gamma=GAMMA, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = np.random.default_rng(11).uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32)
    history = model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    assert model.get_config()["min_snr_gamma"] == GAMMA
    assert "min_snr_gamma" not in ke.DiffusionModel(network).get_config()
    path = tmp_path / "w.keras"
    model.save(path)
    assert keras.saving.load_model(path).min_snr_gamma == GAMMA
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            ke.DiffusionModel(network, min_snr_gamma=bad)
