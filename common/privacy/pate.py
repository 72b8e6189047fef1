"""PATE inside one institution: disjoint shards, sub-teacher vote histograms, and GNMax noisy soft labels.

The institution splits its private data into disjoint shards, trains one sub-teacher per shard (the
caller trains; this module holds the pure pieces), counts the sub-teachers' votes on each public
sample, and releases the vote histograms with Gaussian noise, turned into soft labels (Papernot et al.
2018, "Scalable Private Learning with PATE"; Papernot et al. 2017 for PATE).

Sensitivity argument: a private record lies in exactly one shard, so adding, removing or changing it
changes only that shard's sub-teacher, hence at most that one teacher's vote on each public sample: one
count goes down by 1 and another goes up by 1. Each histogram's L2 sensitivity is therefore sqrt(2)
(L1 sensitivity 2). Adding N(0, sigma^2) to every count is the Gaussian mechanism with noise multiplier
sigma / sqrt(2); releasing m histograms composes m such mechanisms, which gnmax_event records for the
accountant (data-independent analysis). Clipping and normalisation are post-processing and cost nothing.
The noise must be unpredictable to everyone else: draw it from `os_entropy_rng` (128 bits of OS entropy),
never from a seed another party knows; tests pass seeded generators for determinism.

The argument takes the partition as fixed, as PATE does: which shard every other record lies in must
not depend on the one record. shard_indices draws the partition from (n, seed) alone, which holds for
records that change in place; keep n and seed fixed for the life of the ledger (never reshuffle per
round), and give records added later a shard of their own choosing rather than re-sharding everything.
"""

from __future__ import annotations

import math
import numbers
import secrets
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import ConfigError
from common.privacy import accounting

L2_SENSITIVITY = math.sqrt(2)
"""L2 sensitivity of one vote histogram to one private record: one count -1, another +1."""


def shard_indices(n: int, num_shards: int, seed: int) -> list[npt.NDArray[np.int64]]:
    """Disjoint, covering shards of range(n) from a seeded permutation; sizes differ by at most one.

    Each shard is sorted ascending, int64.
    """
    for name, value in (("n", n), ("num_shards", num_shards), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"PATE sharding: {name} must be an integer, got {value!r}")
    if num_shards < 2:
        raise ConfigError(f"PATE sharding: num_shards must be >= 2 (one sub-teacher per shard), got {num_shards}")
    if n < num_shards:
        raise ConfigError(
            f"PATE sharding: {n} private samples cannot fill {num_shards} shards; lower the number of "
            "sub-teachers or use more private data"
        )
    permutation = np.random.default_rng(int(seed)).permutation(int(n))
    return [np.sort(shard).astype(np.int64) for shard in np.array_split(permutation, int(num_shards))]


def vote_histograms(predictions: np.ndarray, num_classes: int) -> npt.NDArray[np.int64]:
    """Per-sample vote counts: predictions (num_teachers, m) int class ids -> (m, num_classes) int64."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or not np.issubdtype(predictions.dtype, np.integer):
        raise ConfigError(
            f"PATE votes: predictions must be an integer array (num_teachers, m), got dtype "
            f"{predictions.dtype} shape {predictions.shape}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"PATE votes: num_classes must be an integer >= 2, got {num_classes!r}")
    if predictions.size and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ConfigError(
            f"PATE votes: class ids must lie in [0, {num_classes}), got range "
            f"[{predictions.min()}, {predictions.max()}]; check num_classes"
        )
    num_samples = predictions.shape[1]
    votes = np.zeros((num_samples, int(num_classes)), dtype=np.int64)  # (m, C)
    rows = np.arange(num_samples)
    for teacher in predictions:  # one vote per teacher per sample, so no index repeats within a step
        votes[rows, teacher] += 1
    return votes


def os_entropy_rng() -> np.random.Generator:
    """A numpy Generator (PCG64) seeded with 128 bits from the operating system's CSPRNG (`secrets`)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(128))))


def noisy_votes(votes: np.ndarray, sigma: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """The GNMax mechanism: votes + N(0, sigma^2) independently per count, (m, C) float64."""
    votes = _check_votes(votes)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0.0 < float(sigma) < math.inf:
        raise ConfigError(f"GNMax: sigma must be a finite number > 0, got {sigma!r}; calibrate it with calibrate_gnmax")
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"GNMax: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return votes.astype(np.float64) + rng.normal(0.0, float(sigma), size=votes.shape)


def gnmax_soft_labels(votes: np.ndarray, sigma: float, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Noisy vote histograms turned into soft labels, (m, C) float32 rows on the simplex.

    soft = max(votes + N(0, sigma^2 I), 0), each row divided by its sum; a row with no positive entry
    becomes uniform. The noise is the mechanism (L2 sensitivity sqrt(2), see the module docstring);
    clipping, normalisation and the uniform fallback are post-processing.
    """
    clipped = np.maximum(noisy_votes(votes, sigma, rng), 0.0)  # (m, C) float64, >= 0
    totals = clipped.sum(axis=1, keepdims=True)  # (m, 1)
    num_classes = clipped.shape[1]
    uniform = np.full_like(clipped, 1.0 / num_classes)
    soft: npt.NDArray[np.float64] = np.divide(clipped, totals, out=uniform, where=totals > 0)
    return soft.astype(np.float32)  # (m, C) float32, rows sum to 1


def gnmax_event(sigma: float, queries: int) -> dict[str, Any]:
    """Privacy history entry for `queries` GNMax histogram releases at noise std `sigma`."""
    return accounting.check_entry(
        {"mechanism": "gnmax", "sigma": sigma, "l2_sensitivity": L2_SENSITIVITY, "queries": queries}
    )


def _check_votes(votes: np.ndarray) -> np.ndarray:
    """The votes as an array, or ConfigError unless they are (m, C) non-negative integer counts."""
    votes = np.asarray(votes)
    if votes.ndim != 2 or votes.shape[1] < 2 or not np.issubdtype(votes.dtype, np.integer):
        raise ConfigError(
            f"GNMax: votes must be integer counts of shape (m, C) with C >= 2, got dtype {votes.dtype} "
            f"shape {votes.shape}; build them with vote_histograms"
        )
    if votes.size and votes.min() < 0:
        raise ConfigError("GNMax: vote counts must be >= 0; build them with vote_histograms")
    return votes
