"""What a distilled student retains and how far its confidence can be trusted, beside its accuracy and
macro-F1 (`common.metrics`).

    js_divergence             knowledge retention: Jensen-Shannon divergence between the student's and the
                              teacher ensemble's distributions, per sample, in bits (0 = identical, 1 = disjoint)
    expected_calibration_error  ECE (Guo et al., 2017): confidence against accuracy in equal-width bins

Plain numpy on probabilities `(n, C)`; nothing here knows a model.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks", use 15 equal-width bins


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    r"""Per-row Jensen-Shannon divergence in bits (log base 2), in [0, 1].

    .. math::

        \mathrm{JS}(p \,\|\, q) = \tfrac12 \mathrm{KL}(p \,\|\, m) + \tfrac12 \mathrm{KL}(q \,\|\, m),
        \qquad m = \tfrac12 (p + q)

    (Lin, 1991). Symmetric and finite even where one distribution puts zero mass, which KL is not;
    terms with zero mass contribute 0 (the limit of x log x).
    p, q  # (n, C) rows on the simplex -> (n,) float64
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"js_divergence: expected two (n, C) arrays of one shape, got {p.shape} and {q.shape}")
    m = 0.5 * (p + q)
    return 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)


def _kl_bits(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """KL(p || m) per row in bits; m > 0 wherever p > 0 because m = (p + q) / 2."""
    ratio = np.divide(p, m, out=np.ones_like(p), where=p > 0)
    return np.sum(p * np.log2(ratio), axis=1)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    r"""ECE with `bins` equal-width confidence bins (Guo et al., 2017, eq. 3).

    .. math::

        \mathrm{ECE} = \sum_{b=1}^{B} \frac{|S_b|}{n}\, \big|\mathrm{acc}(S_b) - \mathrm{conf}(S_b)\big|

    where the confidence of a sample is its top probability, S_b holds the samples whose confidence is
    in ((b-1)/B, b/B], acc is the share of S_b predicted right and conf the mean confidence in S_b.
    probs   # (n, C) rows on the simplex
    labels  # (n,) int64
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if bins < 1:
        raise ValueError(f"expected_calibration_error: bins must be >= 1, got {bins}")
    if len(labels) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b (0-based) holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 joins the first
    which = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)
