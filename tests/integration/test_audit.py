"""End to end: a reply signed with a key the coordinator does not know is rejected in a live run, and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.release import simulated_institution, site_folder
from common.audit.keys import Signer, write_key_pair
from simulations.provision import provision_sites

from run_cli import fedstill

pytestmark = pytest.mark.integration


def test_forged_replies_are_rejected_before_aggregation_and_recorded(tmp_path: Path, home: Path) -> None:
    # Prepare: three institutions are on the allow-list, but institution 2 now signs with a key it made
    # itself (an impostor, or a stolen identity): its replies must never reach the aggregate.
    keys = tmp_path / "keys"
    overrides = provision_sites(keys, 3)
    impostor = Signer.generate(simulated_institution(2))
    write_key_pair(impostor, site_folder(overrides["sites-dir"], 2), overwrite=True)
    out = tmp_path / "runs"

    # Execute
    result = fedstill(
        "simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", 'run-name="forged"',
        "--set", f'allow-list="{overrides["allow-list"]}"', "--set", f'sites-dir="{overrides["sites-dir"]}"', home=home,
    )

    # Assert: the run completes with the two genuine institutions
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "forged"
    results = json.loads((run / "results.json").read_text())
    for row in results["rounds"]:
        assert row["clients_replied"] == 2
        (reason,) = row["clients_rejected"].values()
        assert "AuditError" in reason and "signed with key" in reason
    entries = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    rejected = [e["body"] for e in entries if e["kind"] == "reply-rejected"]
    assert [(r["round"], r["check"], r["institution_id"]) for r in rejected] == [
        (1, "allow-list", "institution-2"), (2, "allow-list", "institution-2")]
    # rejected before aggregation: the aggregated entry of each round follows its rejection and omits the node
    for round_ in (1, 2):
        order = [e["kind"] for e in entries if e["body"].get("round") == round_]
        assert order.index("reply-rejected") < order.index("aggregated")
        (aggregated,) = [e["body"] for e in entries if e["kind"] == "aggregated" and e["body"]["round"] == round_]
        assert "institution-2" not in aggregated["institutions"] and len(aggregated["nodes"]) == 2
    # the record holds: the genuine logs match the ledger, the impostor's log is not on the allow-list's key
    genuine = [str(site_folder(overrides["sites-dir"], i) / "release-log.jsonl") for i in (0, 1)]
    ok = fedstill("audit", "verify", str(run / "ledger.jsonl"), *[a for log in genuine for a in ("-c", log)], home=home)
    assert ok.returncode == 0, ok.stdout
    forged_log = str(site_folder(overrides["sites-dir"], 2) / "release-log.jsonl")
    refused = fedstill("audit", "verify", str(run / "ledger.jsonl"), "-c", forged_log, home=home)
    assert refused.returncode == 1 and "trust anchor" in refused.stdout
