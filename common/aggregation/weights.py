r"""Weight clipping: no institution's declared sample count may outweigh the others beyond an agreed multiple.

`weighted`, `expertise` and `balanced-expertise` weigh each institution by counts it declares itself
(`num-examples`, per-class counts). Nothing on the server can verify them, so one reply declaring 2^52
examples would own the ensemble. Before those rules run, each institution j's declared size
:math:`m_j` is capped at

.. math:: \mathrm{cap} = M \cdot \mathrm{lowmed}(m_1, \dots, m_k), \qquad
          f_j = \min\Big(1, \frac{\mathrm{cap}}{m_j}\Big), \qquad m'_j = f_j m_j, \quad n'_{jc} = f_j n_{jc}

with M = `weight-clip` and lowmed the lower median (the :math:`\lceil k/2 \rceil`-th smallest value), which
a minority of liars cannot move beyond the honest values around it: with k = 3 and one liar it is an
honest size. The per-class counts of an institution are scaled by its own factor :math:`f_j`, never
clipped class by class: under label skew one institution holding most of a class is the point of
`expertise`, and a per-class median would cut exactly that expert; scaling keeps each institution's
declared class distribution and bounds its total. A clipped institution keeps at most
:math:`M \cdot \mathrm{lowmed}` examples' weight, so its share of any weighted mean is at most
:math:`M \cdot \mathrm{lowmed} / (M \cdot \mathrm{lowmed} + \sum_{j' \ne j} m'_{j'})`. In the spirit of
norm-bounding a client's update (Sun et al., 2019, "Can You Really Backdoor Federated Learning?") and
of the median as a robust reference (Yin et al., 2018). A federation whose sizes all lie within M times
the lower median is not changed at all: the rule gets the declared counts, bit for bit.

The consortium may also agree each institution's largest size out of band (`max-examples` in the
coordinator's allow-list): then :math:`\mathrm{cap}_j = \min(\text{max-examples}_j, M \cdot \mathrm{lowmed})`,
which bounds every share by what was agreed, also for k = 2 where no median resists a liar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.errors import ConfigError


@dataclass(frozen=True)
class ClippedWeight:
    """One institution whose declared size exceeded its cap: what it declared, what the rule used, and why."""

    index: int  # position among the aggregated replies
    declared: float  # its declared size (num-examples, or the sum of its class counts if larger)
    used: float  # the size the rule weighed it by: its cap
    check: str  # "weight-cap" (the allow-list's max-examples) or "weight-clip" (M times the lower median)


def clip_weights(
    num_examples: npt.NDArray[np.float64],
    class_counts: npt.NDArray[np.float64] | None,
    multiple: float,
    caps: npt.NDArray[np.float64] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None, tuple[ClippedWeight, ...]]:
    """Cap each institution's size at `multiple` times the lower median of the declared sizes, and at its own
    agreed cap (`caps` `(k,)`, inf where none was agreed).

    `num_examples` `(k,)` and `class_counts` `(k, C)` (or None), both >= 0. Returns the sizes and class
    counts to use (the inputs themselves when nothing is clipped) and one `ClippedWeight` per clipped
    institution. `multiple` 0 turns the median clip off; otherwise it must be >= 1 (below 1 even the
    median institution would be cut). A lower median of 0 gives no reference: the median clip is skipped.
    """
    if not (math.isfinite(multiple) and (multiple == 0 or multiple >= 1)):
        raise ConfigError(f"weight-clip must be 0 (off) or a finite multiple >= 1 of the median size, got {multiple}")
    k = num_examples.size
    agreed = np.full(k, np.inf) if caps is None else np.asarray(caps, dtype=np.float64)
    if agreed.shape != (k,) or np.isnan(agreed).any() or (agreed < 0).any():
        raise ConfigError(f"weight caps: expected one cap >= 0 (or inf) per institution, shape ({k},), got {agreed!r}")
    if k == 0:
        return num_examples, class_counts, ()
    declared = num_examples if class_counts is None else np.maximum(num_examples, class_counts.sum(axis=1))  # (k,)
    median_cap = multiple * float(np.sort(declared)[(k - 1) // 2])
    clip = median_cap if median_cap > 0 else np.inf
    cap = np.minimum(agreed, clip)  # (k,)
    over = declared > cap
    if not over.any():
        return num_examples, class_counts, ()
    factor = np.where(over, cap / np.where(over, declared, 1.0), 1.0)  # (k,) in [0, 1]
    used = num_examples * factor
    counts = None if class_counts is None else class_counts * factor[:, None]
    clipped = tuple(ClippedWeight(int(j), float(declared[j]), float(cap[j]),
                                  "weight-cap" if agreed[j] <= clip else "weight-clip") for j in np.flatnonzero(over))
    return used, counts, clipped
