"""The distillation loss (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network")."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float,
    *,
    labels: torch.Tensor | None = None,
    labelled: torch.Tensor | None = None,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    r"""Soft-target KL divergence at temperature T, optionally mixed with cross-entropy.

    .. math::

        L = (1 - \alpha)\, T^2\, \frac{1}{B}\sum_{i} \mathrm{KL}\big(q_i \,\|\, \mathrm{softmax}(z_i / T)\big)
            + \alpha\, \frac{1}{|S|}\sum_{i \in S} \mathrm{CE}\big(\mathrm{softmax}(z_i), y_i\big)

    where `z` are the student's logits, `q` the aggregated teacher probabilities (already computed at
    temperature T by the teachers), `alpha = ce_weight` and `S` the labelled rows of the batch.
    The T^2 factor keeps the gradient scale of the soft term independent of T (Hinton et al., 2015,
    section 2). Without labelled rows in the batch the CE term is dropped and the KL term keeps its
    (1 - alpha) weight.

    student_logits  # (B, C)
    target_probs    # (B, C) rows on the simplex
    labels          # (B,) int64, read only where `labelled` is True
    labelled        # (B,) bool
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(log_student, target_probs, reduction="batchmean") * temperature**2
    if ce_weight == 0.0 or labels is None or labelled is None or not bool(labelled.any()):
        return (1.0 - ce_weight) * kl
    ce = F.cross_entropy(student_logits[labelled], labels[labelled])
    return (1.0 - ce_weight) * kl + ce_weight * ce
