"""A run folder holds records and keys: every file in it is owner-only (0600) and every folder 0700, whatever the
umask, after a real run through `server_app.main` with its institutions provisioned in it as `fedstill simulate`
does (their keys, release logs, privacy ledgers and teachers), and after a later command adds to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.results.run_folder import add_section

from run_fixtures import Federation, loose_modes, run_server, run_settings

pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


@pytest.mark.usefixtures("loose_umask")
def test_every_file_of_a_run_folder_is_owner_only(tmp_path: Path) -> None:
    # Prepare: a run under DP-SGD (so each institution keeps a privacy ledger), in a run folder made world-readable
    mapping = run_settings(tmp_path, "private", privacy="dp-sgd", **{"dp-noise-multiplier": 1.0})
    folder = tmp_path / "runs" / "private"
    folder.chmod(0o755)

    # Execute: the run, then a later command's section (as `fedstill evaluate` adds one)
    run_server(Federation(mapping, 1), mapping, 1)
    add_section(folder, "evaluation", {"note": "added later"})

    # Assert: the run left what a run leaves, and all of it is its owner's only
    names = {path.name for path in folder.rglob("*")}
    assert {"results.json", "progress.jsonl", "ledger.jsonl", "report.md", "accuracy.png", "student.safetensors",
            "student.json", "checkpoint.safetensors", "coordinator.key", "coordinator.pub", "allow-list.toml",
            "release-log.jsonl", "privacy-ledger.json", "privacy-ledger.json.lock"} <= names
    assert any(name.startswith("teacher-") for name in names)
    assert loose_modes(folder) == {}
