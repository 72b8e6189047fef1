"""Robust rules: coordinate-wise statistics that a minority of outlying or adversarial institutions cannot drag far.

Both work coordinate by coordinate, so the result leaves the simplex and is renormalised by
`to_aggregate`; a row left with no mass falls back to the plain mean.
"""

from __future__ import annotations

import math

import numpy as np

from common.aggregation.base import Aggregate, RuleInput, to_aggregate


def median_rule(inputs: RuleInput) -> Aggregate:
    r"""Coordinate-wise median across institutions, then renormalise each row.

    .. math:: \tilde p_{ic} = \operatorname{median}_{j}\, q_{jic}, \qquad
              p_{ic} = \tilde p_{ic} / \textstyle\sum_{c'} \tilde p_{ic'}

    Yin et al. (2018), "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
    ICML. With an even k the median is the mean of the two middle values. Fewer than k/2 adversaries
    cannot move any coordinate outside the honest values. If every class has a median of 0 (say three
    one-hot rows on three classes) no class has a majority, and the row is the plain mean. Helps when
    some institutions may be faulty or malicious; costs accuracy when all are honest but diverse.
    """
    return to_aggregate(np.median(inputs.stack, axis=0), inputs.stack)


def trimmed_mean_rule(inputs: RuleInput) -> Aggregate:
    r"""Coordinate-wise trimmed mean: drop the b largest and b smallest values, average the rest.

    .. math:: b = \lfloor \beta k \rfloor, \qquad
              \tilde p_{ic} = \frac{1}{k - 2b} \sum_{r=b+1}^{k-b} q_{(r)ic}, \qquad
              p_{ic} = \tilde p_{ic} / \textstyle\sum_{c'} \tilde p_{ic'}

    where :math:`q_{(1)ic} \le \dots \le q_{(k)ic}` are the institutions' values sorted per coordinate
    and β = `trim_fraction` < 1/2, so at least one value is left. Yin et al. (2018), "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML. With k too small to trim (b = 0) it
    equals the mean. Tolerates up to b adversaries; between mean and median in efficiency and robustness.
    """
    stack = inputs.stack  # (k, n, C)
    k = stack.shape[0]
    cut = min(math.floor(inputs.params.trim_fraction * k + 1e-9), (k - 1) // 2)  # 1e-9: 0.3 * 10 is 3
    kept = np.sort(stack, axis=0)[cut:k - cut]  # (k - 2 cut, n, C)
    return to_aggregate(kept.mean(axis=0), stack)
