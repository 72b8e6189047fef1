"""A coordinator that deviates: the real ClientApp handlers of two institutions (the suite's in-memory Grid
delivers the messages) refuse what their site policy refuses, before any training, with the policy line;
the server's exchange records each refusal in its ledger (check `site-policy`) and goes on while quorum holds."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client import client_app
from client.node_state import teacher_meta
from common.audit import kinds
from common.config import RunConfig, default_run_config
from common.errors import PolicyViolation
from common.messages import SHARES_TYPE, DigestInstruction, SecAggRoster, SoftLabelQuery
from common.secagg.protocol import RosterEntry
from common.tasks.registry import load_split
from common.tasks.samples import public_fingerprint
from server.audit_trail import AuditTrail
from server.results.privacy import privacy_section
from server.rounds import digest_round, make_query, require_quorum, soft_label_round
from simulations.provision import provision_sites

from grid import MemoryGrid

NODES = (11, 12)  # partition 0: the institution with a policy; partition 1: one without
RUN_ID = 7

pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    with torch.random.fork_rng():
        yield


class Federation(MemoryGrid):
    """Each message goes to the real ClientApp handler of its node, with that node's own state."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        super().__init__(nodes=NODES)
        self.mapping = mapping
        self.states = {node: RecordDict() for node in NODES}

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = Context(RUN_ID, node, {"partition-id": NODES.index(node), "num-partitions": len(NODES)},
                          self.states[node], self.mapping)
        return client_app.HANDLERS[message.metadata.message_type](message, context)


def federation(tmp_path: Path, policy: str | None = None, site: dict[str, Any] | None = None,
               **changes: Any) -> tuple[Federation, RunConfig, AuditTrail]:
    """Two provisioned institutions (keys, allow-list, sites); institution-0 writes `policy` as its site-policy.toml."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mapping = {**default_run_config(), "dataset": "digits", "public-size": 400, "num-clients": 2, "min-clients": 1,
               "partitioner": "iid", "num-server-rounds": 2, "teacher-models": "mlp", "local-epochs": 1,
               "dp-noise-multiplier": 1.0, "public-fraction": 1.0, **provision_sites(run_dir, len(NODES), site), **changes}
    if policy is not None:
        (Path(mapping["sites-dir"]) / "institution-0" / "site-policy.toml").write_text(policy, encoding="utf-8")
    cfg = RunConfig.from_run_config(mapping)
    return Federation(mapping), cfg, AuditTrail.open(cfg, run_dir, RUN_ID)


def query_for(cfg: RunConfig, round_: int = 1, **changes: Any) -> SoftLabelQuery:
    split = load_split(cfg.dataset, cfg.data_dir, cfg.public_size, cfg.seed)
    query = make_query(cfg, round_, public_fingerprint(split.public), len(split.public), split.public.num_classes)
    return dataclasses.replace(query, **changes)


def ledger_verdicts(trail: AuditTrail) -> list[tuple[str, str, str, str]]:
    """(kind, phase, node, check or '') of every reply entry in the coordinator's ledger."""
    out = []
    for entry in map(json.loads, trail.ledger.path.read_text().splitlines()):
        if entry["kind"] in (kinds.REPLY_ACCEPTED, kinds.REPLY_REJECTED):
            body = entry["body"]
            out.append((entry["kind"], body["phase"], body["node_id"], body.get("check", "")))
    return out


def rejection(trail: AuditTrail, node: int) -> dict[str, Any]:
    return next(e["body"] for e in map(json.loads, trail.ledger.path.read_text().splitlines())
                if e["kind"] == kinds.REPLY_REJECTED and e["body"]["node_id"] == str(node))


@pytest.mark.parametrize(("policy", "site", "line"), [
    (None, {"institutions": {"institution-0": {"max-epsilon": 4.0}}}, 'site-policy: max-epsilon = 4 refuses privacy "none"'),
    ("max-epsilon = 3.0\n", None, 'site-policy: max-epsilon = 3 refuses privacy "none"'),
    ('mechanisms = ["dp-sgd"]\n', None, 'site-policy: mechanisms = ["dp-sgd"] refuses privacy "none"'),
], ids=["budget-in-site-toml", "budget-in-policy", "mechanisms"])
def test_privacy_none_is_refused_by_a_node_with_a_budget_and_the_round_goes_on(
        tmp_path: Path, policy: str | None, site: dict | None, line: str) -> None:
    # Prepare
    grid, cfg, trail = federation(tmp_path, policy, site)

    # Execute
    replies = soft_label_round(grid, cfg, trail, query_for(cfg), list(NODES))

    # Assert: the policy node refused before reading its data or training; the other answered; quorum holds
    assert sorted(replies.accepted) == [12] and replies.checks == {11: "site-policy"}
    assert replies.rejected[11].startswith(f"node error: PolicyViolation: {line}")
    assert teacher_meta(grid.states[11]) is None and teacher_meta(grid.states[12]) is not None
    require_quorum(replies, cfg, 1)
    assert rejection(trail, 11)["check"] == "site-policy" and line in rejection(trail, 11)["reason"]
    assert str(tmp_path) not in rejection(trail, 11)["reason"]  # no local path reaches the server
    (refusal,) = privacy_section(cfg, trail.ledger.entries())["refusals"]  # results.json lists it
    assert refusal["check"] == "site-policy" and refusal["round"] == 1 and line in refusal["reason"]


def test_class_counts_under_dp_are_refused_before_training(tmp_path: Path) -> None:
    # Prepare
    grid, cfg, trail = federation(tmp_path, privacy="dp-sgd")

    # Execute
    replies = soft_label_round(grid, cfg, trail, query_for(cfg, want_class_counts=True), list(NODES))

    # Assert: both institutions (no policy file: the default under DP) refuse; nothing trained, nothing spent
    assert replies.accepted == {} and replies.checks == {11: "site-policy", 12: "site-policy"}
    assert "site-policy: class-counts = false (default) refuses per-class counts" in replies.rejected[12]
    assert all(teacher_meta(state) is None for state in grid.states.values())
    assert not list(Path(cfg.sites_dir).glob("*/privacy-ledger.json"))
    assert {check for _, _, _, check in ledger_verdicts(trail)} == {"site-policy"}


def test_a_second_query_in_one_round_is_refused(tmp_path: Path) -> None:
    # Prepare
    grid, cfg, trail = federation(tmp_path, "max-queries-per-round = 1\n")
    soft_label_round(grid, cfg, trail, query_for(cfg, round_=1), list(NODES))

    # Execute: the same round asked again, then the next round
    again = soft_label_round(grid, cfg, trail, query_for(cfg, round_=1), list(NODES))
    next_round = soft_label_round(grid, cfg, trail, query_for(cfg, round_=2), list(NODES))

    # Assert
    assert sorted(again.accepted) == [12] and again.checks == {11: "site-policy"}
    assert "site-policy: max-queries-per-round = 1 refuses query 2 of this round" in again.rejected[11]
    assert sorted(next_round.accepted) == [11, 12]
    assert [v for v in ledger_verdicts(trail) if v[0] == kinds.REPLY_REJECTED] == \
        [(kinds.REPLY_REJECTED, "soft-labels", "11", "site-policy")]


def test_more_samples_than_the_policy_allows_are_refused(tmp_path: Path) -> None:
    # Prepare
    grid, cfg, trail = federation(tmp_path, "max-samples-per-query = 100\n")

    # Execute
    replies = soft_label_round(grid, cfg, trail, query_for(cfg), list(NODES))  # all 400 public samples

    # Assert
    assert sorted(replies.accepted) == [12] and replies.checks == {11: "site-policy"}
    assert "site-policy: max-samples-per-query = 100 refuses a query for 400 public samples" in replies.rejected[11]
    assert teacher_meta(grid.states[11]) is None


def test_revisit_under_dp_is_refused_by_the_node_before_training(tmp_path: Path) -> None:
    # Prepare: the run config says no revisit (as the server-side check demands), the instruction asks for one
    grid, cfg, trail = federation(tmp_path, privacy="dp-sgd")
    query = query_for(cfg)
    consensus = np.full((len(query.sample_ids), 10), 0.1, dtype=np.float32)
    instruction = DigestInstruction(1, query.fingerprint, 2.0, query.sample_ids, consensus, digest_epochs=1, revisit_epochs=3)

    # Execute
    outcome = digest_round(grid, cfg, trail, instruction, list(NODES))

    # Assert
    assert outcome.accepted == {} and outcome.checks == {11: "site-policy", 12: "site-policy"}
    assert 'site-policy: max-revisit-epochs = 0 (always, under privacy "dp-sgd") refuses revisit-epochs 3' in outcome.rejected[11]
    assert all(teacher_meta(state) is None for state in grid.states.values())
    assert [v[1:] for v in ledger_verdicts(trail)] == [("digest", "11", "site-policy"), ("digest", "12", "site-policy")]


def test_under_dp_counts_are_rounded_the_loss_withheld_and_both_stated(tmp_path: Path) -> None:
    # Prepare
    grid, cfg, trail = federation(tmp_path, privacy="dp-sgd")

    # Execute
    replies = soft_label_round(grid, cfg, trail, query_for(cfg), [12])

    # Assert: accepted by the server; nothing in the clear beyond what the signed statement lists
    reply = replies.accepted[12]
    assert reply.num_examples % 100 == 0 and reply.num_examples >= 1
    assert math.isnan(reply.train_loss) and reply.class_counts is None
    privacy = json.loads(replies.attestations[12].statement)["privacy"]
    assert privacy["mechanism"] == "dp-sgd" and privacy["epsilon"] > 0
    assert privacy["released"]["num-examples"] == "rounded up to a multiple of 100"
    assert privacy["released"]["train-loss"] == "withheld (sent as NaN)"
    assert "sample_rate" not in privacy["parameters"] and "steps_per_round" not in privacy["parameters"]


def test_a_secure_aggregation_threshold_below_the_policy_is_refused_before_any_share_leaves(tmp_path: Path) -> None:
    # Prepare: institution-0 demands a threshold of 3; the coordinator asks for shares at threshold 2
    grid, cfg, _ = federation(tmp_path, "min-secagg-threshold = 3\n", **{"secure-aggregation": True, "aggregation": "mean",
                                                                            "num-clients": 3, "min-clients": 2})
    roster = {node: RosterEntry(i + 1, bytes([i + 1]) * 32, bytes([i + 2]) * 32) for i, node in enumerate(NODES)}
    message = Message(SecAggRoster(1, 2, False, roster).to_record(), dst_node_id=11, message_type=SHARES_TYPE,
                      group_id="1")
    context = Context(RUN_ID, 11, {"partition-id": 0, "num-partitions": 2}, grid.states[11], grid.mapping)

    # Execute / Assert
    with pytest.raises(PolicyViolation, match=r"^site-policy: min-secagg-threshold = 3 refuses a secure-aggregation "
                                              r"threshold of 2"):
        client_app.secagg_shares(message, context)


def ledger_events(cfg: RunConfig, institution: str) -> list[dict[str, Any]]:
    path = Path(cfg.sites_dir) / institution / "privacy-ledger.json"
    return [entry["event"] for entry in json.loads(path.read_text())["entries"]]


def test_under_dp_noised_counts_leave_once_per_run_accounted_and_stated(tmp_path: Path) -> None:
    # Prepare: institution-0 releases its counts noised; the rule asks for class counts every round
    grid, cfg, trail = federation(tmp_path, 'counts = "noised"\ncount-noise = 5.0\n', privacy="dp-sgd")

    # Execute
    first = soft_label_round(grid, cfg, trail, query_for(cfg, round_=1, want_class_counts=True), [11])
    second = soft_label_round(grid, cfg, trail, query_for(cfg, round_=2, want_class_counts=True), [11])

    # Assert: counts that add up, the same both rounds (released once), one Gaussian event in the ledger
    one, two = first.accepted[11], second.accepted[11]
    assert one.class_counts is not None and two.class_counts is not None
    assert int(one.class_counts.sum()) == one.num_examples and (one.class_counts >= 0).all()
    assert np.array_equal(one.class_counts, two.class_counts) and one.num_examples == two.num_examples
    assert one.class_counts.shape == (10,)
    events = ledger_events(cfg, "institution-0")
    assert [e["mechanism"] for e in events] == ["gaussian", "dp-sgd", "dp-sgd"]
    assert events[0] == {"mechanism": "gaussian", "noise_multiplier": 5.0, "releases": 1}
    statements = [json.loads(r.attestations[11].statement)["privacy"] for r in (first, second)]
    assert statements[0]["released"]["class-counts"].startswith("noised: Gaussian noise of std 5")
    assert statements[0]["released"]["num-examples"].startswith("sum of the noised class counts")
    assert statements[0]["parameters"]["count_noise"] == 5.0
    # the first release paid for the counts too: its epsilon is the whole total; the second only its round
    assert statements[0]["epsilon"] == pytest.approx(statements[0]["epsilon_total"])
    assert statements[1]["epsilon"] == pytest.approx(statements[1]["epsilon_total"] - statements[0]["epsilon_total"])


def test_noised_counts_and_calibrated_dp_sgd_spend_exactly_the_budget_together(tmp_path: Path) -> None:
    # Prepare: noise calibrated to institution-0's budget of 2, over the run's 2 rounds and its count release
    grid, cfg, trail = federation(tmp_path, 'counts = "noised"\nmax-epsilon = 2.0\n', privacy="dp-sgd",
                                  **{"dp-noise-multiplier": 0.0})

    # Execute
    for round_ in (1, 2):
        replies = soft_label_round(grid, cfg, trail, query_for(cfg, round_=round_, want_class_counts=True), [11])
        assert sorted(replies.accepted) == [11]

    # Assert
    total = json.loads(replies.attestations[11].statement)["privacy"]["epsilon_total"]
    assert 1.95 < total <= 2.0
    assert [e["mechanism"] for e in ledger_events(cfg, "institution-0")] == ["gaussian", "dp-sgd", "dp-sgd"]


def test_an_error_on_the_node_reaches_the_coordinator_without_local_paths(tmp_path: Path) -> None:
    # Prepare: institution-0's signing key is gone (its error names the file on the node)
    grid, cfg, trail = federation(tmp_path)
    for key in (Path(cfg.sites_dir) / "institution-0").glob("*.key"):
        key.unlink()

    # Execute
    replies = soft_label_round(grid, cfg, trail, query_for(cfg), list(NODES))

    # Assert: the other institution answers; the error names the problem, not where it lives
    assert sorted(replies.accepted) == [12] and replies.checks == {11: "node-error"}
    assert str(tmp_path) not in replies.rejected[11] and "<path on the node>" in replies.rejected[11]
    assert str(tmp_path) not in rejection(trail, 11)["reason"]
