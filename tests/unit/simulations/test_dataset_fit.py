"""Warnings for settings that do not fit the data set: a scenario's data set swapped for another, and
teachers that ended near chance."""

from __future__ import annotations

from simulations.cli.run_commands import near_chance
from simulations.scenarios import dataset_fit


def test_swapping_the_default_scenarios_data_set_names_the_scenario_made_for_the_new_one() -> None:
    # Execute
    warning = dataset_fit(None, {"dataset": "digits", "public-size": 400})

    # Assert
    assert warning is not None
    assert "dataset digits replaces fashion-mnist" in warning and "digits-tiny" in warning


def test_the_scenarios_own_data_set_gives_no_warning() -> None:
    # Execute / Assert
    assert dataset_fit("digits-tiny", {"dataset": "digits"}) is None
    assert dataset_fit(None, {"num-server-rounds": 3}) is None
    assert dataset_fit("fmnist-iid", {}) is None


def test_teachers_under_twice_chance_are_named_with_the_settings_to_change() -> None:
    # Prepare
    weak = {"scenario": {"dataset": "digits"}, "final": {"teacher_accuracy_mean": 0.17}}
    fine = {"scenario": {"dataset": "digits"}, "final": {"teacher_accuracy_mean": 0.62}}
    fedavg = {"scenario": {"dataset": "digits"}, "final": {"teacher_accuracy_mean": None}}

    # Execute / Assert
    warning = near_chance(weak)
    assert warning is not None and "0.1700 is under twice chance (0.10 for 10 classes)" in warning
    assert "local-epochs" in warning
    assert near_chance(fine) is None and near_chance(fedavg) is None
