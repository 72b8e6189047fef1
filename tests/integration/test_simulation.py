"""End to end: `fedstill simulate` runs a real Flower simulation (Ray backend, local SuperLink)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from common.models.registry import build_model

from run_cli import fedstill

pytestmark = pytest.mark.integration


def test_tiny_federation_runs_end_to_end(tmp_path: Path, home: Path) -> None:
    # Prepare
    out = tmp_path / "runs"

    # Execute
    result = fedstill("simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", 'run-name="e2e"', home=home)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "e2e"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["scenario"]["num-clients"] == 3
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for row in results["rounds"]:
        assert row["clients_replied"] == 3 and row["clients_rejected"] == {}
        per_client = list(row["uplink_bytes_per_client"].values())
        # 400 public samples x 10 classes x 1 byte of uint8, plus record framing and the attestation
        assert all(4_000 < b < 8_000 for b in per_client), per_client
        assert row["uplink_bytes"] == sum(per_client)
        # each teacher continues training from the previous round rather than starting over
        assert set(row["teacher_rounds"].values()) == {row["round"]}
    final = results["final"]
    assert 0.0 < final["student_accuracy"] <= 1.0
    assert final["teacher_accuracy_mean"] is not None
    assert final["student_params"] * 3 < final["largest_teacher_params"]
    student = build_model("cnn-student", 10, (8, 8))
    student.load_state_dict(load_file(str(run / "student.safetensors")))
    assert (run / "accuracy.png").stat().st_size > 0
    assert "student accuracy" in result.stdout
    page = (run / "report.md").read_text()  # the human report
    assert f"| student accuracy (test) | {final['student_accuracy']:.4f} |" in page and "## Audit" in page
    # the run is audited: a ledger and three release logs that `fedstill audit verify` accepts
    assert results["audit"]["signatures_checked"] is True
    assert sorted(results["audit"]["institutions"].values()) == ["institution-0", "institution-1", "institution-2"]
    logs = sorted(str(p) for p in (run / "sites").glob("*/release-log.jsonl"))
    assert len(logs) == 3
    verified = fedstill("audit", "verify", str(run / "ledger.jsonl"), "--coordinator-key", str(run / "coordinator.pub"),
                        *[arg for log in logs for arg in ("--client-log", log)], home=home)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout and "3 release log(s) match the ledger" in verified.stdout


def test_fedavg_weights_leave_signed_and_the_ledger_verifies_with_the_release_logs(tmp_path: Path, home: Path) -> None:
    # Prepare
    out = tmp_path / "runs"

    # Execute
    result = fedstill("simulate", "digits-tiny", "--set", 'method="fedavg"', "--set", f"output-dir={out}",
                      "--set", 'run-name="fedavg"', home=home)

    # Assert: every round's weights signed by each institution, checked and recorded, and the record verifies
    assert result.returncode == 0, result.stdout + result.stderr
    run = out / "fedavg"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and [r["clients_replied"] for r in results["rounds"]] == [3, 3]
    entries = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    accepted = [e["body"] for e in entries if e["kind"] == "reply-accepted" and e["body"]["phase"] != "witness"]
    assert len(accepted) == 6 and all(b["phase"] == "fedavg" and b["attestation"] for b in accepted)
    witnessed = [e["body"]["institution_id"] for e in entries if e["kind"] == "cosigned"]
    assert sorted(witnessed[-3:]) == ["institution-0", "institution-1", "institution-2"]  # the final head, by all
    assert [e["body"]["rule"] for e in entries if e["kind"] == "aggregated"] == ["fedavg", "fedavg"]
    logs = sorted(str(p) for p in (run / "sites").glob("*/release-log.jsonl"))
    assert len(logs) == 3
    verified = fedstill("audit", "verify", str(run / "ledger.jsonl"), "--coordinator-key", str(run / "coordinator.pub"),
                        *[arg for log in logs for arg in ("--client-log", log)], home=home)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout and "3 release log(s) match the ledger" in verified.stdout


def test_failed_run_exits_nonzero_with_reason(tmp_path: Path, home: Path) -> None:
    # Prepare: no node can answer within a millisecond, so round 1 misses its quorum
    out = tmp_path / "runs"

    # Execute
    result = fedstill("simulate", "digits-tiny", "--set", f"output-dir={out}", "--set", "round-timeout=0.001",
                      "--set", 'run-name="fails"', "--set", "num-server-rounds=1", home=home)

    # Assert
    assert result.returncode == 1
    assert "QuorumError" in result.stdout and "min-clients" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    kept = json.loads((out / "fails" / "results.json").read_text())
    assert kept["audit"]["rejections"] == 3  # the three late replies are in the ledger, with the reason
    verified = fedstill("audit", "verify", str(out / "fails" / "ledger.jsonl"), home=home)
    assert verified.returncode == 0, verified.stdout
    assert kept["status"] == "failed" and "QuorumError" in kept["error"] and kept["rounds"] == []
    assert "Status: **failed** (QuorumError" in (out / "fails" / "report.md").read_text()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("bogus-key=1", "unknown key 'bogus-key'"),
        ("temperature=\"hot\"", "key 'temperature' must be float"),
        ("data-dir=/no/such/folder", "Fashion-MNIST folder /no/such/folder does not exist"),
    ],
)
def test_bad_input_fails_fast_without_traceback(setting: str, expected: str, home: Path) -> None:
    # Execute
    result = fedstill("simulate", "--set", setting, home=home, timeout=120)

    # Assert
    assert result.returncode == 1
    assert expected in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_compare_runs_methods_and_baselines(tmp_path: Path, home: Path) -> None:
    # Prepare: one rule, one variant using FedMD, top-k codec, sampling, schedule and two-stage student
    out = tmp_path / "runs"
    variant = ('fedmd:digest-epochs=1,revisit-epochs=1,codec="topk",codec-top-k=2,public-fraction=0.5,'
               'student-head-epochs=1,temperature-schedule="linear",temperature-final=1.0')

    # Execute
    result = fedstill("compare", "digits-tiny", "--rules", "expertise", "--method", variant,
                      "--fedavg-rounds", "2", "--set", f"output-dir={out}", "--set", 'run-name="cmp"', home=home)

    # Assert
    assert result.returncode == 0, result.stdout + result.stderr
    folder = out / "compare-cmp"
    summary = json.loads((folder / "results.json").read_text())
    assert set(summary["methods"]) == {"expertise", "fedmd"}
    fedmd = summary["methods"]["fedmd"]["rounds"]
    assert [r["temperature"] for r in fedmd] == [3.0, 1.0]
    assert all(r["distilled_samples"] == 200 for r in fedmd)
    # top-2 of 200 rows: 200 x 2 x (2 value bytes + 1 index byte), plus framing and the signed attestation
    assert all(1_200 < b < 6_000 for r in fedmd for b in r["uplink_bytes_per_client"].values())
    assert fedmd[0]["digest_failed"] == {} and fedmd[0]["downlink_bytes"] > summary["methods"]["expertise"]["rounds"][0]["downlink_bytes"]
    fedavg = summary["baselines"]["fedavg"]["rounds"]
    assert len(fedavg) == 2
    # FedAvg sends the student's weights: 13,706 float32 parameters per client per round
    assert all(b > 13_706 * 4 for r in fedavg for b in r["uplink_bytes_per_client"].values())
    assert len(summary["baselines"]["local_only"]["per_client"]) == 3
    assert summary["baselines"]["centralised"]["teacher"]["model"] == "cnn-large"
    table = (folder / "comparison.md").read_text()
    assert "| fedmd |" in table and "| fedavg |" in table and "local-only" in table
    assert (folder / "accuracy_per_round.png").stat().st_size > 0
    assert (folder / "accuracy_vs_uplink.png").stat().st_size > 0
