"""Sharing-aware sampler grids (issue "Show the paper's effect…", item 2).

With E-TSDM the network is piecewise constant in its time condition below t̃, so the ODE a
sampler integrates has a right-hand side that jumps at the piece boundaries. The plain grids
straddle those jumps and DPM-Solver orders 2–3 stall (etsdm.md §7). With ``sharing=`` every
sampler puts a knot on each boundary, DPM-Solver restarts its history in each piece, and each
step is evaluated at the shared label of the piece it crosses. Proof on the closed form: the
exact solution of the piecewise (shared) PF-ODE for Gaussian data (``shared_gaussian_flow``),
errors at 10/20/50 NFE and the recovered convergence orders. Convergence is measured on the
samplers' own float64 coefficient tables (float32 round-off would floor the errors at ~1e-5);
the compiled keras loops are checked against those tables separately.
"""

import os
import sys

import numpy as np
import pytest
from keras import ops

sys.path.insert(0, os.path.dirname(__file__))
from sampler_reference import (execute_ddim_float64, execute_tables_float64,  # noqa: E402
                               frozen_condition_flow, gaussian_eps_shared, shared_gaussian_flow)
from test_samplers import EXACT_DPM, MU, S, SCHED, X_T, X_T32, keras_gaussian_eps, slope  # noqa: E402

from keras_etsdm.samplers import (DDIMSampler, DDPMSampler, DPMSolverSampler,  # noqa: E402
                                  build_sampler, deserialize, serialize)
from keras_etsdm.samplers.base import allocate_steps, sharing_aware_labels  # noqa: E402
from keras_etsdm.time_sharing import TimestepSharing  # noqa: E402

SHARING = TimestepSharing(100, 5)
SHARED_EPS = gaussian_eps_shared(SCHED, MU, S, SHARING)
EXACT_SHARED = shared_gaussian_flow(X_T, MU, S, SCHED, SHARING)  # label 999 → label 0
EXACT_SHARED_CLEAN = shared_gaussian_flow(X_T, MU, S, SCHED, SHARING, clean_end=True)


def table_error(sampler, exact=EXACT_SHARED):
    return float(np.max(np.abs(execute_tables_float64(sampler, SHARED_EPS, X_T) - exact)))



# ----- the map and the grids: exact values ------------------------------------------------------
def test_knots_and_piece_labels():
    assert SHARING.knots() == [100.0, 80.0, 60.0, 40.0, 20.0]
    labels = [0, 5, 19.99, 20, 20.5, 80, 99, 100, 100.5, 999]
    # A step leaving a boundary (20, 100) belongs to the piece below it.
    np.testing.assert_array_equal(SHARING.piece_label(labels),
                                  [0, 0, 0, 0, 20, 60, 80, 80, 100.5, 999])
    continuous = TimestepSharing(0.1, 5)
    np.testing.assert_allclose(continuous.knots(), [0.1, 0.08, 0.06, 0.04, 0.02])
    np.testing.assert_allclose(continuous.piece_label([0.001, 0.02, 0.0601, 0.1, 0.2]),
                               [0.0, 0.0, 0.06, 0.08, 0.2])
    assert TimestepSharing(0, 0).knots() == []


def test_allocate_steps_minimises_the_longest_step():
    assert allocate_steps([6.0, 2.0, 0.5], 5) == [3, 1, 1]
    assert allocate_steps([6.0, 2.0, 0.5], 3) == [1, 1, 1]
    assert allocate_steps([1.0, 1.0], 5) == [3, 2]  # ties go to the earlier segment
    assert allocate_steps([10.0, 1.0], 6, caps=[2, None]) == [2, 4]
    with pytest.raises(ValueError, match="at least one step per segment: 3 segments, got 2"):
        allocate_steps([1.0, 1.0, 1.0], 2)


def test_ddim_and_ddpm_grids_visit_every_boundary():
    ddim = DDIMSampler(10, sharing=SHARING)
    np.testing.assert_array_equal(ddim.step_labels(),
                                  [20, 40, 60, 80, 100, 280, 460, 639, 819, 999])
    # Each boundary step is evaluated at the piece it crosses: 100 → 80, …, 20 → 0.
    np.testing.assert_array_equal(ddim.labels, [999, 819, 639, 460, 280, 80, 60, 40, 20, 0])
    assert list(DDIMSampler(6, sharing=SHARING).step_labels()) == [20, 40, 60, 80, 100, 999]
    ddpm = DDPMSampler(10, sharing=SHARING)
    np.testing.assert_array_equal(ddpm.step_labels(), ddim.step_labels())
    np.testing.assert_array_equal(ddpm.labels, ddpm.step_labels()[::-1])  # true labels
    full, plain = DDPMSampler(sharing=SHARING), DDPMSampler()
    for key in plain.tables:  # all T steps: every label is a knot already
        np.testing.assert_array_equal(full.tables[key], plain.tables[key])
    assert sharing_aware_labels(None, 4, 999, -1).tolist() == [249, 499, 749, 999]


@pytest.mark.parametrize("method", ["multistep", "singlestep"])
@pytest.mark.parametrize("skip", ["time_uniform", "logSNR", "time_quadratic"])
def test_dpm_solver_grid_has_a_knot_on_every_boundary(method, skip):
    sampler = DPMSolverSampler(20, order=3, method=method, skip_type=skip, sharing=SHARING)
    assert sampler.num_iterations == 20
    alphas = 1.0 / sampler.tables["x0_from_x"]  # α at each evaluation's true time
    labels = sampler.labels
    for boundary in (100, 80, 60, 40, 20):
        row = np.flatnonzero(np.isclose(alphas, SCHED.alphas[boundary], rtol=0, atol=1e-12))
        assert row.size == 1, (boundary, row)
        assert labels[row[0]] == boundary - 20  # evaluated in the piece below
    # Inside a piece every evaluation sees that piece's label; no stencil spans a boundary.
    assert set(np.round(labels[labels < 100], 9)) <= {0.0, 20.0, 40.0, 60.0, 80.0}
    if method == "multistep":
        starts = np.flatnonzero(np.isin(labels, [80.0, 60.0, 40.0, 20.0, 0.0])
                                & ~np.isin(np.roll(labels, 1), labels[labels < 100]))
        assert all(sampler.orders[i] == 1 for i in starts)  # history restarts per piece


def test_plain_grids_unchanged_without_sharing():
    for sampler in (DPMSolverSampler(12, 3, "singlestep", skip_type="logSNR"),
                    DPMSolverSampler(12, 2), DDIMSampler(10), DDPMSampler(10)):
        twin = type(sampler).from_config({**sampler.get_config(), "sharing": None})
        for key in sampler.tables:
            np.testing.assert_array_equal(sampler.tables[key], twin.tables[key])
        sampler_none = type(sampler).from_config(
            {**sampler.get_config(), "sharing": TimestepSharing(0, 0)})  # the baseline map
        np.testing.assert_array_equal(sampler_none.labels, sampler.labels)


# ----- the closed-form target ---------------------------------------------------------------------
def test_frozen_condition_flow_matches_rk4():
    """The closed-form per-piece solution against a 20,000-step RK4 of dy/dλ = −e^{−λ} ε."""
    x = np.random.default_rng(0).standard_normal(16)
    a_c, s_c = SCHED.alphas[40], SCHED.sigmas[40]
    lam0, lam1 = SCHED.lambdas[60], SCHED.lambdas[40]
    k = s_c / (a_c**2 * S * S + s_c**2)

    def rhs(lam, y):
        alpha = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lam))
        return -np.exp(-lam) * k * (alpha * y - a_c * MU)

    y, lam, n = x * np.sqrt(1.0 + np.exp(-2.0 * lam0)), lam0, 20000
    h = (lam1 - lam0) / n
    for _ in range(n):
        k1 = rhs(lam, y)
        k2 = rhs(lam + h / 2, y + h / 2 * k1)
        k3 = rhs(lam + h / 2, y + h / 2 * k2)
        k4 = rhs(lam + h, y + h * k3)
        y, lam = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), lam + h
    rk4 = y / np.sqrt(1.0 + np.exp(-2.0 * lam1))
    np.testing.assert_allclose(frozen_condition_flow(x, MU, S, a_c, s_c, lam0, lam1), rk4,
                               atol=1e-12, rtol=0)
    # The shared ODE is another ODE: its exact answer differs from the plain flow's by the
    # averaging error of freezing the condition (0.063 here), small but far above the errors
    # measured below, so converging to the right one of the two is a real test.
    assert 0.03 < np.max(np.abs(EXACT_SHARED - EXACT_DPM)) < 0.1


# ----- convergence to the piecewise solution ------------------------------------------------------
# (order, method, grid, NFE range, slope bounds): measured in float64 on the tables.
CONVERGENCE = [
    (1, "multistep", "logSNR", (48, 96, 192, 384), 0.9, 1.1),
    (2, "multistep", "logSNR", (48, 96, 192, 384), 1.8, 2.2),
    (2, "multistep", "time_uniform", (96, 192, 384), 1.8, 2.4),
    (3, "multistep", "logSNR", (384, 768), 1.8, 2.2),  # 3M: second order, as without sharing
    (2, "singlestep", "logSNR", (48, 96, 192, 384), 1.8, 2.2),
    (3, "singlestep", "logSNR", (48, 96, 192, 384), 2.3, 3.2),
    (3, "singlestep", "time_uniform", (96, 192, 384), 2.5, 3.2),
]


@pytest.mark.parametrize("order,method,skip,steps,low,high", CONVERGENCE)
def test_sharing_aware_convergence_order(order, method, skip, steps, low, high):
    errors = [table_error(DPMSolverSampler(n, order, method, skip_type=skip, sharing=SHARING))
              for n in steps]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors  # monotone
    assert low <= slope(steps, errors) <= high, errors


def test_plain_grids_stall_where_the_aware_grid_converges():
    """§7's stall, and its fix: 2M on logSNR on the shared closed form is non-monotone in NFE
    on the plain grid; the aware grid decreases at every doubling."""
    steps = (48, 96, 192, 384)
    plain = [table_error(DPMSolverSampler(n, 2, skip_type="logSNR")) for n in steps]
    aware = [table_error(DPMSolverSampler(n, 2, skip_type="logSNR", sharing=SHARING))
             for n in steps]
    assert any(b > a for a, b in zip(plain, plain[1:])), plain
    assert all(b < a / 3 for a, b in zip(aware, aware[1:])), aware
    # time_uniform straddles the small pieces with long steps: the aware grid wins at 20–50 NFE.
    for n in (20, 50):
        for order in (2, 3):
            assert table_error(DPMSolverSampler(n, order, sharing=SHARING)) < \
                table_error(DPMSolverSampler(n, order)) / 3, (n, order)


def test_ddim_sharing_aware_converges_at_first_order():
    steps = (20, 40, 80, 160)
    errors = [np.max(np.abs(execute_ddim_float64(DDIMSampler(n, sharing=SHARING), SHARED_EPS, X_T)
                            - EXACT_SHARED_CLEAN)) for n in steps]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert 0.9 <= slope(steps, errors) <= 1.15, errors


# ----- the compiled loops execute the tables --------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: DPMSolverSampler(12, 3, "singlestep", skip_type="logSNR", sharing=SHARING),
    lambda: DPMSolverSampler(12, 2, "multistep", algorithm="dpmsolver", sharing=SHARING),
    lambda: DDIMSampler(12, sharing=SHARING),
])
def test_compiled_loop_matches_float64_tables(make):
    sampler = make()
    eps32 = keras_gaussian_eps(sharing=SHARING)
    got = np.asarray(ops.convert_to_numpy(sampler.sample(eps32, X_T32)), np.float64)
    if isinstance(sampler, DDIMSampler):
        expected = execute_ddim_float64(sampler, SHARED_EPS, X_T)
    else:
        expected = execute_tables_float64(sampler, SHARED_EPS, X_T)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


# ----- configuration and errors -----------------------------------------------------------------
def test_config_round_trip_and_build_sampler_option():
    sampler = DPMSolverSampler(20, 3, sharing=SHARING)
    again = deserialize(serialize(sampler))
    assert again.sharing == SHARING
    np.testing.assert_array_equal(again.labels, sampler.labels)
    assert "sharing={'t_tilde': 100" in repr(sampler)
    assert "sharing" not in repr(DPMSolverSampler(20))
    built = build_sampler("dpm_solver", SCHED, 20, {"order": 3, "sharing_aware": True},
                          sharing=SHARING)
    np.testing.assert_array_equal(built.labels, sampler.labels)
    plain = build_sampler("ddim", SCHED, 20, {"sharing_aware": False}, sharing=SHARING)
    assert plain.sharing is None
    # Sharing-aware and plain samplers share one compiled loop (the tables differ only).
    assert sampler._trace_key() == DPMSolverSampler(20, 3)._trace_key()
    # sharing_labels=False: the same knots and times, the network at the true labels; kept
    # by the config (absent from it by default, so earlier configs are unchanged)
    assert "sharing_labels" not in sampler.get_config()
    for make in (DPMSolverSampler, DDIMSampler, DDPMSampler):
        aware = make(20, sharing=SHARING)
        knots = make(20, sharing=SHARING, sharing_labels=False)
        assert knots.get_config()["sharing_labels"] is False
        assert "sharing_labels=False" in repr(knots)
        again = deserialize(serialize(knots))
        np.testing.assert_array_equal(again.tables["label"], knots.tables["label"])
        if make is DDPMSampler:  # ancestral steps are at the true labels either way
            np.testing.assert_array_equal(knots.tables["label"], aware.tables["label"])
        else:
            np.testing.assert_array_equal(SHARING.piece_label(knots.tables["label"]),
                                          aware.tables["label"])
            assert np.any(knots.tables["label"] != aware.tables["label"])
        assert knots._trace_key() == aware._trace_key()
    built = build_sampler("dpm_solver", SCHED, 20, {"order": 3, "sharing_aware": "true",
                                                    "sharing_labels": "false"},
                          sharing=SHARING)
    np.testing.assert_array_equal(built.tables["label"],
                                  DPMSolverSampler(20, 3, sharing=SHARING,
                                                   sharing_labels=False).tables["label"])


@pytest.mark.parametrize("make,match", [
    (lambda: DPMSolverSampler(5, sharing=SHARING), "at least one step per segment: 6"),
    (lambda: DDIMSampler(5, sharing=SHARING), "at least one step per segment: 6"),
    (lambda: DDIMSampler(timesteps=[10, 500], sharing=SHARING), "timesteps and sharing"),
    (lambda: DDIMSampler(10, sharing="yes"), "sharing must be a TimestepSharing"),
    (lambda: build_sampler("ddim", SCHED, 10, {"sharing_aware": True}),
     "sharing_aware needs the model's TimestepSharing"),
    (lambda: build_sampler("ddim", SCHED, 10, {"sharing_aware": True},
                           sharing=TimestepSharing(0, 0)),
     "model has no E-TSDM sharing"),
    (lambda: DDIMSampler(10, sharing_labels=False), "sharing_labels=False .* needs sharing"),
    (lambda: DPMSolverSampler(10, sharing=SHARING, sharing_labels="no"),
     "sharing_labels must be True or False"),
])
def test_bad_sharing_options(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()

