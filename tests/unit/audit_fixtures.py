"""Real audit components wired together in a test folder: identities, allow-lists, signed replies, audited runs.

Nothing here is a mock: keys are Ed25519 keys on disk, replies are `SoftLabelReply` records signed with
`client.release.sign_and_log`, and runs are recorded by `server.audit_trail.AuditTrail`, exactly as the
server and the institutions do it; only the training is left out.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict

from client.release import RELEASE_LOG, Identity, sign_and_log
from client.witness import witness
from common.audit import kinds
from common.audit.keys import Signer, load_signer, private_key_path, write_allow_list, write_key_pair
from common.audit.kinds import COORDINATOR
from common.audit.ledger import Ledger
from common.config import RunConfig, default_run_config
from common.messages import SoftLabelQuery, SoftLabelReply, attach_cosignature, read_witness_request
from server.audit_trail import LEDGER, AuditTrail
from server.exchange import Exchange
from server.rounds import query_soft_labels, witness_end
from server.witness import Witnessing

from grid import Answer, MemoryGrid, server_task

FINGERPRINT = "ab" * 32
RUN_ID = 2**63 - 25  # Flower's run ids are 64-bit: more than an RFC 8785 number holds exactly
NUM_SAMPLES, NUM_CLASSES = 4, 3
TIMEOUT_S = 30.0


def make_query(round_: int = 1) -> SoftLabelQuery:
    return SoftLabelQuery(round=round_, fingerprint=FINGERPRINT, temperature=2.0, codec="float16",
                          num_classes=NUM_CLASSES, sample_ids=np.arange(NUM_SAMPLES, dtype=np.int64),
                          evaluate_teacher=False)


def soft_labels(seed: int = 0) -> np.ndarray:
    """(NUM_SAMPLES, NUM_CLASSES) float32 rows on the simplex, distinct values in each row."""
    rows = np.random.default_rng(seed).dirichlet(np.ones(NUM_CLASSES), size=NUM_SAMPLES)
    return rows.astype(np.float32)


def make_reply(query: SoftLabelQuery, probs: np.ndarray | None = None) -> RecordDict:
    probs = soft_labels(query.round) if probs is None else probs
    return SoftLabelReply(round=query.round, fingerprint=query.fingerprint, codec=query.codec, soft_labels=probs,
                          num_examples=50, train_loss=0.4, teacher_accuracy=-1.0, teacher_params=1000,
                          teacher_rounds=query.round).to_record()


def make_identity(sites: Path, name: str) -> Identity:
    """An institution as `fedstill keygen` provisions it: a key pair in its own folder, its release log beside."""
    signer = Signer.generate(name)
    write_key_pair(signer, Path(sites) / name)
    return Identity(signer, Path(sites) / name / RELEASE_LOG)


def write_allow_list_for(path: Path, signers: Iterable[Signer]) -> dict[str, str]:
    institutions = {signer.name: signer.public for signer in signers}
    write_allow_list(path, institutions)
    return institutions


def run_config(mapping: Mapping[str, Any] | None, allow_list: Path | str, coordinator_key: str = "") -> RunConfig:
    raw = dict(default_run_config() if mapping is None else mapping)
    raw.update({"allow-list": str(allow_list), "coordinator-key": coordinator_key})
    return RunConfig.from_run_config(raw)


def signed_reply(identity: Identity, query: SoftLabelQuery, node: int, *, run_id: int = RUN_ID,
                 round_: int | None = None, node_id: int | None = None, probs: np.ndarray | None = None) -> RecordDict:
    """A reply to `query` from `node`, attested and logged by `identity` (the statement's round and node
    default to the query's round and `node`; give others to make a lying statement)."""
    return sign_and_log(
        identity, make_reply(query, probs), query.to_record(), run_id=run_id,
        round_=query.round if round_ is None else round_, node_id=node if node_id is None else node_id,
        fingerprint=query.fingerprint, with_counts=False, with_accuracy=False,
    )


def altered(record: RecordDict) -> RecordDict:
    """The record with two soft-label values of row 0 swapped: still a valid reply, but not the signed bytes."""
    arrays = record["soft-labels"]
    changed = {}
    for name in arrays.keys():
        values = arrays[name].numpy().copy()
        if name == "probs":
            values[0, [0, 1]] = values[0, [1, 0]]
        changed[name] = Array(values)
    record["soft-labels"] = ArrayRecord(changed)
    return record


def judge(trail: AuditTrail, query: SoftLabelQuery, answers: list[tuple[int, str | None, RecordDict | None]],
          nodes: list[int] | None = None) -> Exchange[SoftLabelReply]:
    """The server's judgement of a round, the audit trail's check first, as the round loop does it: each
    `(node, error reason, content)` answer comes back through the in-memory Grid (a node not among them is silent)."""
    nodes = sorted(node for node, _, _ in answers) if nodes is None else nodes
    given = {node: (error, content) for node, error, content in answers}

    def answer(message: Message) -> Answer:
        error, content = given.get(message.metadata.dst_node_id, (None, None))
        return Error(code=0, reason=error) if error is not None else content

    with server_task():
        return query_soft_labels(MemoryGrid(answer), nodes, query, TIMEOUT_S, partial(trail.check_reply, query))


@dataclass(frozen=True)
class AuditedRun:
    """The files of one audited run: its folder (ledger, results.json, student), allow-list and sites."""

    folder: Path
    allow_list: dict[str, str]
    identities: dict[int, Identity]  # node id -> the institution answering from it

    @property
    def ledger(self) -> Path:
        return self.folder / LEDGER

    @property
    def results(self) -> Path:
        return self.folder / "results.json"

    @property
    def student(self) -> Path:
        return self.folder / "student.safetensors"

    @property
    def client_logs(self) -> list[Path]:
        return [identity.release_log for identity in self.identities.values()]

    @property
    def coordinator(self) -> Signer:
        return load_signer(private_key_path(self.folder, COORDINATOR), COORDINATOR)

    @property
    def coordinator_key(self) -> str:
        """The coordinator's public key, as an auditor pins it (--coordinator-key)."""
        return (self.folder / f"{COORDINATOR}.pub").read_text(encoding="ascii").strip()

    def copy_to(self, root: Path) -> AuditedRun:
        """The same run, its sites included, copied under `root` (to tamper with it)."""
        source = self.folder.parent
        shutil.copytree(source, root, dirs_exist_ok=True)
        moved = {node: Identity(identity.signer, Path(root) / identity.release_log.relative_to(source))
                 for node, identity in self.identities.items()}
        return AuditedRun(Path(root) / self.folder.name, self.allow_list, moved)

    def lines(self) -> list[bytes]:
        return self.ledger.read_bytes().splitlines(keepends=True)


def audited_run(root: Path, mapping: Mapping[str, Any] | None = None, *, rounds: int = 2,
                nodes: tuple[int, ...] = (101, 102), run_id: int = RUN_ID, coordinator_key: str = "",
                identities: dict[int, Identity] | None = None) -> AuditedRun:
    """Record a whole run as the server does: every reply signed and logged by its institution, checked,
    recorded, aggregated, a student checkpoint each round, run-finished and results.json's audit section."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    identities = identities or {node: make_identity(root / "sites", f"institution-{i}") for i, node in enumerate(nodes)}
    allow_list = write_allow_list_for(root / "allow-list.toml", [identity.signer for identity in identities.values()])
    folder = root / "run"
    folder.mkdir(parents=True, exist_ok=True)
    trail = AuditTrail.open(run_config(mapping, root / "allow-list.toml", coordinator_key), folder, run_id)
    run = AuditedRun(folder, allow_list, identities)
    for round_ in range(1, rounds + 1):
        query = make_query(round_)
        trail.round_opened(query, query.to_record(), list(identities))
        answers = [(node, None, signed_reply(identity, query, node, run_id=run_id)) for node, identity in identities.items()]
        replies = judge(trail, query, answers)
        trail.record_replies(round_, replies)
        probs = np.mean([reply.soft_labels for reply in replies.accepted.values()], axis=0)
        trail.aggregated(round_, "mean", sorted(replies.accepted), probs, NUM_SAMPLES)
        run.student.write_bytes(f"student weights after round {round_}".encode())
        trail.checkpoint(round_, run.student, 0.5)
    trail.finished(rounds, run.student)
    witness_final(trail, identities, rounds, run_id=run_id)
    run.results.write_text(json.dumps({"audit": trail.summary()}), encoding="utf-8")
    return run


def cosigned(identity: Identity, message: Message, record: RecordDict) -> RecordDict:
    """`record` with the cosignature of the tree head `message` asks to witness, as the ClientApp adds it
    (`record` unchanged when the message asks none)."""
    request = read_witness_request(message.content)
    return record if request is None else attach_cosignature(record, witness(request, identity))


def witness_ledger_end(ledger: Ledger, identities: Mapping[int, Identity], desk: Witnessing | None = None) -> None:
    """The closing witnessing of a hand-made ledger, without the exchange around it: each institution checks the
    final tree head against its release log and cosigns it; the coordinator records the cosignatures."""
    allow_list = {identity.signer.name: identity.signer.public for identity in identities.values()}
    desk = desk or Witnessing.of(ledger, allow_list, {node: identity.signer.name for node, identity in identities.items()})
    requests = desk.requests(list(identities))
    for node, identity in identities.items():
        problem = desk.record(node, identity.signer.name, witness(requests[node], identity).as_dict())
        assert problem is None, problem


def witness_trail_end(trail: AuditTrail, sites: Mapping[str, Identity]) -> None:
    """The closing witnessing of a run recorded by `trail` (its own witnessing desk), without the exchange around
    it: every node that answered, as the institution it answered as (`sites`: institution -> identity)."""
    assert trail.witnessing is not None, "a run with an allow-list is witnessed"
    witness_ledger_end(trail.ledger, {node: sites[name] for node, name in trail.bindings.items()}, trail.witnessing)


def witness_final(trail: AuditTrail, identities: Mapping[int, Identity], round_: int, *, run_id: int = RUN_ID) -> None:
    """The server's closing witness exchange, each institution answering as its ClientApp does: it checks the
    final tree head against its release log, cosigns it, and signs and logs the reply."""
    def answer(message: Message) -> Answer:
        node = message.metadata.dst_node_id
        request = read_witness_request(message.content)
        assert request is not None
        cosigned = attach_cosignature(RecordDict(), witness(request, identities[node]))
        return sign_and_log(identities[node], cosigned, message.content, run_id=run_id, round_=round_, node_id=node,
                            fingerprint=FINGERPRINT, kind=kinds.WITNESS_PHASE)

    grid = MemoryGrid(answer, nodes=list(identities))
    with server_task():
        witness_end(grid, run_config(None, "unused"), trail, FINGERPRINT, round_)
