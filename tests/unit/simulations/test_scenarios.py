"""Shipped scenarios (simulations/scenarios.py): each one loads into a valid run config; the scale family
(fmnist-100, fmnist-1000) differs only in its size and sizes its local training to small institutions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.tasks.partition import partition_indices
from simulations.scenarios import complete, dataset_fit, list_scenarios, load_scenario

SCALE = ("fmnist-100", "fmnist-1000")


def resolved(name: str) -> RunConfig:
    return RunConfig.from_run_config(complete(load_scenario(name), Path.cwd()))


@pytest.mark.parametrize("name", list_scenarios())
def test_every_shipped_scenario_is_a_valid_run_config(name: str) -> None:
    # Execute
    cfg = resolved(name)

    # Assert
    assert cfg.scenario == name  # the label names the run folder: it must be the file's
    assert dataset_fit(name, {}) is None


def test_the_scale_scenarios_are_listed() -> None:
    # Execute
    names = list_scenarios()

    # Assert
    assert set(SCALE) <= set(names)


@pytest.mark.parametrize(("name", "clients"), [("fmnist-100", 100), ("fmnist-1000", 1000)])
def test_a_scale_scenario_trains_small_teachers_enough_and_needs_most_institutions(name: str, clients: int) -> None:
    # Execute
    cfg = resolved(name)

    # Assert
    assert cfg.dataset == "fashion-mnist" and cfg.partitioner == "dirichlet" and cfg.dirichlet_alpha == 0.5
    assert cfg.num_clients == clients
    assert 0.5 * clients <= cfg.min_clients < clients  # a quorum, not every node
    assert cfg.public_fraction < 1.0  # the public set is sampled each round
    private_per_institution = 50_000 // clients
    assert cfg.local_epochs_for(private_per_institution) * -(-private_per_institution // cfg.teacher_batch_size) >= 100


def test_the_scale_family_differs_only_in_its_size() -> None:
    # Prepare
    size_keys = {"scenario", "num-clients", "min-clients", "min-partition-size", "num-server-rounds"}

    # Execute
    small, large = (resolved(name).to_dict() for name in SCALE)

    # Assert
    assert {key for key in small if small[key] != large[key]} - {"run-name"} <= size_keys


def test_fmnist_1000_can_be_partitioned_at_its_min_partition_size() -> None:
    # Prepare: 50,000 labels of 10 balanced classes, as the private pool of Fashion-MNIST holds
    cfg = resolved("fmnist-1000")
    labels = np.repeat(np.arange(10), 5000)

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Flower Datasets warns when it resamples
        rows = partition_indices(labels, cfg.num_clients, 7, cfg.partitioner, alpha=cfg.dirichlet_alpha,
                                 min_partition_size=cfg.min_partition_size, seed=cfg.seed)

    # Assert
    assert len(rows) >= cfg.min_partition_size
