"""A round of local training (client/teacher.py `train_round`) is sized to the institution's data: at least
`local-min-steps` optimiser steps, whatever `local-epochs` gives on a few hundred rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from client.site import Site
from client.teacher import train_round
from common.config import RunConfig, default_run_config
from common.models.inputs import input_shape
from common.models.registry import build_model
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


def small_site(rows: int) -> Site:
    split = load_split("digits", "", 400, 42)
    return Site(partition_id=0, private=split.private.subset(np.arange(rows)), public=split.public, test=split.test,
                fingerprint=public_fingerprint(split.public))


def config(**changes: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), "dataset": "digits", "public-size": 400,
                                      "teacher-models": "mlp", "local-epochs": 1, "teacher-lr": 0.001,
                                      **changes})


def counted_steps(model: nn.Module) -> list[int]:
    """Counts the optimiser steps of a training run: one forward pass of the model in training mode each."""
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1) if module.training else None)
    return calls


@pytest.mark.parametrize(("rows", "local_epochs", "min_steps", "batch", "expected_steps"), [
    (40, 1, 0, 16, 3),      # off: one epoch of 3 batches (16 + 16 + 8)
    (40, 1, 10, 16, 12),    # 4 epochs of 3 batches: the fewest epochs reaching 10 steps
    (40, 2, 4, 16, 6),      # local-epochs already gives more than the minimum
    (200, 1, 25, 64, 28),   # 4 batches an epoch: 7 epochs
])
def test_a_round_trains_at_least_local_min_steps(rows: int, local_epochs: int, min_steps: int, batch: int,
                                                 expected_steps: int) -> None:
    # Prepare
    site = small_site(rows)
    cfg = config(**{"local-epochs": local_epochs, "local-min-steps": min_steps, "teacher-batch-size": batch})
    model = build_model("mlp", site.private.num_classes, input_shape(site.private.inputs), seed=0)
    steps = counted_steps(model)

    # Execute
    loss = train_round(model, cfg, site, rounds_trained=0)

    # Assert
    assert len(steps) == expected_steps
    assert len(steps) == cfg.local_epochs_for(rows) * math.ceil(rows / batch)
    assert math.isfinite(loss)


def test_more_steps_fit_a_small_institution_better() -> None:
    # Prepare: 60 private images, batches of 32: one epoch is 2 Adam steps
    site = small_site(60)
    models = {steps: build_model("mlp", site.private.num_classes, input_shape(site.private.inputs), seed=0)
              for steps in (0, 60)}

    # Execute
    losses = {steps: train_round(model, config(**{"local-min-steps": steps, "teacher-batch-size": 32}), site, 0)
              for steps, model in models.items()}

    # Assert: the last epoch's training loss
    assert losses[0] > 2.0  # two steps leave it near chance, ln 10 = 2.3
    assert losses[60] < 0.6 * losses[0]
