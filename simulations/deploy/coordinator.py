"""The coordinator's exchanges with a deployed federation, through Flower's `flwr` CLI: submit a run, read its
status, wait for it, and fetch the ServerApp's own error when it failed.

Every exchange with a SuperLink goes through one `Control`: `fedstill run` and `fedstill register` use it, and so
does the loopback federation of the tests (simulations/deploy/local.py). Flower's `flwr run` exits 0 whatever
the ServerApp does, so the outcome is read from `flwr list FED --run-id ID --format json` (`finished:completed`,
`finished:failed`, `finished:stopped`), and a failed run's reason from the ServerApp's log (`flwr log ID FED
--show`): the last line of its traceback, e.g. `DataError: public-size 10000 leaves no private data`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedstillError
from simulations.launcher import OFFLINE_ENV, PROJECT_DIR, cli_error_in, run_id_in

FlwrCli = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]  # runs `flwr ARGS`, output captured as text
FINISHED = "finished"
COMPLETED, FAILED, STOPPED = "finished:completed", "finished:failed", "finished:stopped"
MAX_POLL_S = 15.0  # the longest gap between two `flwr list` polls of a running run (Control.wait)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s")
MODULE_PREFIX = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*(?::|$))")


class DeployError(FedstillError):
    """An exchange with the federation failed: the SuperLink refused or did not answer, or a run did not finish."""


def flwr_cli(home: Path | None = None, timeout_s: float = 300.0) -> FlwrCli:
    """Run this environment's `flwr` with Flower's telemetry and update checks off; FLWR_HOME is `home`, else
    the caller's (its config.toml names the federations)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**OFFLINE_ENV, **os.environ, "PATH": path, **({"FLWR_HOME": str(home)} if home else {})}

    def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([sys.executable, "-m", "flwr.cli.app", *args], capture_output=True, text=True,
                                  env=env, cwd=PROJECT_DIR, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise DeployError(f"`flwr {' '.join(args)}` got no answer within {timeout_s:.0f} s; check that the "
                              "SuperLink is up and that the federation's address in $FLWR_HOME/config.toml is right") from None

    return run


@dataclass(frozen=True)
class RunStatus:
    """A run's status as `flwr list` reports it: `running`, `finished:failed`, ...; details (Flower's note)."""

    status: str
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status.startswith(FINISHED)


@dataclass(frozen=True)
class RunOutcome:
    """How a finished run ended; `error` is the ServerApp's own error when it failed."""

    run_id: str
    status: str
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


@dataclass(frozen=True)
class Control:
    """The coordinator's side of one federation (a name in $FLWR_HOME/config.toml), through `flwr`."""

    federation: str
    flwr: FlwrCli

    def submit(self, app: Path, config_file: Path, log: Path | None = None) -> str:
        """`flwr run APP FED --run-config FILE`; returns the run id (the output goes to `log` when given)."""
        out = self.flwr(["run", str(app), self.federation, "--run-config", str(config_file)])
        output = out.stdout + out.stderr
        if log is not None:
            log.write_text(output, encoding="utf-8")
        run_id = run_id_in(output)
        if out.returncode != 0 or run_id is None:
            where = f" (log: {log})" if log else ""
            raise DeployError(f"`flwr run` did not start a run on {self.federation}: "
                              f"{cli_error_in(output) or output.strip()[-500:] or 'no output'}{where}")
        return run_id

    def status(self, run_id: str) -> RunStatus:
        out = self.flwr(["list", self.federation, "--run-id", run_id, "--format", "json"])
        return parse_run_status(out.stdout, run_id, self.federation)

    def wait(self, run_id: str, timeout_s: float | None, *, poll_s: float = 2.0, max_poll_s: float = MAX_POLL_S,
             misses: int | None = 5, on_poll: Callable[[], object] | None = None,
             between: Callable[[], bool] | None = None, sleep: Callable[[float], None] = time.sleep) -> RunStatus:
        """Poll the run's status until it finishes; `misses` unanswered polls in a row (None: any number) and a
        passed `timeout_s` (None: none) raise DeployError. `on_poll` runs after each poll (progress, checks).

        Each poll is a `flwr list`, a Python process of its own that costs about a CPU-second, so the polls back
        off from `poll_s` to `max_poll_s` apart (x1.5 each). `between` runs every `poll_s` in the meantime (a
        cheap local look: new lines of the run's progress file) and returns True when it sees the run end there:
        the status is then asked at once."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        missed = 0
        interval = poll_s
        while True:
            try:
                status = self.status(run_id)
                missed = 0
            except DeployError:
                missed += 1
                if misses is not None and missed >= misses:
                    raise
                status = RunStatus("unknown")
            if on_poll:
                on_poll()
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise DeployError(f"run {run_id} did not finish within {timeout_s:.0f} s; it goes on: follow it with "
                                  f"`flwr log {run_id} {self.federation}`, stop it with `flwr stop {run_id} {self.federation}`")
            for _ in range(max(1, round(interval / poll_s)) if poll_s > 0 else 1):
                sleep(poll_s)
                if (between is not None and between()) or (deadline is not None and time.monotonic() >= deadline):
                    break
            interval = min(max(max_poll_s, poll_s), interval * 1.5)

    def serverapp_log(self, run_id: str) -> str:
        """The ServerApp's log as the SuperLink keeps it (`flwr log ID FED --show`)."""
        out = self.flwr(["log", run_id, self.federation, "--show"])
        return out.stdout + out.stderr

    def outcome(self, run_id: str, status: RunStatus, progress_error: str | None = None) -> RunOutcome:
        """How the run ended; a failed run's error from the ServerApp's log, else from its progress file
        (`progress_error`), else from Flower's status details."""
        if status.status != FAILED:
            return RunOutcome(run_id, status.status)
        try:
            error = serverapp_error(self.serverapp_log(run_id))
        except DeployError:
            error = None
        details = status.details.removeprefix("ServerApp failed with exception: ") if status.details != "N/A" else ""
        error = error or progress_error or details or f"no error in its log; see `flwr log {run_id} {self.federation}`"
        return RunOutcome(run_id, status.status, error)


def parse_run_status(output: str, run_id: str, federation: str) -> RunStatus:
    """The run's entry in `flwr list --format json` output, or DeployError with Flower's reason."""
    try:
        data: dict[str, Any] = json.loads(output[output.index("{"):])
    except ValueError:
        raise DeployError(f"`flwr list {federation}` gave no JSON: {output.strip()[-300:] or 'no output'}") from None
    if not data.get("success", True) or not data.get("runs"):
        reason = ANSI.sub("", str(data.get("error-message", "no such run"))).strip().replace("\n", " ")
        raise DeployError(f"`flwr list {federation} --run-id {run_id}` failed: {reason}")
    run = data["runs"][0]
    return RunStatus(str(run.get("status", "unknown")), str(run.get("status-details") or ""))


def serverapp_error(log: str) -> str | None:
    """The ServerApp's own error in its log: the exception line that ends the traceback Flower logs after
    "ServerApp raised an exception", without the module path (`DataError: ...`); None when there is none."""
    lines = ANSI.sub("", log).splitlines()
    marker = max((i for i, line in enumerate(lines) if "ServerApp raised an exception" in line), default=-1)
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)") and i > marker]
    if not starts:
        return None
    found: list[str] = []
    for line in lines[starts[-1] + 1:]:  # the last traceback: indented frames, then the exception
        if not found and (not line.strip() or line.startswith((" ", "\t"))):
            continue
        if found and (not line.strip() or LOG_RECORD.match(line) or line.startswith((" ", "\t"))):
            break
        found.append(line.strip())
    return MODULE_PREFIX.sub("", " ".join(found)) if found else None


class ProgressFollower:
    """New events of a run's progress.jsonl, from where it stood when the run was submitted (a resumed run's
    earlier lines are done); an unreadable file gives none (the run folder may lie on another host). `finished`:
    the run's `finished` event once one was read (its end as the ServerApp wrote it), else None."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished: dict[str, Any] | None = None
        try:
            self.offset = path.stat().st_size
        except OSError:
            self.offset = 0

    def new_events(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        events = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
            if events[-1].get("event") == "finished":
                self.finished = events[-1]
        return events
