"""`fedstill run` end to end on the command line, with the federation's flwr CLI replaced by scripted outputs:
--write-config, the local preflight before anything is submitted, and the three ways a run ends."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import federation_commands
from simulations.deploy.coordinator import Control

ERROR = "DataError: public-size 400 leaves no private data"
TRACEBACK = ("ERROR :     ServerApp raised an exception\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
             f"common.errors.{ERROR}\n")
RESULTS = {
    "status": "completed", "scenario": {"scenario": "digits-tiny"},
    "rounds": [{"round": 1, "student_accuracy": 0.91, "ensemble_accuracy": 0.93, "clients_replied": 3,
                "uplink_bytes": 24000, "downlink_bytes": 1000, "wall_s": 2.5}],
    "final": {"student_accuracy": 0.91, "student_params": 12345, "uplink_bytes_total": 24000},
}


class Federation:
    """A federation that answers `flwr run`, `list` and `log` as Flower's CLI does, and whose ServerApp writes
    the run folder (progress lines, results) as the run goes."""

    def __init__(self, run_dir: Path, statuses: list[str], log: str = "") -> None:
        self.run_dir, self.statuses, self.log = run_dir, statuses, log
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        if args[0] == "run":
            return self.answer(args, "🎊 Successfully started run 77\n")
        if args[0] == "log":
            return self.answer(args, self.log)
        status = self.statuses.pop(0)
        if status == "running":
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with (self.run_dir / "progress.jsonl").open("a") as handle:
                handle.write(json.dumps({"event": "round", **RESULTS["rounds"][0]}) + "\n")  # type: ignore[dict-item]
        if status == "finished:completed":
            (self.run_dir / "results.json").write_text(json.dumps(RESULTS))
        runs = [{"run-id": "77", "status": status, "status-details": "N/A"}]
        return self.answer(args, json.dumps({"success": True, "runs": runs}))

    @staticmethod
    def answer(args: Sequence[str], output: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(args), 0, output, "")


@pytest.fixture
def federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a scripted federation as the one `fedstill run --federation remote` talks to."""
    monkeypatch.setattr(federation_commands, "POLL_S", 0.0)

    def install(statuses: list[str], log: str = "") -> Federation:
        fake = Federation(tmp_path / "runs" / "deployed", statuses, log)
        monkeypatch.setattr(federation_commands, "_control", lambda name: Control(name, fake))
        return fake

    return install


def invoke(tmp_path: Path, *extra: str):
    from simulations.cli.main import app

    args = ["run", "digits-tiny", "--federation", "remote", "--set", f"output-dir={tmp_path / 'runs'}",
            "--set", "run-name=deployed", *extra]
    return CliRunner().invoke(app, args)


def test_write_config_writes_a_parsable_run_config_and_the_flwr_command(tmp_path: Path) -> None:
    # Execute
    result = invoke(tmp_path, "--set", "num-server-rounds=3", "--write-config", str(tmp_path / "out.toml"))

    # Assert
    assert result.exit_code == 0, result.output
    written = tomllib.loads((tmp_path / "out.toml").read_text())
    assert written["scenario"] == "digits-tiny" and written["num-server-rounds"] == 3 and written["num-clients"] == 3
    assert written["run-name"] == "deployed" and "seed" not in written
    assert f"flwr run {federation_commands.__file__.rsplit('/simulations/', 1)[0]} remote --run-config " \
           f"{tmp_path / 'out.toml'}" in result.output.replace("\n", "")
    assert (tmp_path / "out.toml").stat().st_mode & 0o077 == 0


def test_a_preflight_refusal_submits_nothing(tmp_path: Path, federation) -> None:
    # Prepare
    fake = federation(["finished:completed"])

    # Execute: the digits training set has 1437 samples
    result = invoke(tmp_path, "--set", "public-size=100000")

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith("DataError: public-size 100000 leaves no private data")
    assert fake.calls == []


def test_a_run_folder_holding_an_earlier_runs_results_is_refused_before_submitting(tmp_path: Path, federation) -> None:
    # Prepare: a completed run under the same run-name
    fake = federation(["finished:completed"])
    folder = tmp_path / "runs" / "deployed"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(RESULTS))

    # Execute
    result = invoke(tmp_path)

    # Assert: nothing submitted, nothing overwritten
    assert result.exit_code == 1
    assert result.output.replace("\n", "").startswith(f"ConfigError: run folder {folder} already holds results (completed)")
    assert fake.calls == [] and json.loads((folder / "results.json").read_text()) == RESULTS


def test_a_completed_run_shows_its_rounds_and_results(tmp_path: Path, federation) -> None:
    # Prepare
    fake = federation(["pending", "running", "finished:completed"])

    # Execute
    result = invoke(tmp_path)

    # Assert
    assert result.exit_code == 0, result.output
    assert "run 77 submitted to remote: digits-tiny, 3 institutions, 2 rounds" in result.output
    assert "round 1/2: student accuracy 0.9100, 3 replies, 2.5 s" in result.output
    table = result.output.replace("\n", "")  # the results table wraps at the terminal's width
    assert "student accuracy 0.9100" in table and f"run folder: {tmp_path / 'runs' / 'deployed'}" in table
    assert fake.calls[0][:3] == ["run", federation_commands.__file__.rsplit("/simulations/", 1)[0], "remote"]


def test_a_failed_run_prints_the_serverapps_error_and_exits_1(tmp_path: Path, federation) -> None:
    # Prepare
    federation(["running", "finished:failed"], log=TRACEBACK)

    # Execute
    result = invoke(tmp_path)

    # Assert
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"RunFailed: run 77 failed: {ERROR}"


def test_a_stopped_run_says_so_and_exits_1(tmp_path: Path, federation) -> None:
    # Prepare
    federation(["finished:stopped"])

    # Execute
    result = invoke(tmp_path)

    # Assert
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "RunFailed: run 77 was stopped"


def test_ctrl_c_while_waiting_leaves_the_run_going_and_says_how_to_stop_it(tmp_path: Path, federation,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the coordinator presses Ctrl-C during the first poll
    fake = federation(["running"])

    def interrupted(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        if args[0] == "list":
            raise KeyboardInterrupt
        return fake(args)

    monkeypatch.setattr(federation_commands, "_control", lambda name: Control(name, interrupted))

    # Execute
    result = invoke(tmp_path)

    # Assert
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == "the run goes on; stop it with `flwr stop 77 remote`"
