"""DP-SGD teacher training (privacy mechanism 1): a teacher whose weights are differentially private.

DP-SGD (Abadi et al., 2016, "Deep Learning with Differential Privacy"), run by Opacus: each step
draws a Poisson batch (every private record joins independently with probability q), clips every
per-example gradient to L2 norm at most C (`max_grad_norm`), sums the clipped gradients, adds
Gaussian noise N(0, (z·C)² I) to the sum (z = `noise_multiplier`) and divides by the expected batch
size before the optimizer step:

    g_t = (Σ_{i ∈ B_t} clip_C(∇ℓ(θ_t; x_i, y_i)) + N(0, (z·C)² I)) / E|B_t|

Sensitivity: adding or removing one record changes the sum of clipped per-example gradients by at
most C in L2 norm, so each step is a Poisson-subsampled Gaussian mechanism with noise multiplier z
and sample rate q; the accountant (`common.privacy.accounting`) composes the steps. Everything the
institution releases afterwards (soft labels on public data, computed from the trained weights) is
post-processing and costs no further privacy.

Opacus's step rule, which `planned_event` reproduces: with k = ceil(n / batch_size) (the length of a
plain DataLoader), the Poisson loader samples at rate 1/k and takes int(1 / (1/k)) steps per epoch,
which floating point makes k - 1 for some k (93, 99, 105, ...); its accountant then charges
q = 1 / steps_per_epoch. That q is never below the true sampling rate, so the history entry this
module reports (Opacus's q and the steps actually taken) is what Opacus's own accountant charges
and a sound bound on the mechanism. Note q is not batch_size / n but 1 / ceil(n / batch_size), which
is at most batch_size / n (equal when batch_size divides n): Poisson batches average n / k records.

Randomness: the Poisson sampling and the Gaussian noise each come from their own torch Generator whose
whole Mersenne-Twister state (624 words) is filled from a SeedSequence; without a `seed` (as nodes run
it) that SeedSequence draws 128 bits of OS entropy, so nobody can reproduce the noise. (torch's
`manual_seed` would keep only 32 bits of any seed; Opacus's own `secure_mode=True` needs `torchcsprng`,
which has no build for current torch.) The noise is drawn as Opacus's secure mode draws it: the sum of
four Gaussians halved, which resists the floating-point attacks on Gaussian sampling (Holohan et al.
2021, arXiv:2107.10138) at the cost of four normal draws per parameter per step instead of one.

Opacus (and with it most of `torch.distributed`) is imported only inside the functions that train or
validate under DP-SGD: a node without privacy never loads it (tests/unit/test_lazy_imports.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError, DataError
from common.models.inputs import inputs_to_tensor
from common.models.scattering import fixed_stage

if TYPE_CHECKING:
    from opacus import PrivacyEngine

MECHANISM = "dp-sgd"

# Warnings Opacus (and torch, on Opacus's hooks) raise on every run that say nothing about this run.
_KNOWN_WARNINGS = (
    r"Secure RNG turned off",  # secure_mode=False: we pass OS-seeded generators ourselves (module docstring)
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
)


def opacus_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps Opacus's Poisson DataLoader takes per epoch: int(1 / (1 / ceil(n / batch_size)))."""
    batches = math.ceil(num_examples / batch_size)  # len() of a plain DataLoader, drop_last=False
    return int(1 / (1 / batches))  # UniformWithReplacementSampler: steps = int(1 / sample_rate)


def planned_event(num_examples: int, batch_size: int, epochs: int, noise_multiplier: float) -> dict[str, Any]:
    """The privacy history entry `train_dpsgd` will report for these arguments, before training."""
    _check_arguments(num_examples, batch_size=batch_size, epochs=epochs, noise_multiplier=noise_multiplier)
    steps_per_epoch = opacus_steps_per_epoch(num_examples, batch_size)
    return {
        "mechanism": MECHANISM,
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": 1 / steps_per_epoch,
        "steps": epochs * steps_per_epoch,
    }


def require_dp_compatible(model: nn.Module, name: str | None = None) -> None:
    """Raise ConfigError unless Opacus can compute per-example gradients of `model` (no BatchNorm, ...)."""
    from opacus.validators import ModuleValidator  # here, not at the top: only the DP path loads Opacus

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        label = name or type(model).__name__
        reasons = "; ".join(str(problem) for problem in problems)
        raise ConfigError(
            f"model {label!r} cannot be trained with DP-SGD: {reasons}; choose a teacher architecture "
            "without BatchNorm (cnn-tiny, cnn-small, cnn-large, mlp)"
        )


def train_dpsgd(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None = None,
) -> tuple[float, dict[str, Any]]:
    """Train `model` in place with DP-SGD (Adam on the privatised gradients, cross-entropy loss).

    `images` are uint8 `(n, h, w)`, `labels` int `(n,)`. Afterwards the plain `model` holds the
    trained weights (its state_dict keys are unchanged). Returns the mean loss of the last epoch
    and the privacy history entry of what was done. Sampling and noise come from 128 bits of OS
    entropy, or, for tests only, from `seed` (reproducible: never pass a seed another party knows).
    """
    from opacus import PrivacyEngine  # here, not at the top: only the DP path loads Opacus

    x = inputs_to_tensor(images)  # (n, 1, h, w) float32 in [0, 1] for images; features or token ids as they are
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))  # (n,)
    if len(x) != len(y):
        raise DataError(f"private data: {len(x)} images but {len(y)} labels; they must match one to one")
    _check_arguments(len(y), batch_size=batch_size, epochs=epochs, noise_multiplier=noise_multiplier,
                     max_grad_norm=max_grad_norm, lr=lr)
    event = planned_event(len(y), batch_size, epochs, noise_multiplier)
    require_dp_compatible(model)
    model, x = fixed_stage(model, x)  # fixed features (no weights, no privacy cost): DP-SGD trains the head
    sampling, noise = (_torch_generator(s) for s in np.random.SeedSequence(seed).spawn(2))  # seed None: OS entropy
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, generator=sampling)
    with _known_opacus_warnings_silenced():
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private_model, optimizer, private_loader = engine.make_private(
            module=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr), data_loader=loader,
            noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm), poisson_sampling=True,
            noise_generator=noise,
        )
        optimizer.secure_mode = True  # Opacus's floating-point-safe noise (module docstring), from our generator
        try:
            loss, steps = _run_epochs(private_model, optimizer, private_loader, epochs)
        finally:
            private_model.cleanup()  # detach Opacus's hooks and per-sample attributes from `model`
    actual = {**event, "sample_rate": 1 / len(private_loader), "steps": steps}
    _check_matches_accountant(actual, engine)
    return loss, actual


_MT_WORDS = 624  # the Mersenne Twister's state: 624 32-bit words
_MT_STATE_OFFSET = 24  # torch's CPU generator state: seed u64, left i32, seeded i32, next u64, then state u64[624]


def _torch_generator(seed: np.random.SeedSequence) -> torch.Generator:
    """A CPU torch Generator whose whole Mersenne-Twister state comes from `seed` (all its entropy kept).

    torch's manual_seed keeps only the low 32 bits of a seed, so the state is written directly: the
    layout is checked against a manual_seed'ed generator first, and any change of it is refused.
    """
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state().numpy().copy()  # (5056,) uint8, torch's legacy CPU generator state
    words = state[_MT_STATE_OFFSET:_MT_STATE_OFFSET + 8 * _MT_WORDS].view("<u8")  # (624,) uint64 view
    if state.size != 5056 or words[0] != 1 or words[1] != (1812433253 * (1 ^ (1 >> 30)) + 1) & 0xFFFFFFFF:
        raise RuntimeError(
            "dp-sgd: torch's CPU generator state no longer has the layout this module writes; update "
            "_torch_generator before training under DP (the noise must come from the full 128-bit seed)"
        )
    words[:] = seed.generate_state(_MT_WORDS, np.uint32).astype(np.uint64)
    generator.set_state(torch.from_numpy(state))
    return generator


def _run_epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[tuple[torch.Tensor, ...]], epochs: int
) -> tuple[float, int]:
    """Every Poisson batch, empty ones included, is one noisy step; returns (last epoch's mean loss, steps)."""
    model.train()
    steps, last = 0, float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)  # nan on an empty batch, whose step is noise only
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            optimizer.step()
            steps += 1
            if len(yb):
                total += float(loss.detach()) * len(yb)
                count += len(yb)
        last = total / count if count else float("nan")
    return last, steps


def _check_matches_accountant(event: dict[str, Any], engine: PrivacyEngine) -> None:
    """The entry we report must be exactly what Opacus's accountant charged, or accounting is wrong."""
    charged = [tuple(entry) for entry in engine.accountant.history]
    expected = [(event["noise_multiplier"], event["sample_rate"], event["steps"])]
    if charged != expected:
        raise RuntimeError(
            f"dp-sgd: Opacus's accountant charged {charged} but this run reports {expected}; the "
            "Opacus step rule changed, so fix opacus_steps_per_epoch before releasing anything"
        )


def _check_arguments(
    num_examples: int,
    *,
    batch_size: int | None = None,
    epochs: int | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    lr: float | None = None,
) -> None:
    """Raise one ConfigError naming every out-of-range DP-SGD setting."""
    checks: list[tuple[float | None, Callable[[float], bool], str]] = [
        (noise_multiplier, lambda v: v > 0, "dp-noise-multiplier must be > 0"),
        (max_grad_norm, lambda v: v > 0, "dp-max-grad-norm must be > 0"),
        (epochs, lambda v: v >= 1, "local-epochs must be >= 1"),
        (lr, lambda v: v > 0, "teacher-lr must be > 0"),
        (batch_size, lambda v: 1 <= v <= num_examples,
         f"teacher-batch-size must be between 1 and the number of private examples ({num_examples})"),
    ]
    problems = [f"{rule}, got {value}" for value, ok, rule in checks if value is not None and not ok(value)]
    if problems:
        raise ConfigError("bad DP-SGD settings: " + "; ".join(problems))


@contextmanager
def _known_opacus_warnings_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield
