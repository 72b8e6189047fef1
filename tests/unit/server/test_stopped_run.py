"""A run stopped with `flwr stop` is recorded as stopped, not failed: results.json, report.md, progress.jsonl and the
ledger's closing entry. The ServerApp is ended exactly as Flower 1.42 ends it (server/stopping.py): Flower's own
signal handlers are installed as `flwr-serverapp` installs them, and the grid call the SuperLink refuses sends SIGINT
as Flower's retry invoker does. A genuine error, or another exit, still records a failure."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.supercore.exit import exit_handler, register_signal_handlers
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.telemetry import EventType

from common.audit import kinds
from common.audit.verify import verify_ledger
from common.messages import SOFT_LABELS_TYPE
from server.stopping import NOT_RUNNING_NOTE, STOPPED_NOTE

from run_fixtures import Federation, run_server, run_settings

pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


class _NotStarted:
    """Stands in for the thread `flwr_exit` starts to `os._exit` the process 5 s later (it would end pytest)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        pass


@pytest.fixture
def flower_serverapp(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process handles signals as `flwr-serverapp` does (flwr/superlink/runtime/run_serverapp.py): with Flower's
    own handlers, which end the ServerApp through `flwr_exit`. Its force-exit timer and telemetry are left out, and
    the process's own handlers are put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python runs signal handlers in the main thread only")
    flower_exit = importlib.import_module("flwr.supercore.exit.exit")
    monkeypatch.setattr(exit_handler, "registered_exit_handlers", [])
    monkeypatch.setattr(flower_exit, "threading", SimpleNamespace(Thread=_NotStarted))
    monkeypatch.setattr(flower_exit, "event", lambda *args, **kwargs: None)
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)}
    register_signal_handlers(event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE, exit_message="Task stopped by user.")
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def flwr_stop() -> None:
    """What the ServerApp's process does when the SuperLink refuses its revoked task token after `flwr stop`
    (flwr/supercore/retry/http_retry.py, `_should_giveup` on HTTP 401): SIGINT to itself, then wait to be ended."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(6)


def signal_of(number: signal.Signals) -> Callable[[], None]:
    def send() -> None:
        os.kill(os.getpid(), number)
        time.sleep(6)

    return send


def at(kind: str, round_: int, end: Callable[[], None]) -> Callable[[str, int], None]:
    """An interruption of the run as the exchange `kind` of round `round_` goes out."""
    def interrupt(message_type: str, message_round: int) -> None:
        if (message_type, message_round) == (kind, round_):
            end()
    return interrupt


def folder_of(mapping: dict[str, Any]) -> Path:
    return Path(mapping["output-dir"]) / mapping["run-name"]


def entries_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "ledger.jsonl").read_text(encoding="utf-8").splitlines()]


def closing_of(folder: Path) -> dict[str, Any]:
    return [e for e in entries_of(folder) if e["kind"] in kinds.CLOSING][-1]


@pytest.mark.usefixtures("flower_serverapp")
def test_a_run_stopped_with_flwr_stop_is_recorded_as_stopped_and_resumes_like_a_failed_one(tmp_path: Path) -> None:
    # Prepare: a two-round run, stopped with `flwr stop` as round 2's query goes out
    mapping = run_settings(tmp_path, "stopped")
    grid = Federation(mapping, 100, interrupt=at(SOFT_LABELS_TYPE, 2, flwr_stop))

    # Execute
    with pytest.raises(SystemExit) as ended:
        run_server(grid, mapping, 100)

    # Assert: Flower's graceful exit (code 0) went on up; every record says stopped, none says failed
    assert ended.value.code == 0
    folder = folder_of(mapping)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert (results["status"], results["error"], [r["round"] for r in results["rounds"]]) == ("stopped", STOPPED_NOTE, [1])
    assert f"Status: **stopped** ({STOPPED_NOTE})" in (folder / "report.md").read_text(encoding="utf-8")
    progress = [json.loads(line) for line in (folder / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    assert progress[-1]["event"] == "finished" and progress[-1]["status"] == "stopped"
    closing = closing_of(folder)
    assert (closing["kind"], closing["body"]) == (kinds.RUN_STOPPED, {"status": "stopped", "error": STOPPED_NOTE})
    assert entries_of(folder)[-1] == closing  # Flower had cut the institutions off: nothing follows
    assert results["audit"]["ledger_head"] == closing["hash"]
    logs = sorted((folder / "sites").glob("*/release-log.jsonl"))
    check = verify_ledger(folder / "ledger.jsonl", client_logs=logs, quorum=0)
    assert check.ok, [str(p) for p in check.problems]
    unwitnessed = verify_ledger(folder / "ledger.jsonl", client_logs=logs)  # by default the end must be cosigned
    assert [(p.check, "stopped with `flwr stop`" in p.message) for p in unwitnessed.problems] == [("witness", True)]

    # Execute: the coordinator resumes it (a new Flower run, resume = true)
    run_server(Federation(mapping, 200), {**mapping, "resume": True}, 200)

    # Assert: it continues after round 1, ends completed, and the whole record now verifies, its end witnessed
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed" and [r["round"] for r in results["rounds"]] == [1, 2]
    [resume] = [e for e in entries_of(folder) if e["kind"] == kinds.RUN_RESUMED]
    assert (resume["body"]["checkpoint_round"], resume["body"]["interrupted_run_ids"]) == (1, ["100"])
    check = verify_ledger(folder / "ledger.jsonl", client_logs=logs)
    assert check.ok, [str(p) for p in check.problems]


def exit_zero() -> None:
    sys.exit(0)


def fail() -> None:
    raise RuntimeError("disk on fire")


def not_running() -> None:
    raise RunNotRunningException


@pytest.mark.usefixtures("flower_serverapp")
@pytest.mark.parametrize(("end", "raised", "status", "reason"), [
    (flwr_stop, SystemExit, "stopped", STOPPED_NOTE),
    (not_running, RunNotRunningException, "stopped", NOT_RUNNING_NOTE),
    (fail, RuntimeError, "failed", "RuntimeError: disk on fire"),
    (exit_zero, SystemExit, "failed", "SystemExit: 0"),  # an exit of 0 that Flower did not make
    (signal_of(signal.SIGTERM), SystemExit, "failed", "SystemExit: 0"),  # Flower's exit on SIGTERM: failed, as Flower says
], ids=["flwr-stop", "run-not-running", "error", "sys-exit", "sigterm"])
def test_only_flowers_stop_is_recorded_as_stopped(tmp_path: Path, end: Callable[[], None], raised: type[BaseException],
                                                   status: str, reason: str) -> None:
    # Prepare: the run ends as round 1's query goes out
    mapping = run_settings(tmp_path, "ended")
    grid = Federation(mapping, 100, interrupt=at(SOFT_LABELS_TYPE, 1, end))

    # Execute
    with pytest.raises(raised):
        run_server(grid, mapping, 100)

    # Assert
    folder = folder_of(mapping)
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert (results["status"], results["error"], results["rounds"]) == (status, reason, [])
    assert f"Status: **{status}** ({reason})" in (folder / "report.md").read_text(encoding="utf-8")
    closing = closing_of(folder)
    assert (closing["kind"], closing["body"]) == (kinds.RUN_STOPPED if status == "stopped" else kinds.RUN_FAILED,
                                                  {"status": status, "error": reason})
    check = verify_ledger(folder / "ledger.jsonl", client_logs=sorted((folder / "sites").glob("*/release-log.jsonl")))
    assert check.ok, [str(p) for p in check.problems]  # nobody's reply was used yet: nobody had to witness the end
