"""Filtering rules: aggregate, then tell the student which public samples to skip."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from common.aggregation.base import Aggregate, RuleInput, normalised_entropy, to_aggregate


def unsoften(probs: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    """Rows softened at temperature T back to T = 1: p^T, renormalised (computed in log space)."""
    logp = temperature * np.log(np.clip(probs, 1e-300, None))
    logp -= logp.max(axis=1, keepdims=True)
    sharp = np.exp(logp)
    rows: npt.NDArray[np.float64] = sharp / sharp.sum(axis=1, keepdims=True)
    return rows


def selective_rule(inputs: RuleInput) -> Aggregate:
    r"""The ensemble mean, keeping only the samples on which the ensemble is decided enough.

    .. math:: p_i = \frac{1}{k} \sum_j q_{ji}, \qquad
              \mathrm{keep}_i = \Big[\frac{H(p_i)}{\log C} \le \tau\Big]

    with τ = `selective_threshold` and :math:`H(p) = -\sum_c p_c \log p_c`, divided by log C here so
    that τ means the same for any C: 0 for a one-hot row, 1 for the uniform row, so τ = 1 keeps every
    sample. The server-side selector of Selective-FD, Shao et al. (2024), "Selective knowledge sharing
    for privacy-preserving federated distillation without a good teacher", Nature Communications (its
    client-side selectors are not an aggregation rule and are not implemented here). If no row passes,
    the rows of minimal entropy (within 1e-12) are kept instead of none: a round always teaches the
    student something, and exact ties keep all the tied rows rather than an arbitrary one. Helps when
    teachers disagree on many public samples (out-of-distribution or between their classes): ambiguous
    targets are dropped.

    The teachers softened their outputs at temperature T (`params.temperature`); ambiguity is judged
    at T = 1, on :math:`p^T / \sum_c p_c^T` (exact for one teacher, whose softmax(z/T) raised to the
    power T and renormalised is softmax(z)), so τ means the same whatever T the round used. The
    student still learns from the softened rows.
    """
    mean = inputs.stack.mean(axis=0)  # (n, C) float64, rows on the simplex
    return to_aggregate(mean, inputs.stack, decided(mean, inputs.params.temperature, inputs.params.selective_threshold))


def decided(mean: npt.NDArray[np.float64], temperature: float, threshold: float) -> npt.NDArray[np.bool_]:
    """`selective`'s keep mask `(n,)` from the ensemble mean `(n, C)` alone: H / log C at T = 1 within `threshold`,
    or, when no row passes, the rows of minimal entropy."""
    spread = normalised_entropy(unsoften(mean, temperature))  # (n,) in [0, 1]
    keep: npt.NDArray[np.bool_] = spread <= threshold
    if not keep.any():
        keep = spread <= spread.min() + 1e-12
    return keep
