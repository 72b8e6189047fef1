"""Unit tests of common/privacy/budget.py: the institution's persisted privacy ledger and its budget checks."""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError, DataError, PrivacyBudgetExceeded
from common.privacy import accounting, budget
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
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # no temp file left
    assert PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA).history() == [votes()]


# --- errors carry no local path -------------------------------------------------------------------------


def test_a_refusal_names_counts_and_epsilons_but_not_the_ledger_path(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=3.0, delta=DELTA)
    ledger.record([votes(), votes()], run_id="run-a", round_=1)

    # Execute
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.check([votes(sigma=5.0)], what="round 2 soft labels")

    # Assert: the message travels to the server as the node's error reply
    message = str(caught.value)
    assert "over 2 release(s)" in message and "max-epsilon 3" in message
    assert str(path.parent) not in message and path.name not in message


def test_a_corrupted_ledger_error_does_not_carry_its_path(path: Path) -> None:
    # Prepare
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    # Execute
    with pytest.raises(DataError) as caught:
        PrivacyLedger.open(path, max_epsilon=5.0, delta=DELTA)

    # Assert: the message names the ledger by its node-config key; the path stays in the chained cause
    assert "this institution's privacy ledger (node config privacy-ledger) is unreadable" in str(caught.value)
    assert str(path.parent) not in str(caught.value)


# --- atomic spends: reserve -----------------------------------------------------------------------------


def lock_is_free(ledger: PrivacyLedger) -> bool:
    """Whether another open file description could take the ledger's lock now (it never waits)."""
    fd = os.open(ledger.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_reserve_holds_the_lock_and_records_what_the_block_released(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)
    before = ledger.spent()

    # Execute
    with ledger.reserve([votes()], "round 2", "run-a", 2) as spend:
        held_inside = not lock_is_free(ledger)
        spend.events = [votes(sigma=60.0)]  # what was actually released

    # Assert
    assert held_inside and lock_is_free(ledger)
    assert spend.granted and spend.before == pytest.approx(before, abs=1e-12)
    assert ledger.history() == [votes(), votes(sigma=60.0)]
    assert spend.after == pytest.approx(accounting.epsilon([votes(), votes(sigma=60.0)], DELTA), abs=1e-12)


def test_reserve_refuses_before_the_block_runs(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=accounting.epsilon([votes()], DELTA), delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)
    ran = []

    # Execute
    with pytest.raises(PrivacyBudgetExceeded, match="round 2 refused"):
        with ledger.reserve([votes()], "round 2", "run-a", 2):
            ran.append(True)

    # Assert
    assert ran == [] and ledger.history() == [votes()] and lock_is_free(ledger)


def test_an_exception_in_the_block_records_nothing_and_releases_the_lock(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)

    # Execute
    with pytest.raises(RuntimeError, match="training failed"):
        with ledger.reserve([votes()], "round 1", "run-a", 1):
            raise RuntimeError("training failed")

    # Assert
    assert ledger.history() == [] and lock_is_free(ledger)


def test_reserve_without_refusal_grants_nothing_when_it_does_not_fit(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=accounting.epsilon([votes()], DELTA), delta=DELTA)
    ledger.record([votes()], run_id="run-a", round_=1)

    # Execute
    with ledger.reserve([votes()], "round 2", "run-a", 2, refuse=False) as spend:
        granted = spend.granted

    # Assert
    assert not granted and spend.after == spend.before and ledger.history() == [votes()]


def test_recording_inside_a_reserve_of_the_same_handle_is_refused_not_deadlocked(path: Path) -> None:
    # Prepare
    ledger = PrivacyLedger.open(path, max_epsilon=10.0, delta=DELTA)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="already holds the ledger's lock"):
        with ledger.reserve([votes()], "round 1", "run-a", 1):
            ledger.record([votes()], run_id="run-a", round_=1)
    assert ledger.history() == []


# --- atomic spends: two processes, one budget ------------------------------------------------------------

WAIT_S = 120  # only a broken lock ever waits this long: every wait below is for an event the other side sets


def spend_holding_the_lock(path: str, max_epsilon: float, inside: Any, go: Any, results: Any) -> None:
    """Process A: reserve, say so, and keep the lock until told to finish (then record)."""
    ledger = PrivacyLedger.open(path, max_epsilon, DELTA)
    with ledger.reserve([votes()], "A's release", "run-a", 1) as spend:
        inside.set()
        if not go.wait(WAIT_S):
            raise RuntimeError("process A was never told to finish")
    results.put(("run-a", "recorded", spend.after))


def spend_while_the_other_holds_it(path: str, max_epsilon: float, ready: Any, a_inside: Any, trying: Any,
                                   results: Any) -> None:
    """Process B: once A is inside its release, reserve the same budget (signalling just before locking)."""
    ledger = PrivacyLedger.open(path, max_epsilon, DELTA)
    real = fcntl

    class SignallingFcntl:
        LOCK_EX = real.LOCK_EX

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            trying.set()  # B has read nothing yet: it reads the ledger only once the lock is its own
            real.flock(fd, operation)

    setattr(budget, "fcntl", SignallingFcntl)  # noqa: B010  # the ledger's flock, in this child process only
    ready.set()
    if not a_inside.wait(WAIT_S):
        raise RuntimeError("process A never entered its release")
    try:
        with ledger.reserve([votes()], "B's release", "run-b", 1) as spend:
            pass
        results.put(("run-b", "recorded", spend.after))
    except PrivacyBudgetExceeded as error:
        results.put(("run-b", "refused", str(error)))


def spend_concurrently(path: Path, max_epsilon: float) -> dict[str, tuple[str, Any]]:
    """A holds the lock across its release while B tries to spend the same budget; both outcomes by run id."""
    PrivacyLedger.open(path, max_epsilon, DELTA)  # exists before either starts
    spawn = multiprocessing.get_context("spawn")
    ready, inside, trying, go, results = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Event(), spawn.Queue()
    b = spawn.Process(target=spend_while_the_other_holds_it, args=(str(path), max_epsilon, ready, inside, trying, results))
    a = spawn.Process(target=spend_holding_the_lock, args=(str(path), max_epsilon, inside, go, results))
    with processes(b, a):
        b.start()
        assert ready.wait(WAIT_S), "process B did not start"
        a.start()
        assert trying.wait(WAIT_S), "process B never tried to take the lock"
        go.set()  # A records and releases; only then can B read the ledger
        outcomes = [results.get(timeout=WAIT_S) for _ in range(2)]
        a.join(WAIT_S)
        b.join(WAIT_S)
    assert (a.exitcode, b.exitcode) == (0, 0)
    return {run: (outcome, detail) for run, outcome, detail in outcomes}


class processes:
    """Terminate whatever of `procs` is still alive when the block ends (a failing test leaves none behind)."""

    def __init__(self, *procs: Any) -> None:
        self.procs = procs

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
                proc.join(WAIT_S)


def test_two_processes_cannot_overspend_one_budget(path: Path) -> None:
    # Prepare: the budget pays for exactly one of the two releases
    one = accounting.epsilon([votes()], DELTA)

    # Execute
    outcomes = spend_concurrently(path, max_epsilon=one)

    # Assert: A, inside first, spent; B waited for the lock, saw A's spend and was refused
    assert outcomes["run-a"] == ("recorded", pytest.approx(one, abs=1e-12))
    assert outcomes["run-b"][0] == "refused" and "B's release refused" in outcomes["run-b"][1]
    stored = json.loads(path.read_text())["entries"]
    assert [entry["run_id"] for entry in stored] == ["run-a"]
    assert PrivacyLedger.open(path, one, DELTA).spent() == pytest.approx(one, abs=1e-12)


def test_two_processes_spending_within_budget_keep_both_records(path: Path) -> None:
    # Prepare: the budget pays for both
    two = accounting.epsilon([votes(), votes()], DELTA)

    # Execute
    outcomes = spend_concurrently(path, max_epsilon=two)

    # Assert: neither erased the other's record; B's total counts A's spend
    assert outcomes["run-b"] == ("recorded", pytest.approx(two, abs=1e-12))
    stored = json.loads(path.read_text())["entries"]
    assert [entry["run_id"] for entry in stored] == ["run-a", "run-b"]
