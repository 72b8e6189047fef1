"""The hostile peer, end to end: one of three institutions declares 2^52 examples and signs its lie; the student
the coordinator distils stays where the honest run's is, and the ledger names the clipped institution (or, under
secure aggregation, where no institution can be singled out, refuses the weighted sum and uses the unweighted one).

`server_app.main` runs with the real ClientApp handlers of three provisioned institutions (keys, allow-list), the
suite's in-memory Grid delivering the messages; the liar's reply is the real one with its counts inflated, then
attested and logged again under its own key, so the attestation check accepts it. The counterfactual (no caps, no
clip) shows what the caps prevent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.secure
from client import client_app
from client.release import RELEASE_LOG, Identity, sign_and_log, simulated_institution, site_folder
from common.audit import kinds
from common.audit.keys import load_signer, private_key_path
from common.audit.witness import Cosignature
from common.config import default_run_config
from common.messages import SOFT_LABELS_TYPE, WITNESS_TYPE, SoftLabelQuery, SoftLabelReply, attach_cosignature, read_cosignature
from common.secagg.masking import SCALE_BITS, quantise
from server import server_app
from simulations.provision import provision_sites

from grid import MemoryGrid, server_task

NODES = (11, 12, 13)
LIAR = 13
LIE = 2**52  # the declared size
RULES = ("weighted", "expertise", "balanced-expertise")
RUN = {"dataset": "digits", "public-size": 400, "num-clients": 3, "min-clients": 3, "partitioner": "iid", "seed": 3,
       "num-server-rounds": 1, "teacher-models": "mlp", "local-epochs": 3, "student-epochs": 10, "privacy": "none",
       "temperature": 3.0, "teacher-lr": 0.001, "teacher-batch-size": 64, "public-fraction": 1.0}


class Federation(MemoryGrid):
    """Each message goes to its node's real ClientApp handler; the liar (when `lie`) inflates its declared counts to
    2^52 and signs the altered reply with its own key. Honest sizes are kept in `declared`."""

    def __init__(self, mapping: dict[str, Any], *, lie: bool) -> None:
        super().__init__(nodes=NODES)
        self.mapping, self.lie = mapping, lie
        self.states = {node: RecordDict() for node in NODES}
        self.declared: dict[int, int] = {}

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = Context(1, node, {"partition-id": NODES.index(node), "num-partitions": len(NODES)},
                          self.states[node], self.mapping)
        if message.metadata.message_type == WITNESS_TYPE:  # the closing witness exchange
            return client_app.witness_head(message, context)
        assert message.metadata.message_type == SOFT_LABELS_TYPE
        reply = client_app.soft_labels(message, context)
        self.declared[node] = SoftLabelReply.from_record(reply.content, SoftLabelQuery.from_record(message.content)).num_examples
        return self.inflate(message, reply, node) if self.lie and node == LIAR else reply

    def inflate(self, message: Message, reply: Message, node: int) -> Message:
        """The real reply with num-examples 2^52 (class counts scaled by the same factor), attested and logged anew."""
        query = SoftLabelQuery.from_record(message.content)
        honest = SoftLabelReply.from_record(reply.content, query)
        if honest.class_counts is None:
            lying = dataclasses.replace(honest, num_examples=LIE)
        else:
            counts = honest.class_counts.astype(np.int64) * (LIE // honest.num_examples)
            lying = dataclasses.replace(honest, num_examples=int(counts.sum()), class_counts=counts)
        name, folder = simulated_institution(NODES.index(node)), site_folder(self.mapping["sites-dir"], NODES.index(node))
        identity = Identity(load_signer(private_key_path(folder, name), name), folder / RELEASE_LOG)
        lying_record = lying.to_record()
        cosigned = read_cosignature(reply.content)  # the liar witnesses the ledger like everyone else
        if cosigned is not None:
            lying_record = attach_cosignature(lying_record, Cosignature.from_dict(cosigned, "cosignature"))
        record = sign_and_log(identity, lying_record, message.content, run_id=1, round_=query.round, node_id=node,
                              fingerprint=honest.fingerprint, with_counts=query.want_class_counts,
                              with_accuracy=query.evaluate_teacher)
        return Message(record, reply_to=message)


def distil(folder: Path, rule: str, *, lie: bool, caps: dict[int, int] | None = None,
           **changes: Any) -> tuple[float, list[dict], Federation]:
    """One run of `server_app.main`: the final student accuracy, the ledger, and the grid (with the sizes declared)."""
    folder.mkdir(parents=True)
    mapping = {**default_run_config(), **RUN, "aggregation": rule, "output-dir": str(folder), "run-name": "run",
               **provision_sites(folder, len(NODES)), **changes}
    if caps:  # the consortium's agreed largest size of each institution, in the allow-list
        agreed = "".join(f'"{simulated_institution(NODES.index(n))}" = {size}\n' for n, size in caps.items())
        with Path(mapping["allow-list"]).open("a", encoding="utf-8") as handle:
            handle.write(f"[max-examples]\n{agreed}")
    grid = Federation(mapping, lie=lie)
    with server_task(), torch.random.fork_rng():  # build_model(seed=...) reseeds torch's global generator
        TaskIdentity._run_id = 1
        server_app.main(grid, Context(1, 0, {}, RecordDict(), mapping))
    results = json.loads((folder / "run" / "results.json").read_text())
    assert results["status"] == "completed", results
    ledger = [json.loads(line) for line in (folder / "run" / "ledger.jsonl").read_text().splitlines()]
    return float(results["final"]["student_accuracy"]), ledger, grid


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[float, dict[int, int]]]]:
    """Per rule: the honest run's student accuracy and each institution's declared (true) size."""
    root = tmp_path_factory.mktemp("honest")
    runs = {}
    for rule in RULES:
        accuracy, ledger, grid = distil(root / rule, rule, lie=False)
        assert not [e for e in ledger if e["kind"] == kinds.WEIGHT_CLIPPED]
        runs[rule] = accuracy, dict(grid.declared)
    yield runs


@pytest.mark.parametrize("rule", RULES)
def test_a_peer_declaring_2_to_the_52_examples_leaves_the_student_where_the_honest_run_does(
        rule: str, tmp_path: Path, honest: dict[str, tuple[float, dict[int, int]]]) -> None:
    # Prepare: the allow-list holds each institution's agreed size (what it truly holds)
    expected, sizes = honest[rule]

    # Execute
    capped, ledger, grid = distil(tmp_path / "capped", rule, lie=True, caps=sizes)
    uncapped, _, _ = distil(tmp_path / "uncapped", rule, lie=True, **{"weight-clip": 0.0})

    # Assert: the lie was sent, accepted and clipped to the agreed size; without caps the student falls
    assert grid.declared == sizes
    clips = [e["body"] for e in ledger if e["kind"] == kinds.WEIGHT_CLIPPED]
    assert [(c["node_id"], c["institution_id"], c["check"], c["used"]) for c in clips] == \
           [(str(LIAR), simulated_institution(NODES.index(LIAR)), "weight-cap", float(sizes[LIAR]))]
    assert clips[0]["declared"] >= LIE - sizes[LIAR]
    assert not [e for e in ledger if e["kind"] == kinds.REPLY_REJECTED]
    assert abs(capped - expected) <= 0.01, (capped, expected)
    assert uncapped < expected - 0.10, (uncapped, expected)


class SecureFederation(MemoryGrid):
    """Secure aggregation: every message to its node's real ClientApp handler."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        super().__init__(nodes=NODES)
        self.mapping = mapping
        self.states = {node: RecordDict() for node in NODES}

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = Context(1, node, {"partition-id": NODES.index(node), "num-partitions": len(NODES)},
                          self.states[node], self.mapping)
        return client_app.HANDLERS[message.metadata.message_type](message, context)


def secure_distil(folder: Path) -> tuple[float, list[dict]]:
    folder.mkdir(parents=True)
    mapping = {**default_run_config(), **RUN, "aggregation": "weighted", "secure-aggregation": True,
               "output-dir": str(folder), "run-name": "run", **provision_sites(folder, len(NODES))}
    with server_task(), torch.random.fork_rng():
        TaskIdentity._run_id = 1
        server_app.main(SecureFederation(mapping), Context(1, 0, {}, RecordDict(), mapping))
    results = json.loads((folder / "run" / "results.json").read_text())
    assert results["status"] == "completed", results
    ledger = [json.loads(line) for line in (folder / "run" / "ledger.jsonl").read_text().splitlines()]
    return float(results["final"]["student_accuracy"]), ledger


def test_under_secure_aggregation_a_masked_2_to_the_52_weight_falls_back_to_the_unweighted_sum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the liar knows its own masks: it adds [2^52 p, 2^52] - [w p, w] (fixed point, mod 2^64) to the
    # weighted part of its masked vector, which its signature then covers
    honest, _ = secure_distil(tmp_path / "honest")
    original = client.secure.client_masked_input

    def lying(node: int, secrets: Any, shared: Any, seed: bytes, vector: np.ndarray, context: bytes) -> np.ndarray:
        masked = original(node, secrets, shared, seed, vector, context)
        if node != LIAR:
            return masked
        cells = (len(vector) - 1) // 2
        lie = [int(LIE * float(p)) * (1 << SCALE_BITS) % 2**64 for p in vector[cells + 1:]] + [LIE * (1 << SCALE_BITS) % 2**64]
        delta = np.asarray(lie, dtype=np.uint64) - quantise(vector[:cells + 1])  # uint64 arithmetic wraps mod 2^64
        return masked + np.concatenate([delta, np.zeros(cells, dtype=np.uint64)])

    monkeypatch.setattr(client.secure, "client_masked_input", lying)

    # Execute
    accuracy, ledger = secure_distil(tmp_path / "lying")

    # Assert: the weighted sum of every round refused in the ledger, the student where the honest run's is
    refused = [e["body"] for e in ledger if e["kind"] == kinds.SUM_REFUSED]
    assert [(r["round"], r["check"]) for r in refused] == [(1, "weight-range")]
    assert abs(accuracy - honest) <= 0.01, (accuracy, honest)
