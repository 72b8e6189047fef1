"""Aggregation rules: many institutions' soft labels on the same public samples -> one ensemble target.

Plain numpy, independent of Flower. Two ways in, one result: `aggregate` (batch.py) takes every
institution's `(n, C)` rows at once, stacks them into `(k, n, C)` float64 (each row renormalised) and
hands them to the named rule; `running_aggregate` (streaming.py) folds one institution's rows at a time,
as the server receives them, into running sums, and holds rows only for the rules that need every one.
Both return an `Aggregate`: `(n, C)` float32 rows on the simplex and a `(n,)` keep mask.

    averaging.py  mean, weighted, confidence, era, expertise, balanced-expertise, inferred-expertise
    robust.py     median, trimmed-mean
    filtering.py  selective

`mean` and `weighted` are linear in each institution's rows, so a secure-aggregation protocol can
compute them from masked sums; every other rule needs each institution's rows in the clear
(`NEEDS_INDIVIDUAL_ROWS`). Rules in `NEEDS_CLASS_COUNTS` also need each institution's per-class
sample counts, which the query must ask for. Rules in `WEIGHTED_RULES` weigh institutions by the sizes
they declare; `aggregate` caps those first (weights.py: `weight-clip` times the lower median, and each
institution's agreed `max-examples`), so no reply can dominate by declaring a huge size.
"""

from __future__ import annotations

from common.aggregation.base import Aggregate, AggregationParams, Rule, RuleInput
from common.aggregation.batch import NEEDS_CLASS_COUNTS, NEEDS_INDIVIDUAL_ROWS, RULES, WEIGHTED_RULES, aggregate
from common.aggregation.streaming import HeldRows, RunningAggregate, RunningSum, running_aggregate
from common.aggregation.weights import ClippedWeight, clip_weights

__all__ = [
    "Aggregate", "AggregationParams", "ClippedWeight", "HeldRows", "NEEDS_CLASS_COUNTS", "NEEDS_INDIVIDUAL_ROWS", "RULES",
    "Rule", "RuleInput", "RunningAggregate", "RunningSum", "WEIGHTED_RULES", "aggregate", "clip_weights",
    "running_aggregate",
]
