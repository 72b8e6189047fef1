"""The loopback federation's wait: the run's end seen in its progress file makes the coordinator ask Flower at
each local look until Flower agrees, instead of at the backed-off gaps of `flwr list` (Control.wait)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from simulations.deploy.local import LocalFederation

STILL_RUNNING = 14  # polls that say `running` after the progress file shows the end: ~6 s of backed-off gaps


def listing(status: str) -> str:
    return json.dumps({"success": True, "runs": [{"run-id": "7", "status": status, "status-details": "N/A"}]})


def test_a_run_seen_ending_in_its_progress_file_is_polled_at_every_look_until_flower_agrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the ServerApp writes its end at the first poll; Flower says `running` for 14 more polls
    progress = tmp_path / "run" / "progress.jsonl"
    progress.parent.mkdir()
    progress.write_text('{"event": "started"}\n')
    calls: list[Sequence[str]] = []

    def flwr(fed: LocalFederation, *args: str) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        if len(calls) == 1:
            with progress.open("a") as handle:
                handle.write('{"event": "finished", "status": "completed"}\n')
        status = "running" if len(calls) <= 1 + STILL_RUNNING else "finished:completed"
        return subprocess.CompletedProcess(list(args), 0, listing(status), "")

    monkeypatch.setattr(LocalFederation, "flwr", flwr)
    fed = LocalFederation(tmp_path / "fed", ["institution-0"])

    # Execute
    started = time.monotonic()
    status = fed.wait("7", timeout_s=60, poll_s=0.01, progress=progress)
    took = time.monotonic() - started

    # Assert: 16 polls about 0.01 s apart; without the end remembered the gaps grow to ~2 s (5.8 s in all)
    assert status == "finished:completed"
    assert len(calls) == 2 + STILL_RUNNING
    assert took < 2.0, f"the polls backed off although the run had ended: {took:.1f} s"
