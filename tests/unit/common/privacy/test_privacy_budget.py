"""Unit tests of common/privacy/budget.py: the institution's persisted privacy ledger and its budget checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from common.errors import ConfigError, DataError, PrivacyBudgetExceeded
from common.privacy import accounting
from common.privacy.budget import PrivacyLedger

DELTA = 1e-5


def votes(sigma: float = 40.0, queries: int = 100) -> dict:
    return {"mechanism": "gnmax", "sigma": sigma, "l2_sensitivity": math.sqrt(2), "queries": queries}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "node" / "privacy-ledger.json"


# --- persistence ----------------------------------------------------------------------------------


def test_new_ledger_is_created_empty(path: Path) -> None:
    # Execute
    ledger = PrivacyLedger.open(path, max_epsilon=5.0, delta=DELTA)

    # Assert
    assert json.loads(path.read_text()) == {"delta": DELTA, "entries": []}
    assert ledger.spent() == 0.0
    assert ledger.history() == []


def test_spend_persists_across_reopen(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)

    # Execute
    first = ledger.record([votes()], run_id="run-a", round_=1)
    total = ledger.record([votes(), votes(sigma=60.0)], run_id="run-a", round_=2)
    reopened = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)

    # Assert
    assert reopened.history() == [votes(), votes(), votes(sigma=60.0)]
    assert reopened.spent() == pytest.approx(total, abs=1e-12)
    assert total == pytest.approx(accounting.epsilon([votes(), votes(), votes(sigma=60.0)], DELTA), abs=1e-12)
    assert 0 < first < total
    stored = json.loads(path.read_text())["entries"]
    assert [(entry["run_id"], entry["round"]) for entry in stored] == [("run-a", 1), ("run-a", 2), ("run-a", 2)]
    assert stored[0]["epsilon_after"] == pytest.approx(first)
    assert stored[-1]["epsilon_after"] == pytest.approx(total)
    assert stored[0]["time"].endswith("+00:00")


def test_two_handles_on_one_file_do_not_lose_entries(path: Path) -> None:
    # Prepare
    early = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)
    late = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)

    # Execute
    early.record([votes()], run_id="run-a", round_=1)
    late.record([votes(sigma=60.0)], run_id="run-a", round_=2)

    # Assert
    assert early.history() == [votes(), votes(sigma=60.0)]


def test_would_spend_does_not_record(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)

    # Execute
    after = ledger.would_spend([votes()])

    # Assert
    assert after == pytest.approx(accounting.epsilon([votes(), votes()], DELTA), abs=1e-12)
    assert ledger.history() == [votes()]


# --- budget checks ----------------------------------------------------------------------------------


def test_check_refuses_a_release_over_budget_naming_the_numbers(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=3.0, delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)
    spent = ledger.spent()
    after = ledger.would_spend([votes(sigma=5.0)])

    # Execute
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.check([votes(sigma=5.0)], what="round 2 soft labels")

    # Assert
    message = str(caught.value)
    assert message.startswith("round 2 soft labels refused")
    assert f"{spent:.6g}" in message and f"{after:.6g}" in message
    assert "max-epsilon 3" in message and "delta 1e-05" in message
    assert "raise max-epsilon in this institution's node config" in message
    assert "lower the number of rounds/queries" in message and "raise the noise" in message
    assert ledger.history() == [votes()]


def test_release_to_exactly_the_budget_is_allowed(path: Path) -> None:
    # Prepare: a budget equal to what two releases spend
    exact = accounting.epsilon([votes(), votes()], DELTA)
    ledger = PrivacyLedger.open(path, max_epsilon=exact, delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)

    # Execute
    ledger.check([votes()], what="round 2")
    total = ledger.record([votes()], run_id="run-a", round_=2)

    # Assert
    assert total == pytest.approx(exact, abs=1e-9)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.check([votes(sigma=1e4, queries=1)], what="round 3")


def test_release_just_above_the_budget_is_refused(path: Path) -> None:
    # Prepare
    exact = accounting.epsilon([votes()], DELTA)
    ledger = PrivacyLedger.open(path, max_epsilon=exact - 1e-7, delta=DELTA)

    # Execute / Assert
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.check([votes()], what="round 1")


def test_infinite_budget_never_refuses(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=math.inf, delta=DELTA)

    # Execute / Assert
    ledger.check([votes(sigma=0.5, queries=10**5)], what="round 1")


# --- rejections -------------------------------------------------------------------------------------


def test_delta_mismatch_is_refused(path: Path) -> None:
    # Prepare
    PrivacyLedger.open(path, max_epsilon=5.0, delta=DELTA)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"kept at delta 1e-05 but delta 1e-06 was requested.*do not add"):
        PrivacyLedger.open(path, max_epsilon=5.0, delta=1e-6)


@pytest.mark.parametrize("max_epsilon", [0.0, -1.0, math.nan, "5"])
def test_bad_max_epsilon_is_refused(path: Path, max_epsilon: object) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="max-epsilon must be a number > 0"):
        PrivacyLedger.open(path, max_epsilon=max_epsilon, delta=DELTA)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"delta": DELTA}),
        json.dumps({"delta": DELTA, "entries": [{"run_id": "a"}]}),
        json.dumps(
            {
                "delta": DELTA,
                "entries": [
                    {"run_id": "a", "round": 1, "event": {"mechanism": "gnmax"}, "epsilon_after": 1.0, "time": "t"}
                ],
            }
        ),
    ],
)
def test_corrupted_file_is_a_clear_error(path: Path, content: str) -> None:
    # Prepare
    path.parent.mkdir(parents=True)
    path.write_text(content)

    # Execute / Assert
    with pytest.raises(DataError, match=r"privacy ledger .* do not delete it lightly: deleting the ledger resets"):
        PrivacyLedger.open(path, max_epsilon=5.0, delta=DELTA)
    assert path.read_text() == content


def test_bad_record_arguments_are_refused(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=5.0, delta=DELTA)

    # Execute / Assert
    with pytest.raises(ConfigError, match="run_id must be a non-empty string"):
        ledger.record([votes()], run_id="", round_=1)
    with pytest.raises(ConfigError, match="round must be an integer >= 0, got -1"):
        ledger.record([votes()], run_id="run-a", round_=-1)
    with pytest.raises(ConfigError, match="unknown mechanism 'laplace'"):
        ledger.record([{"mechanism": "laplace"}], run_id="run-a", round_=1)
    assert ledger.history() == []


# --- crash safety -------------------------------------------------------------------------------------


def test_crash_during_write_leaves_the_previous_ledger_intact(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)
    before = path.read_bytes()

    def crash(source: str, target: str) -> None:
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)

    # Execute
    with pytest.raises(OSError, match="simulated power cut"):
        ledger.record([votes(sigma=60.0)], run_id="run-a", round_=2)
    monkeypatch.undo()

    # Assert
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA).history() == [votes()]
