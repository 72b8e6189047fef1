"""The coordinator's exchanges through `flwr`, with the flwr CLI replaced by scripted outputs of the shapes
Flower 1.42 prints: submission, the wait loop's outcomes, and the ServerApp's own error read from its log
(SERVERAPP_LOG is the shape of a real `flwr log ID FED --show` of a failed ServerApp, paths shortened)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from simulations.deploy.coordinator import Control, DeployError, ProgressFollower, RunStatus, serverapp_error

ERROR = "public-size 10000 leaves no private data: the digits training set has 1437 samples; choose a smaller public-size"
SERVERAPP_LOG = f"""Using SuperLink: remote (superlink.example.org:8000)
\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process
Successfully installed fedstill to /srv/flwr-home/apps/fedstill.fedstill.0.1.0.bc036411.
\x1b[92mINFO \x1b[0m:      waiting up to 120 s for 3 nodes (num-clients)
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/srv/venv/lib/python3.11/site-packages/flwr/superlink/runtime/run_serverapp.py", line 221, in run_serverapp
    context = run_(
              ^^^^^
  File "/srv/venv/lib/python3.11/site-packages/flwr/server/run_serverapp.py", line 60, in run
    server_app(grid=grid, context=context)
  File "/srv/venv/lib/python3.11/site-packages/flwr/serverapp/server_app.py", line 176, in __call__
    self._main(grid, context)
  File "/srv/flwr-home/apps/fedstill.fedstill.0.1.0.bc036411/server/server_app.py", line 56, in main
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed, cfg.test_size, max_seq_len=cfg.max_seq_len)
            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
common.errors.DataError: {ERROR}
\x1b[91mERROR \x1b[0m:     Exit Code: 201

An unhandled exception occurred in the ServerApp.

For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/201.html>
"""


def listing(status: str, details: str = "N/A") -> str:
    """What `flwr list FED --run-id ID --format json` prints."""
    return json.dumps({"success": True, "runs": [{"run-id": "4242", "federation-id": "", "fab-id": "fedstill/fedstill",
                                                   "status": status, "status-details": details, "elapsed": 1.0}]}, indent=2)


class ScriptedFlwr:
    """`flwr ARGS` answered from a script: per subcommand, a queue of (return code, output); records every call."""

    def __init__(self, **script: list[tuple[int, str]]) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        queue = self.script[args[0]]
        code, output = queue.pop(0) if len(queue) > 1 else queue[0]
        return subprocess.CompletedProcess(list(args), code, output, "")


def test_submit_runs_flwr_run_and_returns_the_run_id(tmp_path: Path) -> None:
    # Prepare
    flwr = ScriptedFlwr(run=[(0, "Loading project configuration...\n🎊 Successfully started run 4242\n")])

    # Execute
    run_id = Control("remote", flwr).submit(Path("/srv/app"), tmp_path / "run.toml", log=tmp_path / "flwr-run.log")

    # Assert
    assert run_id == "4242"
    assert flwr.calls == [["run", "/srv/app", "remote", "--run-config", str(tmp_path / "run.toml")]]
    assert "Successfully started run 4242" in (tmp_path / "flwr-run.log").read_text()


def test_a_refused_submission_names_flowers_reason() -> None:
    # Prepare: Flower's CLI draws its errors in a box
    box = "╭─ Error ─────────╮\n│ Connection to the SuperLink is unavailable. │\n╰─────────────────╯\n"
    flwr = ScriptedFlwr(run=[(1, box)])

    # Execute / Assert
    with pytest.raises(DeployError, match="did not start a run on remote: Connection to the SuperLink is unavailable."):
        Control("remote", flwr).submit(Path("/srv/app"), Path("run.toml"))


def test_wait_polls_until_the_run_completes() -> None:
    # Prepare
    flwr = ScriptedFlwr(list=[(0, listing("pending")), (0, listing("running")), (0, listing("finished:completed"))])
    polls: list[int] = []

    # Execute
    control = Control("remote", flwr)
    status = control.wait("4242", None, poll_s=0, on_poll=lambda: polls.append(1))
    outcome = control.outcome("4242", status)

    # Assert
    assert status.status == "finished:completed" and outcome.completed and outcome.error is None
    assert len(polls) == 3
    assert flwr.calls[0] == ["list", "remote", "--run-id", "4242", "--format", "json"]


def test_the_polls_back_off_to_the_longest_gap_between_two_flwr_list() -> None:
    # Prepare: each `flwr list` starts a Python process (about a CPU-second): 7 polls of a long run
    running = [(0, listing("running"))] * 6
    flwr = ScriptedFlwr(list=[*running, (0, listing("finished:completed"))])
    slept: list[float] = []
    looks: list[int] = []

    # Execute
    Control("remote", flwr).wait("4242", None, poll_s=2.0, max_poll_s=6.0, sleep=slept.append,
                                 between=lambda: bool(looks.append(1)))

    # Assert: the gaps grow 2, 3, 4.5, 6 (at most), looked at locally every 2 s
    assert len(flwr.calls) == 7
    assert slept == [2.0] * len(slept) and len(looks) == len(slept)
    assert len(slept) == 1 + 2 + 2 + 3 + 3 + 3  # round(gap / 2 s) looks per gap: 2, 3, 4.5, 6, 6, 6 s


def test_a_run_seen_ending_in_its_progress_file_is_asked_about_at_once() -> None:
    # Prepare: the progress file shows the end at the fourth local look, the first of the third gap (4.5 s: 2 looks)
    flwr = ScriptedFlwr(list=[(0, listing("running"))] * 3 + [(0, listing("finished:completed"))])
    slept: list[float] = []
    looks = iter([False, False, False, True])

    # Execute
    status = Control("remote", flwr).wait("4242", None, poll_s=2.0, max_poll_s=60.0, sleep=slept.append,
                                          between=lambda: next(looks))

    # Assert: Flower asked right after that look, not at the end of the gap
    assert status.status == "finished:completed"
    assert slept == [2.0] * 4 and len(flwr.calls) == 4


def test_a_failed_run_reports_the_serverapps_own_error_from_its_log() -> None:
    # Prepare
    flwr = ScriptedFlwr(list=[(0, listing("running")),
                              (0, listing("finished:failed", f"ServerApp failed with exception: {ERROR}"))],
                        log=[(0, SERVERAPP_LOG)])

    # Execute
    control = Control("remote", flwr)
    outcome = control.outcome("4242", control.wait("4242", 60, poll_s=0))

    # Assert
    assert outcome.status == "finished:failed" and not outcome.completed
    assert outcome.error == f"DataError: {ERROR}"
    assert ["log", "4242", "remote", "--show"] in flwr.calls


def test_a_failed_run_without_a_traceback_falls_back_to_the_progress_file_then_to_flowers_details() -> None:
    # Prepare: a log without the traceback (the ServerApp was killed)
    failed = RunStatus("finished:failed", f"ServerApp failed with exception: {ERROR}")
    control = Control("remote", ScriptedFlwr(log=[(0, "INFO :      round 1\n")]))

    # Execute
    from_progress = control.outcome("4242", failed, progress_error="AuditError: bad signature (key 3f2a)")
    from_details = control.outcome("4242", failed)

    # Assert
    assert from_progress.error == "AuditError: bad signature (key 3f2a)"
    assert from_details.error == ERROR


def test_a_stopped_run_is_reported_as_stopped_without_reading_its_log() -> None:
    # Prepare
    flwr = ScriptedFlwr(list=[(0, listing("finished:stopped"))])

    # Execute
    control = Control("remote", flwr)
    outcome = control.outcome("4242", control.wait("4242", 60, poll_s=0))

    # Assert
    assert outcome.status == "finished:stopped" and outcome.error is None
    assert [call[0] for call in flwr.calls] == ["list"]


def test_a_run_past_the_timeout_goes_on_and_the_error_says_how_to_stop_it() -> None:
    # Prepare
    control = Control("remote", ScriptedFlwr(list=[(0, listing("running"))]))

    # Execute / Assert
    with pytest.raises(DeployError, match=r"did not finish within 0 s; it goes on: .*`flwr stop 4242 remote`"):
        control.wait("4242", 0.01, poll_s=0.005)


def test_a_superlink_that_stops_answering_ends_the_wait_after_the_allowed_misses() -> None:
    # Prepare
    flwr = ScriptedFlwr(list=[(1, "╭─ Error ─╮\n│ Connection to the SuperLink is unavailable. │\n╰──╯\n")])

    # Execute / Assert
    with pytest.raises(DeployError, match="gave no JSON"):
        Control("remote", flwr).wait("4242", None, poll_s=0, misses=3)
    assert len(flwr.calls) == 3


def test_an_unknown_run_id_is_flowers_error_message() -> None:
    # Prepare: what `flwr list --format json` prints for a run id the SuperLink does not know
    answer = json.dumps({"success": False, "error-message": "\n[code: 404] Run ID 7 not found."})
    control = Control("remote", ScriptedFlwr(list=[(1, answer)]))

    # Execute / Assert
    with pytest.raises(DeployError, match=r"--run-id 7` failed: \[code: 404\] Run ID 7 not found."):
        control.status("7")


def test_the_error_is_the_last_traceback_after_the_serverapp_marker() -> None:
    # Prepare: an earlier, handled traceback; a chained one; and a message on two lines
    log = ("Traceback (most recent call last):\n  File \"a.py\", line 1, in f\nValueError: handled earlier\n"
           "ERROR :     ServerApp raised an exception\n"
           "Traceback (most recent call last):\n  File \"b.py\", line 2, in g\nKeyError: 'x'\n\n"
           "The above exception was the direct cause of the following exception:\n\n"
           "Traceback (most recent call last):\n  File \"c.py\", line 3, in h\n"
           "common.errors.ConfigError: bad run config: unknown key 'temprature'\nsecond line\n"
           "ERROR :     Exit Code: 300\n")

    # Execute / Assert
    assert serverapp_error(log) == "ConfigError: bad run config: unknown key 'temprature' second line"
    assert serverapp_error("INFO :      nothing went wrong\n") is None
    assert serverapp_error("Traceback (most recent call last):\n  File \"x.py\"\nSystemExit: 0\n") == "SystemExit: 0"


def test_progress_follower_reads_only_lines_written_after_submission(tmp_path: Path) -> None:
    # Prepare: a resumed run's earlier line is there already
    path = tmp_path / "progress.jsonl"
    path.write_text(json.dumps({"event": "round", "round": 1}) + "\n")
    follower = ProgressFollower(path)
    absent = ProgressFollower(tmp_path / "elsewhere" / "progress.jsonl")

    # Execute: one complete line, one still being written
    with path.open("a") as handle:
        handle.write(json.dumps({"event": "round", "round": 2}) + "\n" + '{"event": "fin')
    first = follower.new_events()
    with path.open("a") as handle:
        handle.write('ished", "status": "completed"}\n')
    second = follower.new_events()

    # Assert
    assert first == [{"event": "round", "round": 2}]
    assert second == [{"event": "finished", "status": "completed"}]
    assert absent.new_events() == []
