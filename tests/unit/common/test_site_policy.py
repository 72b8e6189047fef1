"""Unit tests of the site policy (common/site_policy.py): parsing, defaults, each check and what a reply releases."""

from __future__ import annotations

import pytest

from common.errors import ConfigError, PolicyViolation
from common.site_policy import SitePolicy

FULL = """
mechanisms = ["dp-sgd"]
max-epsilon = 4
delta = 1e-6
counts = "withheld"
count-multiple = 50
class-counts = false
training-loss = true
digest = true
max-digest-epochs = 2
max-revisit-epochs = 1
max-queries-per-round = 1
max-samples-per-query = 500
min-secagg-threshold = 3
"""


def test_a_full_policy_file_is_parsed_into_typed_fields() -> None:
    # Execute
    policy = SitePolicy.from_toml(FULL)

    # Assert
    assert policy.mechanisms == ("dp-sgd",) and policy.max_epsilon == 4.0 and policy.delta == 1e-6
    assert (policy.counts, policy.count_multiple, policy.class_counts, policy.training_loss) == ("withheld", 50, False, True)
    assert (policy.max_digest_epochs, policy.max_revisit_epochs) == (2, 1)
    assert (policy.max_queries_per_round, policy.max_samples_per_query, policy.min_secagg_threshold) == (1, 500, 3)
    assert policy.line("mechanisms") == 'site-policy: mechanisms = ["dp-sgd"]'


@pytest.mark.parametrize(("text", "message"), [
    ('mechanisms = ["laplace"]', r"mechanisms must be a non-empty list of \['none', 'dp-sgd', 'pate'\], got \['laplace'\]"),
    ("mechanisms = []", "mechanisms must be a non-empty list"),
    ("max-epsilon = 0", "max-epsilon must be a finite number > 0, got 0"),
    ("max-epsilon = inf", "max-epsilon must be a finite number > 0, got inf"),
    ("delta = 1", "delta must be a float in \\(0, 1\\), got 1"),
    ('counts = "approx"', r"counts must be one of \['exact', 'rounded', 'noised', 'withheld'\], got 'approx'"),
    ("count-multiple = 0", "count-multiple must be an integer >= 1, got 0"),
    ('class-counts = "yes"', "class-counts must be true or false, got 'yes'"),
    ("max-queries-per-round = 0", "max-queries-per-round must be an integer >= 1, got 0"),
    ("min-secagg-threshold = 1", "min-secagg-threshold must be an integer >= 3, got 1"),
    ("min-secagg-threshold = 2", "min-secagg-threshold must be an integer >= 3, got 2"),
    ("max-revisit-epochs = true", "max-revisit-epochs must be an integer >= 0, got True"),
    ("max-epsilom = 4", "unknown key 'max-epsilom'"),
    ('mechanisms = ["none"]\nmax-epsilon = 2', "a budget needs a mechanism that spends it"),
    ("counts = ", "the policy file is not valid TOML"),
])
def test_a_bad_policy_is_refused_naming_the_key_the_value_and_the_fix(text: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message) as caught:
        SitePolicy.from_toml(text)
    assert str(caught.value).startswith("site-policy: ") and "site-policy.toml" in str(caught.value)


def test_every_problem_is_named_at_once() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="count-multiple must be.*; digest must be"):
        SitePolicy.from_toml('count-multiple = -1\ndigest = 3')


def test_without_a_file_an_honest_run_is_answered_as_before() -> None:
    # Prepare
    policy = SitePolicy()

    # Execute / Assert: no refusal, every value exact
    policy.check_mechanism("none", None)
    policy.check_query(10_000, answered=5, class_counts=True, privacy="none")
    policy.check_digest("none", digest_epochs=10, revisit_epochs=10)
    policy.check_threshold(3, parties=3)  # the protocol's own floor: more than half of the roster, at least 3
    policy.check_threshold(6, parties=10)
    assert policy.released_count(1234, "none") == 1234 and policy.sends_training_loss("none")
    assert policy.releases("none", class_counts=False, teacher_accuracy=True)["num-examples"] == "exact"


def test_under_privacy_the_defaults_round_counts_and_withhold_losses_and_class_counts() -> None:
    # Prepare
    policy = SitePolicy()

    # Execute
    released = policy.releases("dp-sgd", class_counts=False, teacher_accuracy=False)

    # Assert
    assert [policy.released_count(n, "dp-sgd") for n in (1, 100, 101, 1234)] == [100, 100, 200, 1300]
    assert not policy.sends_training_loss("dp-sgd") and not policy.allows_class_counts("pate")
    assert released == {"num-examples": "rounded up to a multiple of 100", "class-counts": "withheld",
                        "train-loss": "withheld (sent as NaN)", "teacher-accuracy": "withheld (sent as -1)",
                        "teacher-params": "public (the model's size)", "teacher-rounds": "public (rounds answered)",
                        "timings": "withheld (training seconds scale with num-examples, which does not leave exactly)"}
    assert SitePolicy(counts="withheld").released_count(1234, "dp-sgd") == 1
    assert SitePolicy(counts="exact", count_multiple=7).released_count(1234, "dp-sgd") == 1234


def test_noised_counts_allow_class_counts_under_privacy_and_are_stated_as_accounted() -> None:
    # Prepare
    policy = SitePolicy.from_toml('counts = "noised"\ncount-noise = 20\n')

    # Execute
    released = policy.releases("dp-sgd", class_counts=True, teacher_accuracy=True)

    # Assert
    assert policy.allows_class_counts("dp-sgd") and policy.allows_class_counts("pate") and policy.count_noise == 20.0
    assert released["class-counts"] == "noised: Gaussian noise of std 20, released once per run, accounted in epsilon"
    assert released["num-examples"].startswith("sum of the noised class counts")
    assert released["teacher-accuracy"] == "on the public test set (post-processing of the DP-SGD teacher)"
    assert "not accounted" in policy.releases("none", class_counts=False, teacher_accuracy=False)["num-examples"]
    assert not SitePolicy.from_toml('counts = "noised"\nclass-counts = false\n').allows_class_counts("dp-sgd")
    with pytest.raises(ValueError, match="noised_counts"):
        policy.released_count(10, "dp-sgd")  # a noised count is the mechanism's release, never computed here


def test_under_pate_the_teacher_accuracy_is_withheld_unless_the_policy_sends_it() -> None:
    assert not SitePolicy().sends_teacher_accuracy("pate") and SitePolicy().sends_teacher_accuracy("dp-sgd")
    assert SitePolicy().releases("pate", class_counts=False, teacher_accuracy=True)["teacher-accuracy"] == \
        "withheld (sent as -1)"
    allowed = SitePolicy.from_toml("teacher-accuracy = true\n")
    assert "not covered by the mechanism" in allowed.releases("pate", class_counts=False, teacher_accuracy=True)[
        "teacher-accuracy"]


@pytest.mark.parametrize(("policy", "privacy", "budget", "line"), [
    (SitePolicy(), "none", 4.0, 'site-policy: max-epsilon = 4 refuses privacy "none"'),
    (SitePolicy.from_toml('mechanisms = ["dp-sgd"]'), "none", None, 'site-policy: mechanisms = ["dp-sgd"] refuses privacy "none"'),
    (SitePolicy.from_toml('mechanisms = ["dp-sgd"]'), "pate", 2.0, 'site-policy: mechanisms = ["dp-sgd"] refuses privacy "pate"'),
])
def test_a_mechanism_outside_the_policy_is_refused_with_its_line(policy: SitePolicy, privacy: str, budget: float | None,
                                                                  line: str) -> None:
    # Execute / Assert
    with pytest.raises(PolicyViolation) as caught:
        policy.check_mechanism(privacy, budget)
    assert str(caught.value).startswith(line)


def test_each_query_limit_is_refused_with_its_line() -> None:
    # Prepare
    policy = SitePolicy.from_toml("max-queries-per-round = 1\nmax-samples-per-query = 100\nmin-secagg-threshold = 3")

    # Execute / Assert
    policy.check_query(100, answered=0, class_counts=False, privacy="dp-sgd")  # within every limit
    with pytest.raises(PolicyViolation, match=r"^site-policy: max-samples-per-query = 100 refuses a query for 101"):
        policy.check_query(101, answered=0, class_counts=False, privacy="none")
    with pytest.raises(PolicyViolation, match=r"^site-policy: max-queries-per-round = 1 refuses query 2 of this round"):
        policy.check_query(10, answered=1, class_counts=False, privacy="none")
    with pytest.raises(PolicyViolation, match=r"^site-policy: class-counts = false \(default\) refuses per-class counts"):
        policy.check_query(10, answered=0, class_counts=True, privacy="dp-sgd")
    with pytest.raises(PolicyViolation, match=r"^site-policy: min-secagg-threshold = 3 refuses .* threshold of 2"):
        policy.check_threshold(2, parties=3)
    policy.check_threshold(3, parties=3)
    SitePolicy(class_counts=True).check_query(10, answered=0, class_counts=True, privacy="dp-sgd")  # allowed, listed


def test_digest_limits_and_revisit_under_privacy_are_refused_with_their_line() -> None:
    # Prepare
    policy = SitePolicy.from_toml("max-digest-epochs = 2\nmax-revisit-epochs = 5")

    # Execute / Assert
    policy.check_digest("dp-sgd", digest_epochs=2, revisit_epochs=0)  # a digest on public data is post-processing
    with pytest.raises(PolicyViolation, match=r"^site-policy: max-digest-epochs = 2 refuses digest-epochs 3"):
        policy.check_digest("none", digest_epochs=3, revisit_epochs=0)
    with pytest.raises(PolicyViolation, match=r"^site-policy: max-revisit-epochs = 0 \(always, under privacy \"dp-sgd\"\)"):
        policy.check_digest("dp-sgd", digest_epochs=1, revisit_epochs=1)
    with pytest.raises(PolicyViolation, match=r"^site-policy: max-revisit-epochs = 5 refuses revisit-epochs 6"):
        policy.check_digest("none", digest_epochs=1, revisit_epochs=6)
    with pytest.raises(PolicyViolation, match=r"^site-policy: digest = false refuses"):
        SitePolicy.from_toml("digest = false").check_digest("none", digest_epochs=1, revisit_epochs=0)


@pytest.mark.parametrize(("policy", "threshold", "parties", "line"), [
    (SitePolicy(), 2, 3, r"site-policy: min-secagg-threshold = 3 \(more than half of the 3 institutions, at least 3\)"),
    (SitePolicy(), 5, 10, r"site-policy: min-secagg-threshold = 6 \(more than half of the 10 institutions, at least 3\)"),
    (SitePolicy(min_secagg_threshold=4, written=frozenset({"min-secagg-threshold"})), 5, 10,
     r"site-policy: min-secagg-threshold = 4, raised to 6 \(more than half of the 10 institutions"),
    (SitePolicy(min_secagg_threshold=8, written=frozenset({"min-secagg-threshold"})), 7, 10,
     r"site-policy: min-secagg-threshold = 8 refuses"),
], ids=["default-3", "default-10", "policy-below-majority", "policy-above-majority"])
def test_the_secagg_floor_is_a_majority_of_the_roster_at_least_3_and_a_policy_only_raises_it(
        policy: SitePolicy, threshold: int, parties: int, line: str) -> None:
    # Execute / Assert
    with pytest.raises(PolicyViolation, match=f"^{line}") as caught:
        policy.check_threshold(threshold, parties)
    assert f"set secagg-threshold >= {policy.secagg_floor(parties)}" in str(caught.value)
    policy.check_threshold(policy.secagg_floor(parties), parties)


def test_timings_leave_only_where_num_examples_leaves_exactly() -> None:
    # Prepare
    default, exact, noised = SitePolicy(), SitePolicy(counts="exact"), SitePolicy(counts="noised")

    # Execute
    sent = {
        "none": default.sends_timings("none", class_counts=False),
        "dp-sgd rounded": default.sends_timings("dp-sgd", class_counts=False),
        "dp-sgd exact": exact.sends_timings("dp-sgd", class_counts=False),
        "dp-sgd exact class counts": SitePolicy(class_counts=True).sends_timings("dp-sgd", class_counts=True),
        "dp-sgd noised": noised.sends_timings("dp-sgd", class_counts=True),
        "withheld": SitePolicy(counts="withheld").sends_timings("none", class_counts=False),
    }

    # Assert
    assert sent == {"none": True, "dp-sgd rounded": False, "dp-sgd exact": True, "dp-sgd exact class counts": True,
                    "dp-sgd noised": False, "withheld": False}
    assert exact.releases("dp-sgd", class_counts=False, teacher_accuracy=False)["timings"].startswith("exact")
