"""Site policy `counts = "noised"`: the node's Gaussian count release, its accounting event, and calibration that
leaves room for it (the ClientApp path is in test_hostile_coordinator.py)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import RecordDict

from client.privacy import count_event, noised_counts
from common.errors import ConfigError
from common.privacy.accounting import ORDERS, calibrate_dpsgd, calibrate_gnmax, epsilon


def test_the_count_release_is_a_gaussian_mechanism_of_sensitivity_one() -> None:
    # Prepare: dp-accounting's own event, composed independently
    accountant = rdp.RdpAccountant(list(ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(7.0), 3))

    # Execute
    ours = epsilon([count_event(7.0)] * 3, 1e-5)

    # Assert
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_counts_are_noised_with_the_policy_std_from_os_entropy_and_kept_for_the_run() -> None:
    # Prepare
    histogram = np.full(20_000, 1_000, dtype=np.int64)

    # Execute
    state = RecordDict()
    counts, before = noised_counts(state, 1, 1, histogram, 10.0, None)
    again, _ = noised_counts(state, 1, 2, histogram, 10.0, None)
    other, _ = noised_counts(RecordDict(), 1, 1, histogram, 10.0, None)

    # Assert: std 10 (rounding adds 1/12), integers, the same counts for the rest of the run, fresh noise elsewhere
    assert before is None and counts.dtype == np.int64
    assert np.std(counts - histogram) == pytest.approx(np.sqrt(100 + 1 / 12), rel=0.03)
    assert abs(np.mean(counts - histogram)) < 0.3
    assert np.array_equal(again, counts) and not np.array_equal(other, counts)
    fresh, _ = noised_counts(state, 2, 1, histogram, 10.0, None)  # another run: a new release
    assert not np.array_equal(fresh, counts)


def test_noised_counts_never_leave_an_empty_total() -> None:
    counts, _ = noised_counts(RecordDict(), 1, 1, np.zeros(3, dtype=np.int64), 0.1, None)
    assert (counts >= 0).all() and counts.sum() >= 1


@pytest.mark.parametrize("mechanism", ["dp-sgd", "gnmax"])
def test_calibration_leaves_room_for_the_count_release(mechanism: str) -> None:
    # Execute
    also = (count_event(10.0),)
    if mechanism == "dp-sgd":
        alone, shared = calibrate_dpsgd(2.0, 1e-5, 0.05, 200), calibrate_dpsgd(2.0, 1e-5, 0.05, 200, also=also)
        total = epsilon([{"mechanism": "dp-sgd", "noise_multiplier": shared, "sample_rate": 0.05, "steps": 200},
                         *also], 1e-5)
    else:
        alone, shared = calibrate_gnmax(2.0, 1e-5, 500), calibrate_gnmax(2.0, 1e-5, 500, also=also)
        total = epsilon([{"mechanism": "gnmax", "sigma": shared, "l2_sensitivity": 2 ** 0.5, "queries": 500}, *also],
                        1e-5)

    # Assert: more noise than alone, and the two together spend the budget (to the bisection's tolerance)
    assert shared > alone
    assert 1.99 < total <= 2.0


def test_a_count_release_alone_over_the_budget_names_it() -> None:
    with pytest.raises(ConfigError, match="plus noised counts costing epsilon"):
        calibrate_dpsgd(0.05, 1e-5, 0.05, 200, also=(count_event(0.5),))
