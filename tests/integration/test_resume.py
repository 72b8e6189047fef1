"""End to end: the ServerApp process is killed after round 1 of 3, and a new `flwr run` with `resume = true`
finishes the run from its checkpoint, with every round recorded once and a ledger that verifies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from common.audit import kinds
from common.audit.verify import abandoned_entries
from common.config import RunConfig, default_run_config
from server.checkpoint import read_state
from server.results.run_folder import PROGRESS, RESULTS
from simulations import launcher
from simulations.provision import provision_sites
from simulations.scenarios import load_scenario, to_toml

from run_cli import fedstill

pytestmark = pytest.mark.integration

RUN_NAME = "resumed"
SERVER_APP_PROCESSES = ("flwr-simulation", "flwr-serverapp")  # the ServerApp's process, simulation or deployment
WAIT_S = 240.0


def test_a_killed_server_app_resumes_after_its_last_completed_round(tmp_path: Path, home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: three rounds; teachers train long enough that round 2 is still running when round 1's checkpoint shows
    out = tmp_path / "runs"
    run_dir = out / RUN_NAME
    run_dir.mkdir(parents=True)
    overrides = {**load_scenario("digits-tiny"), "num-server-rounds": 3, "local-epochs": 8, "output-dir": str(out),
                 "run-name": RUN_NAME, **provision_sites(run_dir, 3)}

    # Execute, first attempt: kill the ServerApp's process as soon as round 1 is checkpointed
    with FlowerRun(home / "first", overrides, tmp_path / "first.log") as first:
        first.wait_for_event(lambda e: e["event"] == "checkpoint" and e["round"] == 1)
        first.kill_server_app()
    stopped = read_state(run_dir)
    ledger_before = (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines()

    # Execute, second attempt: the launcher's own path (a new Flower run, a new run id), resume = true
    monkeypatch.setenv("FLWR_HOME", str(home / "second"))
    resumed = {**overrides, "resume": True}
    cfg = RunConfig.from_run_config({**default_run_config(), **resumed})
    outcome = launcher.simulate(cfg, resumed, cpus_per_client=1, timeout_s=WAIT_S)

    # Assert: the kill left round 1 checkpointed, and nothing claims the run ended
    assert stopped is not None and stopped.round == 1 and not stopped.completed
    assert [r["round"] for r in stopped.rounds] == [1]
    assert json.loads(ledger_before[-1])["kind"] not in kinds.CLOSING
    # the resumed run: rounds 1..3 exactly once, round 1 as the first attempt recorded it, completed
    results = json.loads((run_dir / RESULTS).read_text())
    assert results["status"] == "completed" and outcome.results == results
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert results["rounds"][0] == stopped.rounds[0]
    assert set(results) == {"status", "scenario", "rounds", "final", "audit", "privacy"}
    assert results["final"]["student_accuracy"] == results["rounds"][-1]["student_accuracy"]
    assert all(row["clients_replied"] == 3 for row in results["rounds"])
    assert read_state(run_dir).completed is True
    # the ledger: one chain; round 2's first attempt stays in it, marked abandoned; every round done once
    entries = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines()]
    assert entries[: len(ledger_before)] == [json.loads(line) for line in ledger_before]
    [resume] = [e for e in entries if e["kind"] == kinds.RUN_RESUMED]
    assert resume["body"]["checkpoint_round"] == 1 and resume["body"]["run_id"] == outcome.run_id
    assert entries[resume["body"]["checkpoint_seq"]]["kind"] == kinds.CHECKPOINT
    assert [e["body"]["run_id"] for e in entries if e["kind"] == kinds.RUN_STARTED] == [*stopped.run_ids, outcome.run_id]
    abandoned = abandoned_entries(entries)
    kept = [e for e in entries if e["seq"] not in abandoned]
    for kind in (kinds.ROUND_OPENED, kinds.AGGREGATED, kinds.CHECKPOINT):
        assert [e["body"]["round"] for e in kept if e["kind"] == kind] == [1, 2, 3], kind
    assert all(entries[s]["body"]["round"] == 2 for s in abandoned)
    closing = [e for e in entries if e["kind"] not in (kinds.TREE_HEAD, kinds.COSIGNED) and e["body"].get("phase") != "witness"]
    assert results["audit"]["ledger_entries"] == len(entries) and closing[-1]["kind"] == kinds.RUN_FINISHED
    logs = sorted(str(p) for p in (run_dir / "sites").glob("*/release-log.jsonl"))
    verified = fedstill("audit", "verify", str(run_dir / "ledger.jsonl"), "--coordinator-key", str(run_dir / "coordinator.pub"),
                        *[arg for log in logs for arg in ("--client-log", log)], home=home)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout and "3 release log(s) match the ledger" in verified.stdout


class FlowerRun:
    """`flwr run --stream` on a local simulation SuperLink of its own, and every process under it stopped at the end."""

    def __init__(self, home: Path, overrides: dict[str, Any], log_path: Path) -> None:
        self.home, self.run_dir = home, Path(overrides["output-dir"]) / overrides["run-name"]
        self.home.mkdir(parents=True)
        self.config = home / "run-config.toml"
        self.config.write_text(to_toml(overrides), encoding="utf-8")
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.seen: dict[int, str] = {}  # pid -> start time of every process found under the SuperLink, stopped at the end

    def __enter__(self) -> FlowerRun:
        http_port, control_port = launcher.free_ports(2)
        env = {**os.environ, **launcher.OFFLINE_ENV, "FLWR_HOME": str(self.home),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
        with self.log_path.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flwr.cli.app", "run", str(launcher.PROJECT_DIR), "--run-config", str(self.config),
                 "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--stream"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=launcher.PROJECT_DIR)
        return self

    def wait_for_event(self, wanted) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self._descendants()
            path = self.run_dir / PROGRESS
            events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
            if match := next((e for e in events if wanted(e)), None):
                return match
            if any(e["event"] == "finished" for e in events) or self.process.poll() is not None:
                raise AssertionError(f"the run ended before the awaited event: {events[-3:]}; see {self.log_path}")
            time.sleep(0.1)
        raise AssertionError(f"no awaited event within {WAIT_S:.0f} s; see {self.log_path}")

    def kill_server_app(self) -> None:
        apps = [pid for pid, cmd in self._descendants().items() if any(name in cmd for name in SERVER_APP_PROCESSES)]
        assert len(apps) == 1, f"expected one ServerApp process, found {apps}"
        os.kill(apps[0], signal.SIGKILL)

    def __exit__(self, *exc: Any) -> None:
        """Stop `flwr run`, the SuperLink, and whatever of ours outlived them: a ServerApp killed outright leaves
        the simulation engine's processes (Ray) orphaned, as a crash would."""
        self._descendants()
        if self.process is not None:  # `flwr run --stream` only relays the log: it can go at once
            self.process.terminate()
            launcher.stop_child(self.process, grace_s=5.0)
        for pid in launcher.local_superlinks(self.home):
            launcher.stop(pid)
        for pid in self._left():  # orphans of a crashed app have nothing to save
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while self._left() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not self._left(), f"processes outlived the cleanup: {[_cmdline(pid)[:80] for pid in self._left()]}"

    def _left(self) -> list[int]:
        return [pid for pid, start in self.seen.items() if _ours(pid, start)]

    def _descendants(self) -> dict[int, str]:
        """pid -> command line of every live process under this run's local SuperLink(s); remembered in `seen`."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").glob("[0-9]*"):
            if (stat := _stat(int(entry.name))) is not None:
                parents[int(entry.name)] = int(stat[1])
        found: set[int] = set(launcher.local_superlinks(self.home))
        grew = True
        while grew:
            new = {pid for pid, parent in parents.items() if parent in found} - found
            found |= new
            grew = bool(new)
        for pid in found:
            if (stat := _stat(pid)) is not None:
                self.seen.setdefault(pid, stat[19])
        return {pid: _cmdline(pid) for pid in found}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [1] is the parent's pid, [19] the start time, [0] the state."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ours(pid: int, start: str) -> bool:
    """Still running (not a zombie), and the very process we saw (same start time), not a reused pid."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[19] == start
