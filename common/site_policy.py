"""An institution's site policy (`site-policy.toml`): what its node releases and does, whatever a query asks.

The policy is the institution's own file, read by its node; the coordinator never sets it. A node
without a file keeps the defaults below, which answer an honest run as before, except that under a
privacy mechanism nothing else leaves in the clear and a node with a budget answers only under a
mechanism. Every refusal raises `PolicyViolation`, whose message starts with the policy line that
refused (`site-policy: mechanisms = ["dp-sgd"] refuses privacy "none"; ...`) and travels to the
coordinator, which records it in its ledger (check `site-policy`).

    key                    default                       what
    mechanisms             every one                     privacy values this node runs ("none", "dp-sgd", "pate")
    max-epsilon, delta     node config / site.toml       the budget; the smaller of this and the node config's wins
    counts                 exact; "rounded" under DP      how num-examples (and class counts) leave: exact, rounded
                                                         (up, to a multiple of count-multiple), noised (Gaussian
                                                         noise of std count-noise, once per run, accounted in
                                                         the budget) or withheld (sent as 1)
    count-multiple         100                           the rounding of `counts = "rounded"`
    count-noise            10                            the noise std of `counts = "noised"` (L2 sensitivity 1)
    class-counts           true; false under DP unless    whether per-class counts may leave (exact, or noised
                           counts = "noised"              with `counts = "noised"`)
    training-loss          true; false under DP          whether the loss on private batches leaves (else NaN)
    teacher-accuracy       true; false under PATE        whether the teacher's accuracy on the public test set
                                                         leaves (else -1); under DP-SGD it is post-processing
                                                         of the DP teacher, under PATE the sub-teachers are not DP
    digest                 true                          whether FedMD digest instructions are followed
    max-digest-epochs      no limit                      most epochs of a digest step (public data)
    max-revisit-epochs     no limit; 0 under DP          most epochs of a revisit (private data, no DP)
    max-queries-per-round  no limit                      most soft-label queries answered per run and round
    max-samples-per-query  no limit                      most public samples labelled per query
    min-secagg-threshold   more than half the roster, >= 3  the least secure-aggregation threshold accepted; a
                                                         value only raises the floor, never below a majority
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError, PolicyViolation
from common.secagg.protocol import MIN_PARTIES, majority_threshold

POLICY_FILE = "site-policy.toml"
MECHANISMS = ("none", "dp-sgd", "pate")
COUNT_MODES = ("exact", "rounded", "noised", "withheld")
WITHHELD_COUNT = 1  # what num-examples says when counts are withheld: the same for every institution


@dataclass(frozen=True)
class SitePolicy:
    """The typed site policy; field `foo_bar` is key `foo-bar`; None means the default of the module docstring."""

    mechanisms: tuple[str, ...] | None = None
    max_epsilon: float | None = None
    delta: float | None = None
    counts: str | None = None
    count_multiple: int = 100
    count_noise: float = 10.0
    class_counts: bool | None = None
    training_loss: bool | None = None
    teacher_accuracy: bool | None = None
    digest: bool = True
    max_digest_epochs: int | None = None
    max_revisit_epochs: int | None = None
    max_queries_per_round: int | None = None
    max_samples_per_query: int | None = None
    min_secagg_threshold: int | None = None
    written: frozenset[str] = field(default=frozenset(), compare=False)  # the keys the institution's file set

    @classmethod
    def from_toml(cls, text: str) -> SitePolicy:
        """Parse the policy file's text; a ConfigError names every bad key, its value and the fix."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"site-policy: the policy file is not valid TOML ({error}); fix site-policy.toml, or remove it "
                              "to keep the defaults") from None
        return cls.from_mapping(raw)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SitePolicy:
        values: dict[str, Any] = {}
        problems = [f"unknown key {key!r} (known: {', '.join(_PARSERS)})" for key in raw if key not in _PARSERS]
        for key, value in raw.items():
            if key in _PARSERS:
                parsed, problem = _PARSERS[key](value)
                if problem:
                    problems.append(f"{key} {problem}, got {value!r}")
                values[key.replace("-", "_")] = parsed
        if values.get("mechanisms") == ("none",) and values.get("max_epsilon") is not None:
            problems.append("mechanisms = [\"none\"] with a max-epsilon: a budget needs a mechanism that spends it")
        if problems:
            raise ConfigError("site-policy: " + "; ".join(problems) + "; fix site-policy.toml")
        return cls(**values, written=frozenset(raw))

    # --- what the node runs ----------------------------------------------------------------------------

    def check_mechanism(self, privacy: str, budget: float | None) -> None:
        """Refuse a mechanism the policy does not list, and any run without one on a node with a budget."""
        if self.mechanisms is not None and privacy not in self.mechanisms:
            raise PolicyViolation(f"{self.line('mechanisms')} refuses privacy {json.dumps(privacy)}; this "
                                  f"institution answers only runs with privacy one of {list(self.mechanisms)}")
        if privacy == "none" and budget is not None:
            raise PolicyViolation(
                f"site-policy: max-epsilon = {budget:g} refuses privacy \"none\": a node with a privacy budget answers "
                "only under a mechanism that spends it; run with privacy = \"dp-sgd\" or \"pate\"")

    def check_query(self, num_samples: int, answered: int, class_counts: bool, privacy: str) -> None:
        """Refuse a soft-label query for more samples, more often or more counts than the policy allows
        (`answered`: queries of this run and round this node already took)."""
        if self.max_samples_per_query is not None and num_samples > self.max_samples_per_query:
            raise PolicyViolation(f"{self.line('max-samples-per-query')} refuses a query for {num_samples} public "
                                  "samples; ask for fewer samples per query")
        if self.max_queries_per_round is not None and answered >= self.max_queries_per_round:
            raise PolicyViolation(f"{self.line('max-queries-per-round')} refuses query {answered + 1} of this round; "
                                  "ask once per round")
        if class_counts and not self.allows_class_counts(privacy):
            raise PolicyViolation(
                f"{self.line('class-counts', False)} refuses per-class counts under privacy {json.dumps(privacy)}; "
                "use an aggregation rule without class counts (mean, weighted), or the institution sets "
                "class-counts = true to release them exactly")

    def check_digest(self, privacy: str, digest_epochs: int, revisit_epochs: int) -> None:
        """Refuse a FedMD digest the policy does not allow; under privacy, any revisit of the private data,
        which would train outside the accounted mechanism."""
        if not self.digest:
            raise PolicyViolation(f"{self.line('digest')} refuses FedMD digest instructions; run without digest-epochs")
        if self.max_digest_epochs is not None and digest_epochs > self.max_digest_epochs:
            raise PolicyViolation(f"{self.line('max-digest-epochs')} refuses digest-epochs {digest_epochs}; "
                                  "send fewer digest epochs")
        if privacy != "none" and revisit_epochs > 0:
            raise PolicyViolation(
                f"site-policy: max-revisit-epochs = 0 (always, under privacy {json.dumps(privacy)}) refuses revisit-epochs "
                f"{revisit_epochs}: a revisit trains on private data outside the accounted mechanism; send revisit-epochs 0")
        if self.max_revisit_epochs is not None and revisit_epochs > self.max_revisit_epochs:
            raise PolicyViolation(f"{self.line('max-revisit-epochs')} refuses revisit-epochs {revisit_epochs}; "
                                  "send fewer revisit epochs")

    def secagg_floor(self, parties: int) -> int:
        """The least secure-aggregation threshold this node accepts for a roster of `parties`: the policy's value,
        and never less than more than half of the roster, nor 3 (common.secagg.protocol.majority_threshold: the
        consistency check needs a majority; with colluding peers, raise it)."""
        return max(self.min_secagg_threshold or 0, majority_threshold(parties))

    def check_threshold(self, threshold: int, parties: int) -> None:
        """Refuse a secure-aggregation round of `parties` institutions whose threshold is below the floor."""
        floor = self.secagg_floor(parties)
        if threshold >= floor:
            return
        if floor == self.min_secagg_threshold:
            line = self.line("min-secagg-threshold")
        else:  # the majority rule sets the floor, whatever the policy says
            written = f"{self.min_secagg_threshold}, raised to " if self.min_secagg_threshold is not None else ""
            line = (f"site-policy: min-secagg-threshold = {written}{floor} (more than half of the {parties} institutions, "
                    f"at least {MIN_PARTIES})")
        raise PolicyViolation(f"{line} refuses a secure-aggregation threshold of {threshold} for {parties} institutions; "
                              f"set secagg-threshold >= {floor}, or 0 (a majority)")

    # --- what a reply releases -------------------------------------------------------------------------

    def count_mode(self, privacy: str) -> str:
        if self.counts is not None:
            return self.counts
        return "exact" if privacy == "none" else "rounded"

    def released_count(self, n: int, privacy: str) -> int:
        """num-examples as it leaves: exact, rounded up to a multiple of count-multiple, or withheld
        (`counts = "noised"` is a release of the mechanism: client.privacy.noised_counts)."""
        mode = self.count_mode(privacy)
        if mode == "noised":
            raise ValueError("counts = \"noised\" are released by client.privacy.noised_counts, which accounts them")
        if mode == "exact":
            return n
        if mode == "withheld":
            return WITHHELD_COUNT
        return max(1, math.ceil(n / self.count_multiple)) * self.count_multiple

    def allows_class_counts(self, privacy: str) -> bool:
        if self.class_counts is not None:
            return self.class_counts
        return privacy == "none" or self.count_mode(privacy) == "noised"

    def sends_training_loss(self, privacy: str) -> bool:
        return self.training_loss if self.training_loss is not None else privacy == "none"

    def sends_teacher_accuracy(self, privacy: str) -> bool:
        return self.teacher_accuracy if self.teacher_accuracy is not None else privacy != "pate"

    def sends_timings(self, privacy: str, *, class_counts: bool) -> bool:
        """Whether a reply carries its compute timings (common.messages.timings): only when num-examples leaves
        exactly, since the seconds of local training scale with the private data's size."""
        return self._count_release(privacy, class_counts) == "exact"

    def _count_release(self, privacy: str, class_counts: bool) -> str:
        """How num-examples leaves: noised, exact (also as the sum of exact class counts), rounded or withheld."""
        mode = self.count_mode(privacy)
        return "noised" if mode == "noised" else "exact" if class_counts else mode

    def releases(self, privacy: str, *, class_counts: bool, teacher_accuracy: bool) -> dict[str, str]:
        """Value by value, what a soft-label reply carries besides the mechanism's output (for the signed
        privacy statement). With class counts, num-examples is their sum."""
        noised = self.count_mode(privacy) == "noised"
        count = self._count_release(privacy, class_counts)
        accounted = "accounted in epsilon" if privacy != "none" else "not accounted: no mechanism"
        noised_text = f"Gaussian noise of std {self.count_noise:g}, released once per run, {accounted}"
        return {
            "num-examples": {"exact": "exact", "withheld": f"withheld (sent as {WITHHELD_COUNT})",
                             "rounded": f"rounded up to a multiple of {self.count_multiple}",
                             "noised": f"sum of the noised class counts ({noised_text})"}[count],
            "class-counts": ("noised: " + noised_text if noised else "exact") if class_counts else "withheld",
            "train-loss": "exact" if self.sends_training_loss(privacy) else "withheld (sent as NaN)",
            "teacher-accuracy": _accuracy_release(privacy) if teacher_accuracy and self.sends_teacher_accuracy(privacy)
            else "withheld (sent as -1)",
            "teacher-params": "public (the model's size)", "teacher-rounds": "public (rounds answered)",
            "timings": ("exact (seconds per phase on the node, attached after the signature)" if count == "exact"
                        else "withheld (training seconds scale with num-examples, which does not leave exactly)"),
        }

    def line(self, key: str, default: object = None) -> str:
        """`site-policy: key = value` as the file says it, or the default this node applied."""
        value = getattr(self, key.replace("-", "_"))
        if value is None:
            value = default
        suffix = "" if key in self.written else " (default)"
        return f"site-policy: {key} = {_toml(value)}{suffix}"


def _accuracy_release(privacy: str) -> str:
    where = "on the public test set"
    return {"none": where, "dp-sgd": where + " (post-processing of the DP-SGD teacher)"}.get(
        privacy, where + " (not covered by the mechanism: allowed by site-policy teacher-accuracy = true)")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _mechanisms(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, list) and value and all(v in MECHANISMS for v in value):
        return tuple(value), None
    return None, f"must be a non-empty list of {list(MECHANISMS)}"


def _choice(options: tuple[str, ...]) -> Any:
    def parse(value: Any) -> tuple[Any, str | None]:
        return (value, None) if value in options else (None, f"must be one of {list(options)}")
    return parse


def _flag(value: Any) -> tuple[Any, str | None]:
    return (value, None) if isinstance(value, bool) else (None, "must be true or false")


def _at_least(least: int) -> Any:
    def parse(value: Any) -> tuple[Any, str | None]:
        if isinstance(value, int) and not isinstance(value, bool) and value >= least:
            return value, None
        return None, f"must be an integer >= {least}"
    return parse


def _epsilon(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value), None
    return None, "must be a finite number > 0"


def _noise(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.1 <= value < math.inf:
        return float(value), None
    return None, "must be a finite number >= 0.1 (the std of the noise on each count)"


def _delta(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, float) and 0 < value < 1:
        return value, None
    return None, "must be a float in (0, 1)"


_PARSERS: dict[str, Any] = {
    "mechanisms": _mechanisms, "max-epsilon": _epsilon, "delta": _delta, "counts": _choice(COUNT_MODES),
    "count-multiple": _at_least(1), "count-noise": _noise, "class-counts": _flag, "training-loss": _flag,
    "teacher-accuracy": _flag, "digest": _flag,
    "max-digest-epochs": _at_least(0), "max-revisit-epochs": _at_least(0), "max-queries-per-round": _at_least(1),
    "max-samples-per-query": _at_least(1), "min-secagg-threshold": _at_least(MIN_PARTIES),
}
POLICY_KEYS: tuple[str, ...] = tuple(_PARSERS)


def value_problem(key: str, value: Any) -> str | None:
    """What is wrong with one key's value (`must be true or false, got 'yes'`), or None when it is valid."""
    if key not in _PARSERS:
        return f"unknown key {key!r} (known: {', '.join(_PARSERS)})"
    problem = _PARSERS[key](value)[1]
    return f"{problem}, got {value!r}" if problem else None
