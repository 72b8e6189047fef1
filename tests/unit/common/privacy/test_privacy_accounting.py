"""Unit tests of common/privacy/accounting.py: privacy histories -> epsilon, against dp-accounting itself."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import rdp

from common.errors import ConfigError
from common.privacy import accounting

DELTA = 1e-5


def dpsgd(noise: float, rate: float, steps: int) -> dict:
    return {"mechanism": "dp-sgd", "noise_multiplier": noise, "sample_rate": rate, "steps": steps}


def gnmax(sigma: float, queries: int, sensitivity: float = math.sqrt(2)) -> dict:
    return {"mechanism": "gnmax", "sigma": sigma, "l2_sensitivity": sensitivity, "queries": queries}


def reference_epsilon(events: list[dp_accounting.DpEvent], delta: float) -> float:
    """Epsilon straight from dp-accounting, with the events built here, not by the module under test."""
    accountant = rdp.RdpAccountant(list(accounting.ORDERS))
    for event in events:
        accountant.compose(event)
    return accountant.get_epsilon(delta)


# --- epsilon against dp-accounting ------------------------------------------------------------------


def test_dpsgd_epsilon_matches_dp_accounting() -> None:
    # Prepare
    step = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    expected = reference_epsilon([dp_accounting.SelfComposedDpEvent(step, 1000)], DELTA)

    # Execute
    result = accounting.epsilon([dpsgd(1.1, 0.01, 1000)], DELTA)

    # Assert
    assert result == pytest.approx(expected, abs=1e-9)
    assert 0.5 < result < 5.0  # the familiar regime of Abadi et al.


def test_gnmax_epsilon_matches_dp_accounting() -> None:
    # Prepare
    expected = reference_epsilon(
        [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(40.0 / math.sqrt(2)), 500)], DELTA
    )

    # Execute
    result = accounting.epsilon([gnmax(40.0, 500)], DELTA)

    # Assert
    assert result == pytest.approx(expected, abs=1e-9)


def test_mixed_history_matches_dp_accounting() -> None:
    # Prepare
    teacher = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3)), 400
    )
    round_one = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(50.0 / math.sqrt(2)), 200)
    round_two = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(30.0 / 2.0), 100)
    expected = reference_epsilon([teacher, round_one, round_two], 1e-6)
    history = [dpsgd(1.3, 0.02, 400), gnmax(50.0, 200), gnmax(30.0, 100, sensitivity=2.0)]

    # Execute
    result = accounting.epsilon(history, 1e-6)

    # Assert
    assert result == pytest.approx(expected, abs=1e-9)


def test_wide_orders_never_worse_than_library_defaults() -> None:
    # Prepare
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 10)
    default = rdp.RdpAccountant()
    default.compose(event)

    # Execute
    result = accounting.epsilon([gnmax(3.0, 10, sensitivity=1.0)], DELTA)

    # Assert
    assert result <= default.get_epsilon(DELTA) + 1e-12
    assert accounting.ACCOUNTANT == "rdp"


def test_empty_history_spends_nothing() -> None:
    # Execute / Assert
    assert accounting.epsilon([], DELTA) == 0.0


def test_dp_event_builds_the_documented_events() -> None:
    # Execute
    sgd = accounting.dp_event(dpsgd(1.5, 0.1, 7))
    votes = accounting.dp_event(gnmax(4.0, 3, sensitivity=2.0))

    # Assert
    assert sgd == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 7
    )
    assert votes == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 3)


# --- composition and monotonicity -------------------------------------------------------------------


def test_two_entries_compose_like_one_with_summed_steps() -> None:
    # Prepare: the two entries composed one after the other by dp-accounting itself
    step = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0))
    composed = reference_epsilon(
        [dp_accounting.SelfComposedDpEvent(step, 300), dp_accounting.SelfComposedDpEvent(step, 200)], DELTA
    )

    # Execute
    split = accounting.epsilon([dpsgd(1.0, 0.05, 300), dpsgd(1.0, 0.05, 200)], DELTA)
    whole = accounting.epsilon([dpsgd(1.0, 0.05, 500)], DELTA)
    split_votes = accounting.epsilon([gnmax(20.0, 30), gnmax(20.0, 70)], DELTA)
    whole_votes = accounting.epsilon([gnmax(20.0, 100)], DELTA)

    # Assert
    assert split == pytest.approx(composed, abs=1e-9)
    assert whole == pytest.approx(composed, abs=1e-9)
    assert split_votes == pytest.approx(whole_votes, abs=1e-9)


def test_long_interleaved_history_matches_dp_accounting() -> None:
    # Prepare: one entry per round, as a ledger holds them, in an interleaved order
    history = [gnmax(30.0, 100), gnmax(60.0, 100)] * 20
    events = [accounting.dp_event(entry) for entry in history]

    # Execute
    result = accounting.epsilon(history, DELTA)

    # Assert
    assert result == pytest.approx(reference_epsilon(events, DELTA), abs=1e-9)


def test_different_entries_add_up_to_more_than_either() -> None:
    # Execute
    first = accounting.epsilon([gnmax(20.0, 100)], DELTA)
    second = accounting.epsilon([gnmax(10.0, 10)], DELTA)
    both = accounting.epsilon([gnmax(20.0, 100), gnmax(10.0, 10)], DELTA)

    # Assert
    assert max(first, second) < both <= first + second


def test_epsilon_grows_with_steps() -> None:
    # Execute
    spent = [accounting.epsilon([dpsgd(1.0, 0.01, steps)], DELTA) for steps in (100, 1000, 5000)]

    # Assert
    assert spent[0] < spent[1] < spent[2]


def test_epsilon_shrinks_with_noise() -> None:
    # Execute
    sgd = [accounting.epsilon([dpsgd(noise, 0.01, 1000)], DELTA) for noise in (0.8, 1.2, 3.0)]
    votes = [accounting.epsilon([gnmax(sigma, 100)], DELTA) for sigma in (5.0, 20.0, 80.0)]

    # Assert
    assert sgd[0] > sgd[1] > sgd[2]
    assert votes[0] > votes[1] > votes[2]


# --- calibration --------------------------------------------------------------------------------------


def test_calibrate_dpsgd_round_trips() -> None:
    # Execute
    noise = accounting.calibrate_dpsgd(2.0, DELTA, sample_rate=0.01, steps=1000)

    # Assert
    assert accounting.epsilon([dpsgd(noise, 0.01, 1000)], DELTA) <= 2.0
    assert accounting.epsilon([dpsgd(noise, 0.01, 1000)], DELTA) == pytest.approx(2.0, rel=1e-3)
    assert accounting.epsilon([dpsgd(noise * (1 - 2e-3), 0.01, 1000)], DELTA) > 2.0  # smallest such noise


@pytest.mark.parametrize("target", [0.5, 4.0, 50.0])
def test_calibrate_gnmax_round_trips(target: float) -> None:
    # Execute
    sigma = accounting.calibrate_gnmax(target, DELTA, queries=200)

    # Assert
    assert accounting.epsilon([gnmax(sigma, 200)], DELTA) <= target
    assert accounting.epsilon([gnmax(sigma, 200)], DELTA) == pytest.approx(target, rel=1e-3)
    assert accounting.epsilon([gnmax(sigma * (1 - 2e-3), 200)], DELTA) > target


def test_calibrate_gnmax_scales_with_sensitivity() -> None:
    # Execute
    unit = accounting.calibrate_gnmax(3.0, DELTA, queries=50, l2_sensitivity=1.0)
    double = accounting.calibrate_gnmax(3.0, DELTA, queries=50, l2_sensitivity=2.0)

    # Assert
    assert double == pytest.approx(2.0 * unit, rel=1e-12)


def test_calibrate_reports_an_unreachable_target() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"target epsilon 1e-06 is out of reach.*raise the target epsilon"):
        accounting.calibrate_gnmax(1e-6, DELTA, queries=10**6)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_calibrate_rejects_a_bad_target(target: float) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="target epsilon must be a finite number > 0"):
        accounting.calibrate_gnmax(target, DELTA, queries=10)


# --- rejections ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "names"),
    [
        ({"mechanism": "laplace", "scale": 1.0}, "unknown mechanism 'laplace'"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}, "unknown mechanism None"),
        ({"mechanism": "dp-sgd", "noise_multiplier": 1.0, "steps": 10}, r"missing \['sample_rate'\]"),
        ({**dpsgd(1.0, 0.1, 10), "clip": 1.0}, r"unknown \['clip'\]"),
        (dpsgd(0.0, 0.1, 10), "noise_multiplier must be a finite number > 0, got 0.0"),
        (dpsgd(math.nan, 0.1, 10), "noise_multiplier must be a finite number > 0, got nan"),
        (dpsgd(1.0, 1.5, 10), r"sample_rate must be a number in \(0, 1\], got 1.5"),
        (dpsgd(1.0, 0.1, 2.5), "steps must be an integer >= 1, got 2.5"),
        (dpsgd(1.0, 0.1, True), "steps must be an integer >= 1, got True"),
        (gnmax(10.0, 0), "queries must be an integer >= 1, got 0"),
        (gnmax(10.0, 5, sensitivity=-1.0), "l2_sensitivity must be a finite number > 0, got -1.0"),
        ("dp-sgd", "must be a dict, got str"),
    ],
)
def test_bad_entries_are_named(entry: object, names: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=names):
        accounting.epsilon([entry], DELTA)  # type: ignore[list-item]


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan, "1e-5", True])
def test_bad_delta_is_named(delta: object) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"delta must be a number in \(0, 1\)"):
        accounting.epsilon([gnmax(10.0, 5)], delta)  # type: ignore[arg-type]


def test_history_must_be_a_list() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="privacy history must be a list of entries, got dict"):
        accounting.epsilon(gnmax(10.0, 5), DELTA)  # type: ignore[arg-type]


def test_check_entry_returns_plain_json_values() -> None:
    # Prepare
    import json

    import numpy as np

    entry = {"mechanism": "dp-sgd", "noise_multiplier": np.float32(1.5), "sample_rate": 0.25, "steps": np.int64(4)}

    # Execute
    clean = accounting.check_entry(entry)

    # Assert
    assert json.loads(json.dumps(clean)) == {
        "mechanism": "dp-sgd", "noise_multiplier": 1.5, "sample_rate": 0.25, "steps": 4
    }
