"""Unit tests of the per-round schedule: `temperature_at` (common/config.py), and the public sample
and query each round gets (`sample_public`, `make_query` in server/rounds.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.aggregation import RULES
from common.config import RunConfig, default_run_config, temperature_at
from common.messages import SoftLabelQuery
from server.rounds import make_query, sample_public

FINGERPRINT = "3f2a" + "0" * 60


def make_cfg(**overrides: Any) -> RunConfig:
    """A valid config: the pyproject defaults with kebab-case `overrides` (underscores allowed in names)."""
    return RunConfig.from_run_config({**default_run_config(), **{k.replace("_", "-"): v for k, v in overrides.items()}})


# ---------------------------------------------------------------------------------------------------
# temperature_at
# ---------------------------------------------------------------------------------------------------


def test_constant_schedule_keeps_the_temperature_every_round() -> None:
    # Prepare
    cfg = make_cfg(temperature=3.5, temperature_final=1.0, temperature_schedule="constant", num_server_rounds=4)

    # Execute
    temps = [temperature_at(cfg, r) for r in range(1, 5)]

    # Assert
    assert temps == [3.5, 3.5, 3.5, 3.5]


@pytest.mark.parametrize(
    ("start", "final", "rounds", "expected"),
    [
        (4.0, 1.0, 4, [4.0, 3.0, 2.0, 1.0]),  # cooling
        (1.0, 5.0, 5, [1.0, 2.0, 3.0, 4.0, 5.0]),  # warming
        (2.0, 2.0, 3, [2.0, 2.0, 2.0]),  # flat
        (3.0, 1.0, 2, [3.0, 1.0]),  # two rounds: both ends only
    ],
)
def test_linear_schedule_goes_from_temperature_to_temperature_final(
    start: float, final: float, rounds: int, expected: list[float]
) -> None:
    # Prepare
    cfg = make_cfg(temperature=start, temperature_final=final, temperature_schedule="linear", num_server_rounds=rounds)

    # Execute
    temps = [temperature_at(cfg, r) for r in range(1, rounds + 1)]

    # Assert
    assert temps == pytest.approx(expected, abs=1e-12)


def test_linear_schedule_of_a_single_round_run_uses_the_start_temperature() -> None:
    # Prepare
    cfg = make_cfg(temperature=3.0, temperature_final=1.0, temperature_schedule="linear", num_server_rounds=1)

    # Execute
    temperature = temperature_at(cfg, 1)

    # Assert: no division by zero, and not temperature-final
    assert temperature == 3.0


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(0.1, 20.0),
    final=st.floats(0.1, 20.0),
    rounds=st.integers(2, 30),
)
def test_linear_schedule_is_monotone_between_its_ends(start: float, final: float, rounds: int) -> None:
    # Prepare
    cfg = make_cfg(temperature=start, temperature_final=final, temperature_schedule="linear", num_server_rounds=rounds)

    # Execute
    temps = np.array([temperature_at(cfg, r) for r in range(1, rounds + 1)])

    # Assert
    assert temps[0] == pytest.approx(start)
    assert temps[-1] == pytest.approx(final)
    low, high = min(start, final), max(start, final)
    assert ((temps >= low - 1e-9) & (temps <= high + 1e-9)).all()
    steps = np.diff(temps)
    assert (steps * np.sign(final - start) >= -1e-9).all()  # never moves away from temperature-final
    assert steps == pytest.approx(np.full(rounds - 1, (final - start) / (rounds - 1)), abs=1e-9)  # equal steps
    assert (temps > 0).all()


# ---------------------------------------------------------------------------------------------------
# sample_public
# ---------------------------------------------------------------------------------------------------


def test_full_fraction_takes_every_public_sample_in_order() -> None:
    # Prepare
    cfg = make_cfg(public_fraction=1.0)

    # Execute
    ids = sample_public(cfg, round_=3, public_size=50)

    # Assert
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, np.arange(50))


def test_a_fraction_gives_sorted_unique_ids_in_range() -> None:
    # Prepare
    cfg = make_cfg(public_fraction=0.25, seed=7)

    # Execute
    ids = sample_public(cfg, round_=1, public_size=400)

    # Assert
    assert ids.dtype == np.int64
    assert ids.shape == (100,)
    assert (np.diff(ids) > 0).all()  # sorted and unique
    assert ids.min() >= 0 and ids.max() < 400


def test_the_sample_is_deterministic_per_seed_and_round() -> None:
    # Prepare
    cfg, same_cfg = make_cfg(public_fraction=0.1, seed=11), make_cfg(public_fraction=0.1, seed=11)

    # Execute
    first, again = sample_public(cfg, 2, 1000), sample_public(same_cfg, 2, 1000)

    # Assert
    np.testing.assert_array_equal(first, again)


def test_the_sample_differs_across_rounds_and_seeds() -> None:
    # Prepare
    cfg = make_cfg(public_fraction=0.1, seed=11)

    # Execute
    per_round = [tuple(sample_public(cfg, r, 1000)) for r in range(1, 6)]
    other_seed = tuple(sample_public(make_cfg(public_fraction=0.1, seed=12), 1, 1000))

    # Assert
    assert len(set(per_round)) == 5
    assert other_seed != per_round[0]


@pytest.mark.parametrize(("fraction", "size"), [(0.001, 10), (0.01, 49), (1e-6, 1)])
def test_a_tiny_fraction_still_takes_one_sample(fraction: float, size: int) -> None:
    # Prepare
    cfg = make_cfg(public_fraction=fraction)

    # Execute
    ids = sample_public(cfg, 1, size)

    # Assert
    assert ids.shape == (1,)
    assert 0 <= ids[0] < size


@settings(max_examples=100, deadline=None)
@given(
    fraction=st.floats(1e-4, 1.0, exclude_max=True),
    size=st.integers(1, 2000),
    round_=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_fraction_gives_about_fraction_times_size_valid_ids(fraction: float, size: int, round_: int, seed: int) -> None:
    # Prepare
    cfg = make_cfg(public_fraction=fraction, seed=seed)

    # Execute
    ids = sample_public(cfg, round_, size)

    # Assert
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert 1 <= len(ids) <= size
    assert len(ids) == 1 or abs(len(ids) - fraction * size) <= 0.5  # rounded to the nearest count
    assert len(np.unique(ids)) == len(ids)
    assert (np.diff(ids) > 0).all()
    assert ids.min() >= 0 and ids.max() < size


# ---------------------------------------------------------------------------------------------------
# make_query
# ---------------------------------------------------------------------------------------------------


def test_query_carries_the_rounds_temperature_sample_and_settings() -> None:
    # Prepare
    cfg = make_cfg(temperature=4.0, temperature_final=1.0, temperature_schedule="linear", num_server_rounds=4,
                   public_fraction=0.5, codec="uint8", seed=5)

    # Execute
    query = make_query(cfg, round_=2, fingerprint=FINGERPRINT, public_size=200, num_classes=10)

    # Assert
    assert query.round == 2
    assert query.fingerprint == FINGERPRINT
    assert query.temperature == pytest.approx(3.0)
    assert query.codec == "uint8"
    assert query.num_classes == 10
    np.testing.assert_array_equal(query.sample_ids, sample_public(cfg, 2, 200))
    assert len(query.sample_ids) == 100


@pytest.mark.parametrize("rule", sorted(RULES))
def test_only_the_expertise_rules_ask_for_class_counts(rule: str) -> None:
    # Prepare
    cfg = make_cfg(aggregation=rule)

    # Execute
    query = make_query(cfg, 1, FINGERPRINT, public_size=20, num_classes=10)

    # Assert
    assert query.want_class_counts is (rule in ("expertise", "balanced-expertise"))


@pytest.mark.parametrize(("codec_top_k", "num_classes", "expected"), [(1, 10, 1), (3, 10, 3), (10, 10, 10), (25, 10, 10), (5, 2, 2)])
def test_top_k_is_capped_at_the_number_of_classes(codec_top_k: int, num_classes: int, expected: int) -> None:
    # Prepare
    cfg = make_cfg(codec="topk", codec_top_k=codec_top_k)

    # Execute
    query = make_query(cfg, 1, FINGERPRINT, public_size=20, num_classes=num_classes)

    # Assert: the capped query is one the node's validation accepts
    assert query.top_k == expected
    assert SoftLabelQuery.from_record(query.to_record()).top_k == expected


@pytest.mark.parametrize("evaluate_teachers", [True, False])
def test_teachers_are_evaluated_only_in_the_last_round_when_asked(evaluate_teachers: bool) -> None:
    # Prepare
    cfg = make_cfg(evaluate_teachers=evaluate_teachers, num_server_rounds=3)

    # Execute
    flags = [make_query(cfg, r, FINGERPRINT, public_size=20, num_classes=10).evaluate_teacher for r in (1, 2, 3)]

    # Assert
    assert flags == [False, False, evaluate_teachers]
