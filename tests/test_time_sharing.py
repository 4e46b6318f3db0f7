"""Exact values of the E-TSDM sharing map."""

import numpy as np
import pytest
from keras import ops

from keras_etsdm.time_sharing import TimestepSharing


def apply(sharing, values, dtype="float32"):
    return ops.convert_to_numpy(sharing(np.asarray(values, dtype=dtype)))


def test_discrete_defaults_exact():
    f = TimestepSharing(t_tilde=100, n=5)
    labels = [0, 19, 20, 39, 40, 59, 60, 79, 80, 99, 99.9, 100, 101, 500, 999]
    expected = [0, 0, 20, 20, 40, 40, 60, 60, 80, 80, 80, 100, 101, 500, 999]
    np.testing.assert_array_equal(apply(f, labels), np.asarray(expected, np.float32))


def test_every_integer_label():
    f = TimestepSharing(100, 5)
    t = np.arange(1000)
    expected = np.where(t < 100, 20 * (t // 20), t).astype(np.float32)
    np.testing.assert_array_equal(apply(f, t), expected)


def test_integer_input_and_any_shape():
    f = TimestepSharing(100, 5)
    out = apply(f, np.array([[19, 21], [99, 150]]), dtype="int32")
    np.testing.assert_array_equal(out, [[0, 20], [80, 150]])
    assert "float" in str(out.dtype)


def test_continuous_time():
    f = TimestepSharing(t_tilde=0.1, n=5)
    np.testing.assert_allclose(apply(f, [0.0999, 0.0, 0.02, 0.06, 0.1, 0.5]),
                               [0.08, 0.0, 0.02, 0.06, 0.1, 0.5], rtol=1e-6)
    # Boundaries that are not exact in binary still land in their own piece.
    np.testing.assert_allclose(apply(f, [0.06], "float64"), [0.06])


def test_fractional_labels_from_dpm_solver():
    f = TimestepSharing(100, 5)
    np.testing.assert_array_equal(apply(f, [0.5, 19.999, 20.001, 79.99]), [0, 0, 20, 60])


@pytest.mark.parametrize("sharing", [TimestepSharing(0, 0), TimestepSharing(0, 5)])
def test_disabled_is_identity(sharing):
    assert not sharing.enabled
    t = [0, 7.5, 19, 99.9, 999]
    np.testing.assert_array_equal(apply(sharing, t), np.asarray(t, np.float32))


def test_other_settings():
    f = TimestepSharing(200, 4)
    np.testing.assert_array_equal(apply(f, [49, 50, 199, 200]), [0, 50, 150, 200])
    assert f.boundaries() == [0, 50, 100, 150]


@pytest.mark.parametrize("kwargs, match", [
    (dict(t_tilde=100, n=0), "n must be > 0"),
    (dict(t_tilde=100, n=-1), "non-negative integer"),
    (dict(t_tilde=100, n=2.5), "non-negative integer"),
    (dict(t_tilde=-1, n=5), "t_tilde must be >= 0"),
    (dict(t_tilde=1000, n=5, num_timesteps=1000), "smaller than the number of timesteps"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimestepSharing(**kwargs)


def test_config_round_trip():
    f = TimestepSharing(0.1, 5)
    assert TimestepSharing.from_config(f.get_config()) == f
