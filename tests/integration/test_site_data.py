"""End to end: institutions read their private data from folders written by `fedstill site-data`; one
institution's corrupt folder is refused at the node, recorded as a rejection, and the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.release import site_folder
from simulations.provision import provision_sites

from run_cli import fedstill

pytestmark = pytest.mark.integration


def test_institutions_read_their_own_data_folders_and_a_corrupt_one_is_rejected(tmp_path: Path, home: Path) -> None:
    # Prepare: keys and allow-list for three institutions, then their data folders beside their keys
    overrides = provision_sites(tmp_path / "federation", 3)
    sites = Path(overrides["sites-dir"])
    written = fedstill("site-data", "digits-tiny", "--out", str(sites), home=home, timeout=120)
    assert written.returncode == 0, written.stdout + written.stderr
    for i in range(3):
        assert f"institution-{i}" in written.stdout and str(site_folder(sites, i) / "data") in written.stdout
    broken = site_folder(sites, 2) / "data" / "train-images-idx3-ubyte"
    broken.write_bytes(broken.read_bytes()[:-100])  # institution 2's export was cut short
    out = tmp_path / "runs"

    # Execute
    result = fedstill(
        "simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", 'run-name="own-data"',
        "--set", "num-server-rounds=1", "--set", "local-epochs=1", "--set", "student-epochs=2",
        "--set", 'teacher-models="cnn-small"',
        "--set", f'allow-list="{overrides["allow-list"]}"', "--set", f'sites-dir="{sites}"', home=home,
    )

    # Assert: the quorum (min-clients = 2) holds with the two sound institutions
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "own-data"
    results = json.loads((run / "results.json").read_text())
    (row,) = results["rounds"]
    assert row["clients_replied"] == 2
    (reason,) = row["clients_rejected"].values()
    # the reason names the file under its node-config key, never the institution's local path
    assert reason.startswith(f"node error: data-path/{broken.name} holds ") and "the file is truncated or corrupt" in reason
    assert "export the file again; `fedstill site-data --format idx` writes an example of the layout" in reason
    assert str(sites) not in reason and reason.endswith("this node's log names the path")
    assert sorted(results["audit"]["institutions"].values()) == ["institution-0", "institution-1"]
    # the ledger records the rejection with its reason
    entries = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    (rejected,) = [e["body"] for e in entries if e["kind"] == "reply-rejected"]
    assert rejected["check"] == "node-error" and rejected["reason"] == reason
