"""End to end: privacy budgets institutions control, and secure aggregation, in real Flower simulations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from run_cli import fedstill

pytestmark = pytest.mark.integration


def test_secure_aggregation_survives_an_institution_out_of_budget_after_sharing(tmp_path: Path, home: Path) -> None:
    # Prepare: four institutions under secure aggregation and PATE; answers at sigma 8 cost epsilon 14.1 in round 1
    # and bring the total to 22.0 in round 2; institution 3 allows itself 21, the others 30. In round 2 it gives
    # its shares, then refuses to answer, so its pairwise masks must be removed with its rebuilt mask key.
    out = tmp_path / "runs"

    # Execute
    result = fedstill(
        "simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", 'run-name="dropout"',
        "--set", "num-clients=4", "--set", "min-clients=3", "--set", "secure-aggregation=true",
        "--set", 'aggregation="mean"',
        "--set", 'privacy="pate"', "--set", "pate-teachers=3", "--set", "pate-queries=200", "--set", "pate-sigma=8.0",
        "--site", "max-epsilon=30", "--site", "institution-3.max-epsilon=21", home=home,
    )

    # Assert: round 2 goes on with the three institutions that can still pay
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "dropout"
    results = json.loads((run / "results.json").read_text())
    assert [row["clients_replied"] for row in results["rounds"]] == [4, 3]
    # the server opened only sums: every soft-label reply was masked, in every round's five secure exchanges
    entries = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    phases = [e["body"]["phase"] for e in entries if e["kind"] == "exchange-opened"]
    assert phases == ["secagg-keys", "secagg-bundles", "secagg-inbox", "secagg-consistency", "secagg-shares"] * 2 \
        + ["witness"]  # after the closing entry, the institutions cosign the final tree head
    masked = [json.loads(e["body"]["attestation"]["statement"]) for e in entries
              if e["kind"] == "reply-accepted" and e["body"]["phase"] == "soft-labels"]
    assert len(masked) == 4 + 3 and {m["payload"]["kind"] for m in masked} == {"secagg-masked"}
    # institution 3 shared, then refused; the sum was opened over the three others
    round_two = [e["body"] for e in entries if e["body"].get("round") == 2 and e["kind"].startswith("reply-")]
    shared = {b["node_id"] for b in round_two if b["phase"] == "secagg-bundles" and "check" not in b}
    refused = [b for b in round_two if b["phase"] == "soft-labels" and b.get("check") == "privacy-budget"]
    assert len(shared) == 4 and len(refused) == 1 and refused[0]["node_id"] in shared
    unmasked = [e["body"] for e in entries if e["kind"] == "exchange-opened" and e["body"]["round"] == 2
                and e["body"]["phase"] == "secagg-shares"]
    assert len(unmasked) == 1 and len(unmasked[0]["nodes"]) == 3
    # each institution spent within its own budget, and the refusal says which budget
    privacy = results["privacy"]
    everyone = [f"institution-{i}" for i in range(4)]
    assert [sorted(r["institutions"]) for r in privacy["epsilon_per_round"]] == [everyone, everyone[:3]]
    assert 14.0 < privacy["epsilon_per_round"][0]["institutions"]["institution-3"]["epsilon_total"] <= 21
    assert privacy["epsilon_max"] <= 30 and privacy["delta"] == [1e-05]
    (refusal,) = privacy["refusals"]
    assert refusal["round"] == 2 and refusal["institution_id"] == "institution-3"
    assert "PrivacyBudgetExceeded" in refusal["reason"] and "max-epsilon 21" in refusal["reason"]
    # the institution's own ledger holds only what it spent; the record verifies with every release log
    ledger = json.loads((run / "sites" / "institution-3" / "privacy-ledger.json").read_text())
    assert len(ledger["entries"]) == 1 and ledger["delta"] == 1e-05
    logs = sorted(str(p) for p in (run / "sites").glob("*/release-log.jsonl"))
    assert len(logs) == 4
    verified = fedstill("audit", "verify", str(run / "ledger.jsonl"), *[a for log in logs for a in ("-c", log)], home=home)
    assert verified.returncode == 0, verified.stdout


def test_dp_sgd_trains_scatter_linear_teachers_and_spends_each_budget(tmp_path: Path, home: Path) -> None:
    # Prepare: fixed scattering features (no weights) and a linear layer, trained by DP-SGD in each ClientApp
    out = tmp_path / "runs"

    # Execute
    result = fedstill("simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", 'run-name="scatter"',
                      "--set", 'privacy="dp-sgd"', "--set", 'teacher-models="scatter-linear"',
                      "--site", "max-epsilon=4", home=home)

    # Assert: every institution spent its budget (noise calibrated to it) and no more; the teachers are the
    # linear layer on 81 channels of 2 x 2 (8 x 8 digits); the student learnt from their soft labels
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((out / "scatter" / "results.json").read_text())
    finals = results["privacy"]["epsilon_final"]
    assert len(finals) == 3 and all(3.9 < eps <= 4.0 for eps in finals.values())
    assert set(results["final"]["teacher_params"].values()) == {81 * 2 * 2 * 10 + 10}
    assert results["final"]["student_accuracy"] > 0.2  # 10 classes: chance is 0.1
