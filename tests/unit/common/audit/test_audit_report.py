"""Unit tests of `fedstill audit report` (common/audit/report.py and its CLI command), on small but real ledgers
and release logs: signed with fresh Ed25519 keys, hash-chained, with genuine attestations."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.release import Identity
from common.audit import kinds
from common.audit.attestation import attest
from common.audit.keys import Signer
from common.audit.ledger import Ledger
from common.audit.report import BYTES_PLOT, EPSILON_PLOT, HTML_FILE, JSON_FILE, MARKDOWN_FILE, build_report, write_report
from common.errors import ConfigError
from simulations.cli.main import app

from audit_fixtures import witness_ledger_end

INSTITUTIONS = ("inst-a", "inst-b")
NODES = {"inst-a": "11", "inst-b": "22"}
GAUSSIAN = {"mechanism": "gaussian", "parameters": {"sigma": 2.0}, "epsilon": 0.5, "delta": 1e-06}
REAL_RUN = Path("/tmp/fsruns/audit1")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def signers() -> dict[str, Signer]:
    return {name: Signer.generate(name) for name in (kinds.COORDINATOR, *INSTITUTIONS)}


def payload_bytes(round_: int, name: str) -> int:
    return 1000 * round_ + INSTITUTIONS.index(name) + 1  # inst-a: 1001, 2001; inst-b: 1002, 2002


def fabricate_run(
    folder: Path, signers: dict[str, Signer], run_id: str = "1001", rejected: tuple[str, int, str] = ("inst-b", 2, "digest"),
    digest_round: int | None = None, after_round: Callable[[Ledger, int], None] | None = None,
) -> Path:
    """A finished 2-round run of inst-a and inst-b: the coordinator's ledger and both release logs under `folder`.

    inst-a releases with a Gaussian mechanism (epsilon 0.5 a round), inst-b without one. The reply named by
    `rejected` (institution, round, check) is rejected: with its attestation, or, for "timeout", without
    (the coordinator never read it), though the institution logged the release. With `digest_round`, that
    round also has a FedMD digest phase whose replies (50 bytes each) are accepted. `after_round` may add entries of
    its own after each round's checkpoint (a cosignature, a refusal).
    """
    allow_list = {name: signers[name].public for name in INSTITUTIONS}
    ledger = Ledger.open(folder / "ledger.jsonl", signers[kinds.COORDINATOR], {"run_name": folder.name, "allow_list": allow_list})
    logs = {name: Ledger.open(folder / "sites" / name / "release-log.jsonl", signers[name], {"institution_id": name})
            for name in INSTITUTIONS}
    ledger.append(kinds.RUN_STARTED, {"run_id": run_id, "run_name": folder.name, "scenario": "unit", "method": "distill",
                                      "aggregation": "mean", "codec": "float16", "num_server_rounds": 2, "config_sha256": "c" * 64,
                                      "config": {}})
    for round_ in (1, 2):
        query = hashlib.sha256(f"query {run_id} {round_}".encode()).hexdigest()
        ledger.append(kinds.ROUND_OPENED, {"round": round_, "nodes": list(NODES.values()), "query_sha256": query, "temperature": 3.0,
                                           "codec": "float16", "samples": 100, "public_fingerprint": "f" * 64})
        accepted = []
        for name in INSTITUTIONS:
            digest, size = hashlib.sha256(f"{run_id} {round_} {name}".encode()).hexdigest(), payload_bytes(round_, name)
            privacy = {**GAUSSIAN, "epsilon_total": 0.5 * round_} if name == "inst-a" else None
            categories = ["soft labels on public samples"] + (["teacher accuracy"] if round_ == 2 else [])
            attestation = attest(signers[name], run_id=int(run_id), round_=round_, node_id=int(NODES[name]), public_fingerprint="f" * 64,
                                 query_sha256=query, payload_sha256=digest, payload_bytes=size, data_categories=categories, privacy=privacy,
                                 payload={"kind": "soft-labels", "codec": "float16",
                                          "arrays": {"probs": {"dtype": "float16", "shape": [100, 10]}}})
            logs[name].append(kinds.RELEASE, {"run_id": run_id, "round": round_, "node_id": NODES[name],
                                              "attestation": attestation.as_dict()})
            if (name, round_) == rejected[:2]:
                timeout = rejected[2] == "timeout"
                ledger.append(kinds.REPLY_REJECTED, {"round": round_, "phase": "soft-labels", "node_id": NODES[name],
                                                     "institution_id": None if timeout else name, "check": rejected[2],
                                                     "reason": f"{rejected[2]} check failed",
                                                     "attestation": None if timeout else attestation.as_dict()})
                continue
            ledger.append(kinds.REPLY_ACCEPTED, {"round": round_, "phase": "soft-labels", "node_id": NODES[name], "institution_id": name,
                                                 "payload_sha256": digest, "payload_bytes": size, "uplink_bytes": size + 100,
                                                 "attestation": attestation.as_dict()})
            accepted.append(name)
        ledger.append(kinds.AGGREGATED, {"round": round_, "rule": "mean", "nodes": [NODES[n] for n in accepted], "institutions": accepted,
                                         "samples_kept": 100, "ensemble_sha256": "e" * 64})
        if round_ == digest_round:
            fabricate_digest_phase(ledger, logs, signers, run_id, round_)
        ledger.append(kinds.CHECKPOINT, {"round": round_, "file": "student.safetensors", "sha256": f"{round_}" * 64,
                                         "student_accuracy": 0.5})
        if after_round is not None:
            after_round(ledger, round_)
    ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": 2, "student_sha256": "2" * 64})
    witness_ledger_end(ledger, {int(NODES[name]): Identity(signers[name], logs[name].path) for name in INSTITUTIONS})
    return folder / "ledger.jsonl"


def fabricate_digest_phase(ledger: Ledger, logs: dict[str, Ledger], signers: dict[str, Signer], run_id: str, round_: int) -> None:
    """FedMD: the consensus goes down (digest-opened) and each institution's digest losses come back, signed and accepted."""
    query = hashlib.sha256(f"digest {run_id} {round_}".encode()).hexdigest()
    ledger.append(kinds.DIGEST_OPENED, {"round": round_, "nodes": list(NODES.values()), "query_sha256": query, "samples": 100,
                                        "digest_epochs": 1, "revisit_epochs": 0})
    for name in INSTITUTIONS:
        digest = hashlib.sha256(f"digest {run_id} {round_} {name}".encode()).hexdigest()
        attestation = attest(signers[name], run_id=int(run_id), round_=round_, node_id=int(NODES[name]), public_fingerprint="f" * 64,
                             query_sha256=query, payload_sha256=digest, payload_bytes=50, data_categories=["digest losses"],
                             payload={"kind": "digest-losses", "codec": None, "arrays": {}})
        logs[name].append(kinds.RELEASE, {"run_id": run_id, "round": round_, "node_id": NODES[name], "attestation": attestation.as_dict()})
        ledger.append(kinds.REPLY_ACCEPTED, {"round": round_, "phase": "digest", "node_id": NODES[name], "institution_id": name,
                                             "payload_sha256": digest, "payload_bytes": 50, "uplink_bytes": 60,
                                             "attestation": attestation.as_dict()})


def release_logs(folder: Path) -> list[Path]:
    return sorted(folder.glob("sites/*/release-log.jsonl"))


# ---------------------------------------------------------------------------------------------------
# build_report
# ---------------------------------------------------------------------------------------------------


def test_one_run_is_verified_and_counted_per_institution(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)

    # Execute
    report = build_report([ledger], release_logs(tmp_path / "run1"))

    # Assert
    assert report["verified"] is True
    assert [entry["ok"] for entry in report["ledgers"]] == [True]
    a, b = report["institutions"]["inst-a"], report["institutions"]["inst-b"]
    assert a["runs"] == ["run1"] and a["rounds"] == {"run1": [1, 2]} and b["rounds"] == {"run1": [1, 2]}
    assert (a["releases_accepted"], a["releases_rejected"]) == (2, 0)
    assert (b["releases_accepted"], b["releases_rejected"]) == (1, 1)
    assert a["bytes_accepted"] == a["bytes_sent"] == 1001 + 2001
    assert (b["bytes_accepted"], b["bytes_sent"]) == (1002, 1002 + 2002)
    assert a["data_categories"] == ["soft labels on public samples", "teacher accuracy"]
    assert a["first_release"] <= a["last_release"] and a["unverified_runs"] == []


def test_rejections_keep_their_check_and_reason(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)

    # Execute
    report = build_report([ledger])

    # Assert
    assert report["institutions"]["inst-a"]["rejections"] == []
    [rejection] = report["institutions"]["inst-b"]["rejections"]
    assert (rejection["run"], rejection["round"], rejection["node_id"]) == ("run1", 2, "22")
    assert (rejection["check"], rejection["reason"], rejection["attested"]) == ("digest", "digest check failed", True)


def test_privacy_is_listed_per_release_and_summed(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)

    # Execute
    report = build_report([ledger])

    # Assert
    a, b = report["institutions"]["inst-a"], report["institutions"]["inst-b"]
    assert ([(p["round"], p["epsilon"], p["epsilon_total"], p["delta"]) for p in a["privacy"]]
            == [(1, 0.5, 0.5, 1e-06), (2, 0.5, 1.0, 1e-06)])
    assert a["privacy_mechanisms"] == ["gaussian"]
    assert a["privacy_summary"]["epsilon_sum"] == 1.0 and a["privacy_summary"]["no_guarantee"] is False
    # no mechanism: listed (the rejected release left inst-b too) with no epsilon at all, never 0: no guarantee
    assert ([(p["mechanism"], p["guarantee"], p["epsilon"], p["epsilon_total"], p["outcome"]) for p in b["privacy"]]
            == [("none", "none", None, None, "accepted"), ("none", "none", None, None, "rejected")])
    assert b["privacy_summary"]["no_guarantee"] is True and b["privacy_summary"]["guarantee"] == "none"
    assert (b["privacy_summary"]["epsilon_sum"], b["privacy_summary"]["epsilon_max"]) == (None, None)
    assert b["privacy_runs"]["run1"]["guarantee"] == "none" and b["privacy_runs"]["run1"]["epsilon_sum"] is None
    assert a["privacy_runs"]["run1"]["epsilon_sum"] == 1.0 and a["privacy_summary"]["guarantee"] == "differential privacy"


def test_run_summary_names_the_run_and_its_outcome(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers, run_id="777")

    # Execute
    [run] = build_report([ledger])["runs"]

    # Assert
    assert (run["run"], run["run_ids"], run["status"], run["rounds"], run["aggregation"]) == ("run1", ["777"], "completed", 2, "mean")
    assert run["student_sha256"] == "2" * 64 and run["verified"] is True
    assert run["institutions"] == ["inst-a", "inst-b"]


def test_release_logs_are_matched_to_the_ledger(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)

    # Execute
    logs = {log["institution"]: log for log in build_report([ledger], release_logs(tmp_path / "run1"))["release_logs"]}

    # Assert
    assert (logs["inst-a"]["releases"], logs["inst-a"]["accepted"], logs["inst-a"]["all_in_ledger"]) == (2, 2, True)
    assert (logs["inst-b"]["accepted"], logs["inst-b"]["rejected"], logs["inst-b"]["missing"]) == (1, 1, [])
    assert logs["inst-a"]["checked_against"] == ["run1"]


def test_a_timed_out_reply_is_attributed_through_its_node_and_counted_late(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers, rejected=("inst-b", 2, "timeout"))

    # Execute
    report = build_report([ledger], release_logs(tmp_path / "run1"))

    # Assert
    b = report["institutions"]["inst-b"]
    assert report["verified"] is True
    assert [(r["check"], r["attested"]) for r in b["rejections"]] == [("timeout", False)]
    [log] = [log for log in report["release_logs"] if log["institution"] == "inst-b"]
    assert (log["late"], log["all_in_ledger"]) == (1, True)
    # the late release left inst-b all the same: its release log's statement is counted
    assert (b["releases_only_logged"], b["bytes_accepted"], b["bytes_sent"]) == (1, 1002, 1002 + 2002)
    assert [p["outcome"] for p in b["privacy"]] == ["accepted", "late"]


def test_without_release_logs_a_timed_out_reply_sends_no_known_bytes(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers, rejected=("inst-b", 2, "timeout"))

    # Execute
    b = build_report([ledger])["institutions"]["inst-b"]

    # Assert
    assert (b["releases_rejected"], b["bytes_sent"], len(b["privacy"])) == (1, 1002, 1)


def test_fedmd_digest_replies_are_releases_too(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers, digest_round=1)

    # Execute
    report = build_report([ledger], release_logs(tmp_path / "run1"))

    # Assert
    a = report["institutions"]["inst-a"]
    assert report["verified"] is True, report["ledgers"]
    assert (a["releases_accepted"], a["bytes_accepted"], a["rounds"]) == (3, 1001 + 50 + 2001, {"run1": [1, 2]})
    assert [(p["round"], p["phase"]) for p in a["per_round"]] == [(1, "soft-labels"), (1, "digest"), (2, "soft-labels")]
    assert "digest losses" in a["data_categories"] and report["runs"][0]["digests_opened"] == 1
    assert all(log["all_in_ledger"] and log["releases"] == 3 for log in report["release_logs"])


def test_two_runs_are_aggregated_per_institution(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    first = fabricate_run(tmp_path / "run1", signers, run_id="1001")
    second = fabricate_run(tmp_path / "run2", signers, run_id="2002", rejected=("inst-a", 1, "statement"))

    # Execute
    report = build_report([first, second], release_logs(tmp_path / "run1") + release_logs(tmp_path / "run2"))

    # Assert
    assert report["verified"] is True, report["ledgers"]
    assert [run["run"] for run in report["runs"]] == ["run1", "run2"]
    a, b = report["institutions"]["inst-a"], report["institutions"]["inst-b"]
    assert a["runs"] == ["run1", "run2"] and a["rounds"] == {"run1": [1, 2], "run2": [1, 2]}
    assert (a["releases_accepted"], a["releases_rejected"], b["releases_accepted"], b["releases_rejected"]) == (3, 1, 3, 1)
    assert a["bytes_sent"] == 2 * (1001 + 2001) and a["bytes_accepted"] == 1001 + 2 * 2001
    assert [(r["run"], r["check"]) for r in a["rejections"]] == [("run2", "statement")]
    assert len(a["privacy"]) == 4 and a["privacy_summary"]["epsilon_sum"] == 2.0
    assert ([ledger["release_logs"] for ledger in report["ledgers"]]
            == [[str(p) for p in release_logs(tmp_path / run)] for run in ("run1", "run2")])
    assert report["rounds_axis"] == [["run1", 1], ["run1", 2], ["run2", 1], ["run2", 2]]


def test_an_altered_ledger_is_reported_as_not_verified_but_still_read(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)
    text = ledger.read_text(encoding="utf-8")
    ledger.write_text(text.replace('"payload_bytes":1001,"payload_sha256"', '"payload_bytes":9001,"payload_sha256"', 1), encoding="utf-8")

    # Execute
    report = build_report([ledger], release_logs(tmp_path / "run1"))

    # Assert
    assert report["verified"] is False
    [entry] = report["ledgers"]
    assert entry["ok"] is False and any("entry hash" in problem for problem in entry["problems"])
    assert report["runs"][0]["verified"] is False
    a = report["institutions"]["inst-a"]
    assert a["unverified_runs"] == ["run1"] and a["releases_accepted"] == 2


def test_a_release_missing_from_the_ledger_is_reported(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: inst-a logs a third release the coordinator never recorded
    ledger = fabricate_run(tmp_path / "run1", signers)
    extra = attest(signers["inst-a"], run_id=1001, round_=2, node_id=11, public_fingerprint="f" * 64, query_sha256="0" * 64,
                   payload_sha256="9" * 64, payload_bytes=5, payload={}, data_categories=[])
    log = Ledger.open(tmp_path / "run1" / "sites" / "inst-a" / "release-log.jsonl", signers["inst-a"])
    log.append(kinds.RELEASE, {"run_id": "1001", "round": 2, "node_id": "11", "attestation": extra.as_dict()})

    # Execute
    report = build_report([ledger], release_logs(tmp_path / "run1"))

    # Assert
    [entry] = [log for log in report["release_logs"] if log["institution"] == "inst-a"]
    assert (entry["releases"], entry["missing"], entry["all_in_ledger"]) == (3, [{"run": "run1", "round": 2}], False)
    a = report["institutions"]["inst-a"]
    assert (a["releases_only_logged"], a["bytes_sent"], a["privacy"][-1]["outcome"]) == (1, 1001 + 2001 + 5, "not in the ledger")
    assert report["verified"] is False  # the verifier's cross-check fails too


def test_an_empty_release_log_is_checked_against_the_runs_of_its_institution(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: a log of inst-a, kept elsewhere, that holds no release at all
    ledger = fabricate_run(tmp_path / "run1", signers)
    empty = Ledger.open(tmp_path / "elsewhere" / "release-log.jsonl", signers["inst-a"], {"institution_id": "inst-a"}).path

    # Execute
    report = build_report([ledger], [empty])

    # Assert
    assert report["release_logs"][0]["checked_against"] == ["run1"]
    assert report["verified"] is False and any("its log does not" in p for p in report["ledgers"][0]["problems"])


def test_a_missing_file_is_a_config_error(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)

    # Execute / Assert
    with pytest.raises(ConfigError, match="release log .*nowhere.jsonl not found"):
        build_report([ledger], [tmp_path / "nowhere.jsonl"])
    with pytest.raises(ConfigError, match="no ledger given"):
        build_report([])


# ---------------------------------------------------------------------------------------------------
# write_report
# ---------------------------------------------------------------------------------------------------


def test_write_report_writes_json_markdown_and_plots(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    report = build_report([fabricate_run(tmp_path / "run1", signers)], release_logs(tmp_path / "run1"))

    # Execute
    paths = write_report(report, tmp_path / "out")

    # Assert
    assert [p.name for p in paths] == [JSON_FILE, MARKDOWN_FILE, HTML_FILE, BYTES_PLOT, EPSILON_PLOT]
    assert json.loads(paths[0].read_text(encoding="utf-8")) == report
    page = paths[1].read_text(encoding="utf-8")
    assert page.index("## Verification") < page.index("## Institutions") < page.index("## Rejections") < page.index("## Privacy")
    assert "**VERIFIED**" in page and "| inst-b | 1 | run1: 1, 2 | 1 | 1 | 1,002 | 3,004 |" in page
    assert f"![bytes released per round]({BYTES_PLOT})" in page and "digest check failed" in page
    assert "| inst-b | none | 2 | no formal privacy guarantee | no formal privacy guarantee |" in page  # never epsilon 0
    assert paths[2].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert all(p.read_bytes().startswith(PNG) for p in paths[3:])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temporary files left


def test_the_page_of_an_altered_ledger_says_not_verified(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)
    lines = ledger.read_text(encoding="utf-8").splitlines(keepends=True)
    ledger.write_text("".join(lines[:3] + lines[4:]), encoding="utf-8")  # an entry deleted

    # Execute
    write_report(build_report([ledger]), tmp_path)

    # Assert
    page = (tmp_path / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert "**NOT VERIFIED**" in page and "**FAILED**" in page and "sequence" in page and "*(unverified" in page


# ---------------------------------------------------------------------------------------------------
# fedstill audit report
# ---------------------------------------------------------------------------------------------------


def test_cli_report_writes_its_files_beside_the_ledger(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)
    pub = tmp_path / "coordinator.pub"
    pub.write_text(signers[kinds.COORDINATOR].public + "\n", encoding="ascii")
    logs = [arg for log in release_logs(tmp_path / "run1") for arg in ("--client-log", str(log))]

    # Execute
    result = CliRunner().invoke(app, ["audit", "report", str(ledger), *logs, "--coordinator-key", str(pub)])

    # Assert
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "inst-b: 1 run(s), 2 round(s), 1 accepted, 1 rejected" in result.output
    for name in (JSON_FILE, MARKDOWN_FILE, HTML_FILE, BYTES_PLOT, EPSILON_PLOT):
        assert (tmp_path / "run1" / name).is_file()


def test_cli_report_exits_1_on_an_altered_ledger_after_writing_the_report(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)
    ledger.write_text(ledger.read_text(encoding="utf-8").replace('"reason":"digest check failed"', '"reason":"late"'), encoding="utf-8")

    # Execute
    result = CliRunner().invoke(app, ["audit", "report", str(ledger), "--out", str(tmp_path / "out")])

    # Assert
    assert result.exit_code == 1
    assert "NOT VERIFIED" in result.output
    assert json.loads((tmp_path / "out" / JSON_FILE).read_text(encoding="utf-8"))["verified"] is False


def test_cli_report_exits_1_with_a_clean_message_for_a_missing_ledger(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(app, ["audit", "report", str(tmp_path / "ledger.jsonl"), "--out", str(tmp_path / "out")])

    # Assert
    assert result.exit_code == 1
    assert "ConfigError" in result.output and "not found" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (REAL_RUN / "ledger.jsonl").is_file(), reason="no simulated run at /tmp/fsruns/audit1")
def test_cli_report_on_a_copy_of_a_simulated_run(tmp_path: Path) -> None:
    # Prepare
    run = Path(shutil.copytree(REAL_RUN, tmp_path / "audit1"))
    logs = [arg for log in release_logs(run) for arg in ("-c", str(log))]

    # Execute
    result = CliRunner().invoke(app, ["audit", "report", str(run / "ledger.jsonl"), *logs,
                                      "--coordinator-key", str(run / "coordinator.pub"), "--allow-list", str(run / "allow-list.toml")])

    # Assert
    assert result.exit_code == 0, result.output
    report = json.loads((run / JSON_FILE).read_text(encoding="utf-8"))
    assert report["verified"] is True and report["runs"][0]["status"] == "completed"
    rounds = list(range(1, report["runs"][0]["rounds"] + 1))
    assert all(inst["rounds"] == {"audit1": rounds} and inst["releases_accepted"] >= len(rounds)
               for inst in report["institutions"].values())
    assert all(log["all_in_ledger"] for log in report["release_logs"])
