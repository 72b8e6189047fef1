"""Averaging rules: the ensemble target is a (weighted, possibly sharpened) mean of the institutions' rows.

Notation for every rule: institution j = 1..k gives row :math:`q_{ji}` (on the simplex over C classes)
for public sample i = 1..n; the rule returns :math:`p_i`. Each result is clipped at 0 and renormalised
by `to_aggregate`, in float64, and returned as float32.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from common.aggregation.base import Aggregate, RuleInput, entropy, to_aggregate
from common.errors import ConfigError


def mean_rule(inputs: RuleInput) -> Aggregate:
    r"""Unweighted mean of the institutions' probabilities.

    .. math:: p_i = \frac{1}{k} \sum_{j=1}^{k} q_{ji}

    The ensemble average of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network",
    as used by federated distillation (Jeong et al., 2018, FD) and as FedMD's consensus (Li & Wang,
    2019). A mean of points on the simplex lies on the simplex. Linear, so secure aggregation can
    compute it from masked sums. Helps when teachers are comparably good: the default, and the baseline.
    """
    return to_aggregate(inputs.stack.mean(axis=0), inputs.stack)


def weighted_rule(inputs: RuleInput) -> Aggregate:
    r"""Mean weighted by the size of each institution's private partition.

    .. math:: p_i = \sum_{j=1}^{k} \frac{m_j}{\sum_{j'} m_{j'}} q_{ji}

    with :math:`m_j` = `num_examples[j]`: FedAvg's weighting (McMahan et al., 2017, "Communication-
    Efficient Learning of Deep Networks from Decentralized Data") carried from weights to soft labels.
    If every :math:`m_j` is 0 the weights are equal. Linear, like the mean. Helps when partition sizes
    differ a lot and a bigger partition makes a better teacher.
    """
    total = inputs.num_examples.sum()
    k = inputs.stack.shape[0]
    weights = inputs.num_examples / total if total > 0 else np.full(k, 1.0 / k)  # (k,)
    return to_aggregate(np.tensordot(weights, inputs.stack, axes=1), inputs.stack)


def confidence_rule(inputs: RuleInput) -> Aggregate:
    r"""Per-sample mean weighted by each teacher's confidence, measured by its entropy.

    .. math::
        w_{ji} = \log C - H(q_{ji}) = \mathrm{KL}(q_{ji} \,\|\, u), \qquad
        p_i = \sum_j \frac{w_{ji}}{\sum_{j'} w_{j'i}} q_{ji}

    with :math:`H(q) = -\sum_c q_c \log q_c` and u the uniform row: a one-hot teacher weighs
    :math:`\log C`, a uniform one 0. If every teacher is uniform on sample i (all weights 0) the row is
    the plain mean. Entropy-based confidence weighting of ensemble members is a common heuristic in
    (federated) distillation (see e.g. the uncertainty-weighted averaging compared by Kovalchuk et al.,
    2025, arXiv:2509.15147, which measures uncertainty differently); this exact weight is fedstill's
    choice. Helps under label skew, where a teacher unsure about a sample of a class it never saw
    should count less. Overconfident (badly calibrated) teachers are trusted more than they deserve.
    """
    stack = inputs.stack  # (k, n, C)
    weights = confidence_weights(stack)  # (k, n)
    totals = weights.sum(axis=0)  # (n,)
    uniform = ~(totals > 0)
    weights[:, uniform] = 1.0
    weights /= weights.sum(axis=0, keepdims=True)
    return to_aggregate(np.einsum("jn,jnc->nc", weights, stack), stack)


def confidence_weights(probs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each row's confidence, log C - H(q) >= 0, along the last axis: `(..., C)` -> `(...)`."""
    weights: npt.NDArray[np.float64] = np.clip(math.log(probs.shape[-1]) - entropy(probs), 0.0, None)
    return weights


def era_rule(inputs: RuleInput) -> Aggregate:
    r"""Entropy reduction aggregation (ERA) of DS-FL: sharpen the mean with a low temperature.

    .. math:: p_i = \operatorname{softmax}\Big(\frac{1}{T} \cdot \frac{1}{k} \sum_{j} q_{ji}\Big),
              \qquad \operatorname{softmax}(z)_c = \frac{e^{z_c}}{\sum_{c'} e^{z_{c'}}}

    with T = `era_temperature` (the softmax is applied to the averaged probabilities, as in the paper).
    Itahara et al. (2021), "Distillation-Based Semi-Supervised Federated Learning for Communication-
    Efficient Collaborative Training With Non-IID Private Data", IEEE TMC. T < 1 lowers the entropy of
    the target; T > 1 flattens it. Helps under non-IID data, where the plain mean of disagreeing
    teachers is too flat to teach the student a decision.
    """
    return to_aggregate(sharpened(inputs.stack.mean(axis=0), inputs.params.era_temperature), inputs.stack)


def sharpened(mean: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    """ERA's target before renormalising: exp(mean / T), shifted for stability; `mean` `(n, C)` on the simplex."""
    logits = mean / temperature  # (n, C), in [0, 1/T]
    logits -= logits.max(axis=1, keepdims=True)
    raw: npt.NDArray[np.float64] = np.exp(logits)
    return raw


def expertise_rule(inputs: RuleInput) -> Aggregate:
    r"""Per-class expertise weighting: on class c, trust each institution in proportion to its samples of c.

    .. math::
        w_{jc} = \frac{n_{jc}}{\sum_{j'} n_{j'c}}, \qquad
        \tilde p_{ic} = \sum_j w_{jc}\, q_{jic}, \qquad
        p_{ic} = \frac{\tilde p_{ic}}{\sum_{c'} \tilde p_{ic'}}

    with :math:`n_{jc}` = `class_counts[j][c]`, institution j's private samples of class c, reported
    as counts only (they reveal each label distribution, nothing per sample). A class nobody holds
    gets equal weights 1/k. Each class has its own convex combination, so the row no longer sums to
    1 and is renormalised; a row left with no mass (every expert puts 0 on its own class) falls back
    to the plain mean. fedstill's formulation of class-count expert weighting. Helps under strong
    label skew: the probability of class c comes mostly from the institutions that have seen c.
    """
    if inputs.class_counts is None:
        raise ConfigError(
            "aggregation 'expertise' needs every institution's class counts; "
            "ask for them in the query (want_class_counts) and pass them to aggregate()"
        )
    counts = inputs.class_counts  # (k, C)
    totals = counts.sum(axis=0)  # (C,)
    held = totals > 0
    weights = np.full(counts.shape, 1.0 / counts.shape[0])  # (k, C)
    weights[:, held] = counts[:, held] / totals[held]
    return to_aggregate(np.einsum("jc,jnc->nc", weights, inputs.stack), inputs.stack)


def balanced_expertise_rule(inputs: RuleInput) -> Aggregate:
    r"""Expertise weighting of prior-corrected teachers: each institution's rows are first turned into
    what its teacher would say under a uniform class prior, over the classes it holds, then combined
    per class as in `expertise`.

    .. math::
        \pi_{jc} = \frac{n_{jc}}{\sum_{c'} n_{jc'}}, \qquad
        r_{jic} = \frac{[n_{jc} > 0]\; q_{jic}\, \pi_{jc}^{-1/T}}{\sum_{c'} [n_{jc'} > 0]\; q_{jic'}\, \pi_{jc'}^{-1/T}}, \qquad
        \tilde p_{ic} = \sum_j w_{jc}\, r_{jic}, \qquad w_{jc} = \frac{n_{jc}}{\sum_{j'} n_{j'c}}

    with T the temperature the soft labels were made at. A teacher trained on a skewed label
    distribution has its logits shifted by :math:`\log \pi_{jc}`; subtracting that shift is the logit
    adjustment of Menon et al. (2021), "Long-tail learning via logit adjustment", ICLR, as FedLC
    (Zhang et al., 2022, ICML) applies it to label skew in federated learning. At temperature T the
    shift is :math:`\log \pi_{jc} / T` on the log-probabilities, hence the power :math:`-1/T`. Classes an
    institution never saw carry no evidence from it (its weight there is 0 anyway) and are dropped
    before renormalising, so its prior-corrected mass stays on what it knows. A row left with no mass
    on the classes it holds becomes uniform over them. Like `expertise`, it needs the class counts
    (counts only) and helps most under strong label skew, where one institution's teacher calls nearly
    everything one of its few classes.
    """
    if inputs.class_counts is None:
        raise ConfigError(
            "aggregation 'balanced-expertise' needs every institution's class counts; "
            "ask for them in the query (want_class_counts) and pass them to aggregate()"
        )
    corrected = prior_corrected(inputs.stack, inputs.class_counts, inputs.params.temperature)
    return expertise_rule(RuleInput(corrected, inputs.num_examples, inputs.class_counts, inputs.params))


def inferred_expertise_rule(inputs: RuleInput) -> Aggregate:
    r"""`balanced-expertise` with each institution's class counts inferred from its own rows: no counts asked for.

    .. math::
        \hat n_{jc} = \sum_{i=1}^{n} q_{jic}

    the mass institution j's teacher puts on class c over this round's n public samples (with the `vote`
    codec: how many of them it calls c), used as :math:`n_{jc}` in `balanced-expertise`: its prior
    :math:`\hat\pi_{jc} = \hat n_{jc} / n` is divided out of its rows at the soft labels' temperature, and
    class c is weighed by :math:`w_{jc} = \hat n_{jc} / \sum_{j'} \hat n_{j'c}`. A teacher trained on a
    skewed label distribution calls more public samples by the classes it saw more (the public set is
    the same for everyone), so its predicted class mix stands in for its private one, the idea behind
    estimating a classifier's label prior from its predictions on other data (Saerens et al., 2002,
    "Adjusting the Outputs of a Classifier to New a Priori Probabilities", Neural Computation). The
    estimate is flatter than the true prior (soft labels at T > 1 spread mass onto unseen classes), so
    the correction is milder than with declared counts. fedstill's rule.

    Nothing beyond the soft labels is asked for or released (a post-processing of them, so also under
    a privacy mechanism), and nothing declared can be inflated: every institution's inferred counts sum
    to n, so on class c one institution weighs at most :math:`n / (n + \sum_{j' \ne j} \hat n_{j'c})`.
    Needs each institution's rows (no secure aggregation).
    """
    counts = inferred_counts(inputs.stack)
    corrected = prior_corrected(inputs.stack, counts, inputs.params.temperature)
    return expertise_rule(RuleInput(corrected, inputs.num_examples, counts, inputs.params))


def inferred_counts(stack: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """`inferred-expertise`'s class counts: each institution's rows `(k, n, C)` summed over the samples, `(k, C)`."""
    counts: npt.NDArray[np.float64] = stack.sum(axis=1)
    return counts


def prior_corrected(stack: npt.NDArray[np.float64], counts: npt.NDArray[np.float64],
                    temperature: float) -> npt.NDArray[np.float64]:
    """`balanced-expertise`'s r: each institution's rows `(k, n, C)` under a uniform prior over the classes it holds
    (`counts` `(k, C)`); institution by institution, so the server can correct each reply as it arrives."""
    held = counts > 0  # (k, C)
    sizes = counts.sum(axis=1, keepdims=True)  # (k, 1)
    prior = np.divide(counts, sizes, out=np.ones_like(counts), where=sizes > 0)
    # in logs, so that a tiny prior (an inferred count of 1e-300, a low temperature) cannot overflow its power:
    # log r = log q - log(pi) / T, -inf where q = 0 or the class is not held, then a softmax over each row
    shift = np.where(held, np.log(np.where(held, prior, 1.0)) / temperature, np.inf)  # (k, C)
    with np.errstate(divide="ignore"):
        logits = np.log(stack) - shift[:, None, :]  # (k, n, C)
    top = logits.max(axis=2, keepdims=True)  # -inf for a row without mass on the classes it holds
    some = np.isfinite(top)
    corrected = np.exp(logits - np.where(some, top, 0.0))
    uniform = held / np.maximum(held.sum(axis=1, keepdims=True), 1)  # (k, C)
    corrected = np.where(some, corrected / corrected.sum(axis=2, keepdims=True).clip(min=1.0),  # >= 1: the top is e^0
                         np.broadcast_to(uniform[:, None, :], corrected.shape))
    rows_without_counts = ~held.any(axis=1)  # an institution that reported no samples at all: keep its rows
    corrected[rows_without_counts] = stack[rows_without_counts]
    return corrected
