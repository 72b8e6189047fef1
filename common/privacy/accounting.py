"""Privacy accounting: turn a history of mechanism applications into (epsilon, delta) with dp-accounting.

A privacy history is a list of JSON-able dicts, one per mechanism application, so it can be persisted
in an institution's ledger and put into signed audit records:

    {"mechanism": "dp-sgd", "noise_multiplier": z, "sample_rate": q, "steps": n}
        n steps of DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): each step
        samples every record with probability q, clips each per-example gradient to L2 norm C and adds
        N(0, (z C)^2) to their sum. Adding or removing one record changes the sum by at most C in L2,
        so each step is a Poisson-subsampled Gaussian mechanism with noise multiplier z;
        dp-accounting event SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), n).

    {"mechanism": "gnmax", "sigma": s, "l2_sensitivity": d, "queries": m}
        m releases of a vote histogram plus N(0, s^2) noise per count, whose L2 sensitivity to one
        record is d (sqrt(2) for disjoint shards: one vote moves; see common.privacy.pate), i.e. a
        Gaussian mechanism with noise multiplier s / d (PATE GNMax, Papernot et al. 2018, "Scalable
        Private Learning with PATE", data-independent analysis);
        dp-accounting event SelfComposedDpEvent(GaussianDpEvent(s / d), m).

    {"mechanism": "gaussian", "noise_multiplier": z, "releases": k}
        k releases of counts of the private records (num-examples, or the per-class histogram) plus
        N(0, z^2) noise per count. Adding or removing one record changes one count by 1, so the L2
        sensitivity is 1 and each release is a Gaussian mechanism with noise multiplier z;
        dp-accounting event SelfComposedDpEvent(GaussianDpEvent(z), k).

All events are composed with dp-accounting's Renyi-DP accountant (Mironov 2017) under the
add-or-remove-one neighbouring relation, and converted to epsilon at the caller's delta. No RDP formula
is written here by hand.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting import rdp

from common.errors import ConfigError

ACCOUNTANT = "rdp"
"""The accounting method, as named in reports: Renyi DP (dp-accounting RdpAccountant), optimal order."""

ORDERS: tuple[float, ...] = tuple(
    sorted(
        set(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
        | {1.01, 1.05, 1.25, 1.5, 1.75}
        | set(float(order) for order in range(64, 128, 8))
        | {160.0, 192.0, 384.0, 768.0, 2048.0}
    )
)
"""Renyi orders the accountant tries: dp-accounting's defaults (1.1..1024) widened at both ends."""

_FIELDS: dict[str, tuple[str, ...]] = {
    "dp-sgd": ("mechanism", "noise_multiplier", "sample_rate", "steps"),
    "gnmax": ("mechanism", "sigma", "l2_sensitivity", "queries"),
    "gaussian": ("mechanism", "noise_multiplier", "releases"),
}
_REPEATS = {"dp-sgd": "steps", "gnmax": "queries", "gaussian": "releases"}  # the field that counts applications

_MAX_NOISE = 1e6
_MIN_NOISE = 1e-3
_REL_TOL = 1e-4


def check_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of one history entry, with plain Python int/float/str values (JSON-able).

    Raises ConfigError naming the entry, the bad field and its value.
    """
    if not isinstance(entry, Mapping):
        raise ConfigError(f"privacy history entry must be a dict, got {type(entry).__name__}: {entry!r}")
    mechanism = entry.get("mechanism")
    if mechanism not in _FIELDS:
        raise ConfigError(
            f"privacy history entry {dict(entry)!r}: unknown mechanism {mechanism!r}; "
            f"expected one of {sorted(_FIELDS)}"
        )
    expected = set(_FIELDS[mechanism])
    if set(entry) != expected:
        raise ConfigError(
            f"privacy history entry {dict(entry)!r}: {mechanism} needs exactly the fields "
            f"{sorted(expected)}; missing {sorted(expected - set(entry))}, unknown {sorted(set(entry) - expected)}"
        )
    if mechanism == "dp-sgd":
        return {
            "mechanism": "dp-sgd",
            "noise_multiplier": _positive(entry, "noise_multiplier"),
            "sample_rate": _rate(entry, "sample_rate"),
            "steps": _count(entry, "steps"),
        }
    if mechanism == "gaussian":
        return {
            "mechanism": "gaussian",
            "noise_multiplier": _positive(entry, "noise_multiplier"),
            "releases": _count(entry, "releases"),
        }
    return {
        "mechanism": "gnmax",
        "sigma": _positive(entry, "sigma"),
        "l2_sensitivity": _positive(entry, "l2_sensitivity"),
        "queries": _count(entry, "queries"),
    }


def dp_event(entry: Mapping[str, Any]) -> dp_accounting.DpEvent:
    """The dp-accounting event of one history entry (see the module docstring for the mapping)."""
    clean = check_entry(entry)
    if clean["mechanism"] == "dp-sgd":
        step = dp_accounting.PoissonSampledDpEvent(
            clean["sample_rate"], dp_accounting.GaussianDpEvent(clean["noise_multiplier"])
        )
        return dp_accounting.SelfComposedDpEvent(step, clean["steps"])
    if clean["mechanism"] == "gaussian":
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(clean["noise_multiplier"]), clean["releases"])
    query = dp_accounting.GaussianDpEvent(clean["sigma"] / clean["l2_sensitivity"])
    return dp_accounting.SelfComposedDpEvent(query, clean["queries"])


def epsilon(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """Epsilon of the composition of every entry of `history`, at `delta` (0.0 for an empty history).

    Composed with dp_accounting.rdp.RdpAccountant over ORDERS; the result is the best order's bound.
    """
    check_delta(delta)
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
        raise ConfigError(f"privacy history must be a list of entries, got {type(history).__name__}")
    if not history:
        return 0.0
    accountant = rdp.RdpAccountant(list(ORDERS))
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    # dp-accounting logs each fractional order whose series does not converge and leaves it out of the
    # minimum (the bound stays valid); calibration probes many such noise values, so keep the log quiet.
    absl_logger.setLevel(logging.ERROR)
    try:
        for entry in _merged(history):
            accountant.compose(dp_event(entry))
        return float(accountant.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def check_delta(delta: float) -> None:
    """Raise ConfigError unless 0 < delta < 1."""
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < float(delta) < 1.0:
        raise ConfigError(f"delta must be a number in (0, 1), got {delta!r}; typical values are 1e-5 or 1/n")


def _merged(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Entries with identical parameters folded into one with summed steps/queries.

    RDP composes additively, so this is exact; it keeps a long ledger (one entry per round) fast.
    """
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entry in history:
        clean = check_entry(entry)
        count = _REPEATS[clean["mechanism"]]
        key = tuple((field, value) for field, value in clean.items() if field != count)
        if key in merged:
            merged[key][count] += clean[count]
        else:
            merged[key] = clean
    return list(merged.values())


def calibrate_dpsgd(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, also: Sequence[Mapping[str, Any]] = ()
) -> float:
    """Smallest DP-SGD noise multiplier (to relative 1e-4, rounded up) whose epsilon is <= target.

    The returned multiplier z satisfies epsilon([dp-sgd z, q, steps] + also, delta) <= target_epsilon:
    `also` are the other releases the budget must pay for (noised counts).
    """
    _check_target(target_epsilon)
    others = [check_entry(e) for e in also]

    def spent(noise: float) -> float:
        entry = {"mechanism": "dp-sgd", "noise_multiplier": noise, "sample_rate": sample_rate, "steps": steps}
        return epsilon([entry, *others], delta)

    check_delta(delta)
    check_entry({"mechanism": "dp-sgd", "noise_multiplier": 1.0, "sample_rate": sample_rate, "steps": steps})
    what = f"DP-SGD (sample-rate {sample_rate}, {steps} steps, delta {delta}{_with(others, delta)})"
    return _smallest_noise(spent, target_epsilon, what)


def calibrate_gnmax(
    target_epsilon: float, delta: float, queries: int, l2_sensitivity: float = math.sqrt(2),
    also: Sequence[Mapping[str, Any]] = (),
) -> float:
    """Smallest GNMax noise std sigma (to relative 1e-4, rounded up) whose epsilon is <= target.

    The returned sigma satisfies epsilon([gnmax sigma, l2_sensitivity, queries] + also, delta) <= target_epsilon.
    """
    _check_target(target_epsilon)
    others = [check_entry(e) for e in also]

    def spent(sigma: float) -> float:
        entry = {"mechanism": "gnmax", "sigma": sigma, "l2_sensitivity": l2_sensitivity, "queries": queries}
        return epsilon([entry, *others], delta)

    check_delta(delta)
    check_entry({"mechanism": "gnmax", "sigma": 1.0, "l2_sensitivity": l2_sensitivity, "queries": queries})
    what = f"GNMax ({queries} queries, L2 sensitivity {l2_sensitivity}, delta {delta}{_with(others, delta)})"
    return _smallest_noise(spent, target_epsilon, what, start=float(l2_sensitivity))


def _smallest_noise(spent: Callable[[float], float], target: float, what: str, start: float = 1.0) -> float:
    """Bisection for the smallest noise with spent(noise) <= target; spent is decreasing in noise.

    The search brackets the answer by doubling or halving from `start`, within [start * 1e-3, start * 1e6].
    """
    high = start
    while spent(high) > target:
        if high >= start * _MAX_NOISE:
            raise ConfigError(
                f"target epsilon {target} is out of reach for {what}: even noise {high:g} spends "
                f"{spent(high):.4g}; raise the target epsilon, or lower the number of steps/queries "
                "or the sample rate"
            )
        high *= 2.0
    low = high / 2.0
    if high == start:  # the starting noise already meets the target: search downwards
        while low > start * _MIN_NOISE and spent(low) <= target:
            high, low = low, low / 2.0
        if spent(low) <= target:
            return low
    while (high - low) > _REL_TOL * high:
        middle = 0.5 * (low + high)
        if spent(middle) <= target:
            high = middle
        else:
            low = middle
    return high


def _with(others: list[dict[str, Any]], delta: float) -> str:
    """What else the budget pays for, as a calibration error names it."""
    return f", plus noised counts costing epsilon {epsilon(others, delta):.3g} alone" if others else ""


def _check_target(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0.0 < float(target) < math.inf:
        raise ConfigError(f"target epsilon must be a finite number > 0, got {target!r}")


def _positive(entry: Mapping[str, Any], field: str) -> float:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < math.inf:
        raise ConfigError(f"privacy history entry {dict(entry)!r}: {field} must be a finite number > 0, got {value!r}")
    return float(value)


def _rate(entry: Mapping[str, Any], field: str) -> float:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"privacy history entry {dict(entry)!r}: {field} must be a number in (0, 1], got {value!r}")
    return float(value)


def _count(entry: Mapping[str, Any], field: str) -> int:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ConfigError(f"privacy history entry {dict(entry)!r}: {field} must be an integer >= 1, got {value!r}")
    return int(value)
