"""Unit tests of common/privacy/dpsgd.py: DP-SGD teachers (Opacus) — model compatibility, the step
rule, the reported history entry against Opacus's accountant, the noise scale and the clipping bound
actually applied, and that a DP teacher still learns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import opacus
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import ConfigError, DataError
from common.models.registry import MODELS, build_model
from common.models.training import accuracy
from common.privacy.dpsgd import opacus_steps_per_epoch, planned_event, require_dp_compatible, train_dpsgd
from common.tasks.registry import load_split

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


@dataclass
class EngineSpy:
    """What Opacus did inside train_dpsgd: its engines, and per step the gradient handed to Adam."""

    engines: list[PrivacyEngine] = field(default_factory=list)
    expected_batch_sizes: list[int] = field(default_factory=list)
    step_grads: list[torch.Tensor] = field(default_factory=list)  # per step: (n_params,) noisy, scaled
    batch_sizes: list[int] = field(default_factory=list)  # per step: the Poisson batch's size
    optimizers: list[Any] = field(default_factory=list)  # the DPOptimizers, as training left them


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> EngineSpy:
    """Replace Opacus's PrivacyEngine (train_dpsgd imports it when it runs) by a subclass that records the
    engine and every privatised step."""
    record = EngineSpy()

    def before_adam_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        record.step_grads.append(torch.cat([p.grad.detach().flatten().clone() for p in params]))
        record.batch_sizes.append(len(params[0].grad_sample))

    class RecordingEngine(PrivacyEngine):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            record.engines.append(self)

        def make_private(self, **kwargs: Any):
            module, optimizer, loader = super().make_private(**kwargs)
            record.expected_batch_sizes.append(optimizer.expected_batch_size)
            record.optimizers.append(optimizer)
            optimizer.original_optimizer.register_step_pre_hook(before_adam_step)
            return module, optimizer, loader

    monkeypatch.setattr(opacus, "PrivacyEngine", RecordingEngine)
    return record


def random_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 10, n)  # (n, 8, 8), (n,)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def dp_kwargs(**overrides: Any) -> dict[str, Any]:
    base = {"epochs": 1, "lr": 0.01, "batch_size": 32, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 7}
    return {**base, **overrides}


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_is_opacus_valid_on_digits(name: str) -> None:
    # Prepare
    model = build_model(name, 10, (8, 8))

    # Execute / Assert: neither raises
    ModuleValidator.validate(model, strict=True)
    require_dp_compatible(model, name)


def test_cnn_small_is_opacus_valid_on_fashion_mnist_images() -> None:
    # Prepare
    model = build_model("cnn-small", 10, (28, 28))

    # Execute / Assert
    ModuleValidator.validate(model, strict=True)
    require_dp_compatible(model, "cnn-small")


def test_batchnorm_model_is_rejected_with_a_config_error_naming_it() -> None:
    # Prepare: BatchNorm mixes records of a batch, so per-example gradients (and DP-SGD) are undefined
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    images, labels = random_data(40)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"model 'Sequential' cannot be trained with DP-SGD: .*BatchNorm"):
        train_dpsgd(model, images, labels, **dp_kwargs())
    with pytest.raises(ConfigError, match=r"model 'resnet-bn' cannot be trained with DP-SGD"):
        require_dp_compatible(model, "resnet-bn")


# ------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"noise_multiplier": 0.0}, "dp-noise-multiplier"),
        ({"noise_multiplier": -1.0}, "dp-noise-multiplier"),
        ({"max_grad_norm": 0.0}, "dp-max-grad-norm"),
        ({"epochs": 0}, "local-epochs"),
        ({"lr": 0.0}, "teacher-lr"),
        ({"batch_size": 0}, "teacher-batch-size"),
        ({"batch_size": 41}, "teacher-batch-size"),
    ],
)
def test_out_of_range_setting_is_rejected_naming_its_key(override: dict[str, Any], key: str) -> None:
    # Prepare
    model = build_model("cnn-tiny", 10, (8, 8), seed=0)
    before = snapshot(model)
    images, labels = random_data(40)

    # Execute / Assert
    with pytest.raises(ConfigError, match=f"{key} must be"):
        train_dpsgd(model, images, labels, **dp_kwargs(**override))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_bad_setting_is_reported_at_once() -> None:
    # Prepare
    images, labels = random_data(40)

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        train_dpsgd(build_model("mlp", 10, (8, 8)), images, labels,
                    **dp_kwargs(noise_multiplier=0.0, max_grad_norm=-1.0, batch_size=100))

    # Assert
    message = str(excinfo.value)
    assert "dp-noise-multiplier" in message and "dp-max-grad-norm" in message
    assert "teacher-batch-size must be between 1 and the number of private examples (40), got 100" in message


def test_images_and_labels_of_different_lengths_are_rejected() -> None:
    # Prepare
    images, labels = random_data(40)

    # Execute / Assert
    with pytest.raises(DataError, match="private data: 40 images but 39 labels"):
        train_dpsgd(build_model("mlp", 10, (8, 8)), images, labels[:39], **dp_kwargs())


def test_planned_event_rejects_bad_settings() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="dp-noise-multiplier must be > 0, got 0"):
        planned_event(100, 10, 1, 0)
    with pytest.raises(ConfigError, match="local-epochs must be >= 1, got 0"):
        planned_event(100, 10, 0, 1.0)


# ------------------------------------------------------------------------------------------ step rule


@pytest.mark.parametrize(
    ("n", "batch_size", "steps"),
    [
        (640, 64, 10),  # batch size divides n: n / batch_size
        (1037, 64, 17),  # ceil(1037 / 64) = 17, not 1037 // 64
        (930, 10, 92),  # ceil = 93, but int(1 / (1 / 93)) = 92 in floating point
        (99, 1, 98),  # same floating-point drop at 99
        (100, 100, 1),
        (7, 1, 7),
    ],
)
def test_steps_per_epoch_follow_opacus_rule(n: int, batch_size: int, steps: int) -> None:
    # Execute / Assert
    assert opacus_steps_per_epoch(n, batch_size) == steps


def test_planned_event_golden_values() -> None:
    # Execute
    event = planned_event(1037, 64, 3, 1.1)

    # Assert: Opacus's sample rate is 1 / steps-per-epoch, not batch_size / n (= 0.0617...)
    assert event == {"mechanism": "dp-sgd", "noise_multiplier": 1.1, "sample_rate": 1 / 17, "steps": 51}


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(("name", "n", "batch_size", "epochs"), [("cnn-tiny", 200, 32, 2), ("mlp", 930, 10, 1)])
def test_train_dpsgd_trains_in_place_and_reports_the_planned_event(
    spy: EngineSpy, name: str, n: int, batch_size: int, epochs: int
) -> None:
    # Prepare
    model = build_model(name, 10, (8, 8), seed=0)
    before = snapshot(model)
    images, labels = random_data(n)

    # Execute
    loss, event = train_dpsgd(model, images, labels, **dp_kwargs(batch_size=batch_size, epochs=epochs))

    # Assert: the plain model holds new weights under its usual keys, and Opacus left nothing on it
    after = model.state_dict()
    assert list(after) == list(before)
    assert not any(key.startswith("_module.") for key in after)
    assert all(not torch.equal(before[key], after[key]) for key in before)
    assert all(torch.isfinite(value).all() for value in after.values())
    assert math.isfinite(loss) and loss > 0
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    # Assert: the entry is the planned one, and the steps are those the loop took
    assert event == planned_event(n, batch_size, epochs, 1.0)
    assert event["steps"] == len(spy.step_grads) == epochs * opacus_steps_per_epoch(n, batch_size)


def test_train_dpsgd_is_reproducible_for_a_seed() -> None:
    # Prepare
    images, labels = random_data(120)
    models = [build_model("cnn-tiny", 10, (8, 8), seed=0) for _ in range(3)]

    # Execute
    results = [train_dpsgd(model, images, labels, **dp_kwargs(seed=seed)) for model, seed in zip(models, (5, 5, 6), strict=True)]

    # Assert
    same, other = models[0].state_dict(), models[2].state_dict()
    assert results[0] == results[1]
    assert all(torch.equal(same[k], v) for k, v in models[1].state_dict().items())
    assert not all(torch.equal(same[k], v) for k, v in other.items())


def test_without_a_seed_every_run_draws_fresh_noise() -> None:
    # Prepare: what a node does (no seed): sampling and noise from OS entropy
    images, labels = random_data(120)
    models = [build_model("cnn-tiny", 10, (8, 8), seed=0) for _ in range(2)]

    # Execute
    for model in models:
        train_dpsgd(model, images, labels, **{**dp_kwargs(), "seed": None})

    # Assert: same data, same start, different noise (equal weights would take a 2^-128 collision)
    first, second = models[0].state_dict(), models[1].state_dict()
    assert not all(torch.equal(first[k], v) for k, v in second.items())


def test_the_generators_keep_every_bit_of_the_seed() -> None:
    # Prepare: torch's manual_seed would keep only the low 32 bits, making these two seeds one
    from common.privacy.dpsgd import _torch_generator

    low, high = 5, 5 + 2**100

    # Execute
    draws = [torch.randn(8, generator=_torch_generator(np.random.SeedSequence(seed))) for seed in (low, low, high)]

    # Assert
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_noise_is_drawn_in_opacus_secure_mode(spy: EngineSpy) -> None:
    # Prepare
    images, labels = random_data(64)

    # Execute
    train_dpsgd(build_model("mlp", 10, (8, 8), seed=0), images, labels, **dp_kwargs())

    # Assert: the optimizer draws floating-point-safe noise (the sum of four Gaussians, halved)
    assert spy.optimizers and all(optimizer.secure_mode for optimizer in spy.optimizers)


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs", "noise", "order"),
    [(200, 20, 2, 2.0, 12), (930, 10, 1, 1.5, 20)],  # 930/10: the 92-steps-per-epoch case
)
def test_epsilon_of_reported_entry_equals_opacus_accountant(
    spy: EngineSpy, n: int, batch_size: int, epochs: int, noise: float, order: int
) -> None:
    # Prepare
    from common.privacy.accounting import epsilon

    images, labels = random_data(n)
    model = build_model("mlp", 10, (8, 8), seed=0)

    # Execute
    settings = dp_kwargs(batch_size=batch_size, epochs=epochs, noise_multiplier=noise)
    _, event = train_dpsgd(model, images, labels, **settings)
    opacus_eps, best_order = spy.engines[0].accountant.get_privacy_spent(delta=DELTA)

    # Assert: the best order is an integer inside both accountants' grids, where both compute the
    # subsampled Gaussian's RDP exactly (at fractional orders Opacus's series runs up to 1e-3 low)
    assert best_order == order
    assert epsilon([event], DELTA) == pytest.approx(opacus_eps, rel=1e-6)


def test_epsilon_matches_opacus_closely_at_a_fractional_best_order(spy: EngineSpy) -> None:
    # Prepare
    from common.privacy.accounting import epsilon

    images, labels = random_data(200)

    # Execute
    _, event = train_dpsgd(build_model("mlp", 10, (8, 8), seed=0), images, labels,
                           **dp_kwargs(batch_size=20, epochs=2, noise_multiplier=1.0))
    opacus_eps, best_order = spy.engines[0].accountant.get_privacy_spent(delta=DELTA)

    # Assert: dp-accounting's fractional-order RDP is the larger, so ours is the (slightly) safer figure
    assert best_order == pytest.approx(4.2)
    assert opacus_eps <= epsilon([event], DELTA) <= opacus_eps * (1 + 1e-4)


# ------------------------------------------------------------------------------ noise and clipping


@pytest.mark.parametrize(("noise", "clip"), [(0.7, 1.0), (3.0, 0.5)])
def test_noise_actually_added_has_the_configured_scale(spy: EngineSpy, noise: float, clip: float) -> None:
    # Prepare: zero images into a bias-free linear layer give zero per-example gradients, so what
    # reaches Adam is pure noise N(0, (z*C)^2) divided by the expected batch size (loss_reduction="mean")
    n, batch_size = 640, 64  # 10 steps, expected batch size 64
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False))
    images, labels = np.zeros((n, 8, 8), dtype=np.uint8), np.arange(n) % 10

    # Execute
    train_dpsgd(model, images, labels, **dp_kwargs(batch_size=batch_size, noise_multiplier=noise, max_grad_norm=clip))

    # Assert: over N = 10 steps x 640 coordinates, mean 0 and std z*C/64, each within 5 standard
    # errors (std error of the mean sigma/sqrt(N), of the sample std about sigma/sqrt(2N))
    samples = torch.cat(spy.step_grads).double()
    count, sigma = samples.numel(), noise * clip / batch_size
    assert spy.expected_batch_sizes == [batch_size] and count == 10 * 640
    assert abs(float(samples.mean())) < 5 * sigma / math.sqrt(count)
    assert abs(float(samples.std()) - sigma) < 5 * sigma / math.sqrt(2 * count)


def test_each_record_contributes_at_most_the_clip_norm(spy: EngineSpy) -> None:
    # Prepare: identical inputs and labels give identical per-example gradients of norm about 7.6,
    # far above C, so the clipped sum has norm exactly C * |batch|; noise is tiny (z = 1e-3)
    n, batch_size, clip, noise = 256, 32, 0.1, 1e-3
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    images, labels = np.full((n, 8, 8), 255, dtype=np.uint8), np.zeros(n, dtype=np.int64)
    dims = sum(p.numel() for p in model.parameters())

    # Execute
    train_dpsgd(model, images, labels,
                **dp_kwargs(lr=1e-4, batch_size=batch_size, noise_multiplier=noise, max_grad_norm=clip))

    # Assert: |‖sum + noise‖ - ‖sum‖| <= ‖noise‖ <= z*C*(sqrt(d) + 5) but for odds below e^-12
    noise_bound = noise * clip * (math.sqrt(dims) + 5)
    for grad, size in zip(spy.step_grads, spy.batch_sizes, strict=True):
        summed_norm = float(grad.norm()) * batch_size  # undo the division by the expected batch size
        assert summed_norm == pytest.approx(clip * size, abs=noise_bound)
    assert len(spy.step_grads) == 8 and sum(spy.batch_sizes) > 0


# --------------------------------------------------------------------------------------- learning


def test_dp_teacher_still_learns_digits() -> None:
    # Prepare
    split = load_split("digits", "", 400, 42)
    model = build_model("mlp", 10, (8, 8), seed=0)

    # Execute
    loss, event = train_dpsgd(model, split.private.images, split.private.labels,
                              **dp_kwargs(epochs=2, lr=0.01, batch_size=64, noise_multiplier=1.0, max_grad_norm=1.0))

    # Assert: well above chance (0.1) on the held-out test set
    assert accuracy(model, split.test.images, split.test.labels) > 0.5
    assert event["steps"] == 2 * 17 and math.isfinite(loss)
