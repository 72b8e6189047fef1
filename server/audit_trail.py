"""The coordinator's audit trail: checks each reply's attestation before aggregation, and keeps the ledger.

Every event of a run goes into `<run folder>/ledger.jsonl`, signed by the coordinator's key: the run,
each round's query, each reply accepted or rejected (with the institution's attestation verbatim and
the reason), the aggregation, every student checkpoint and the end of the run. A restarted server
continues the same chain (`ledger-resumed`); a run resumed from its checkpoint says so (`run-resumed`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from common.aggregation import ClippedWeight
from common.audit import kinds
from common.audit.attestation import Attestation, check_attestation, claimed_institution
from common.audit.canonical import canonical, sha256_hex
from common.audit.keys import Signer, load_allow_list, load_signer, private_key_path, write_key_pair
from common.audit.ledger import RESUMED, Ledger
from common.config import RunConfig
from common.errors import AuditError, ConfigError, FedstillError
from common.messages import DigestInstruction, SoftLabelQuery, read_attestation, record_digest, weights_digest
from server.exchange import Exchange
from server.results.schema import AuditSummary
from server.witness import Witnessing

LEDGER = "ledger.jsonl"


@dataclass
class AuditTrail:
    ledger: Ledger
    run_id: str  # Flower's run id, as a decimal string (RFC 8785 cannot hold 64-bit integers)
    allow_list: dict[str, str] | None  # None: replies are logged but not signature-checked
    bindings: dict[int, str] = field(default_factory=dict)  # node id -> institution id, first come
    query_sha256: str = ""
    query_digests: dict[int, str] = field(default_factory=dict)  # node -> digest, when each got its own message
    rejections: int = 0
    earlier_institutions: dict[str, str] = field(default_factory=dict)  # node id -> institution, before a resume
    max_examples: dict[str, int] = field(default_factory=dict)  # institution -> agreed largest size ([max-examples])
    witnessing: Witnessing | None = None  # with an allow-list: the institutions witness the ledger (server.witness)

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, run_id: int) -> AuditTrail:
        """Open (or continue) the run's ledger and record that the run started."""
        signer = coordinator_signer(cfg, run_dir)
        allow_list = load_allow_list(cfg.allow_list) if cfg.allow_list else None
        path = run_dir / LEDGER
        existed = path.exists() and path.stat().st_size > 0
        ledger = Ledger.open(path, signer, {"run_name": run_dir.name, "allow_list": allow_list})
        trail = cls(ledger, str(run_id), allow_list)
        trail.max_examples = load_max_examples(cfg.allow_list, allow_list) if allow_list else {}
        trail.witnessing = Witnessing.of(ledger, allow_list, trail.bindings) if allow_list else None
        if existed:
            ledger.append(RESUMED, {"run_id": str(run_id)})
        config = cfg.to_dict()
        ledger.append(kinds.RUN_STARTED, {
            "run_id": str(run_id), "run_name": run_dir.name, "scenario": cfg.scenario, "method": cfg.method,
            "aggregation": cfg.aggregation, "codec": cfg.codec, "num_server_rounds": cfg.num_server_rounds,
            "config_sha256": sha256_hex(canonical(config)), "config": config,
        })
        return trail

    def round_opened(self, query: SoftLabelQuery, query_record: RecordDict, nodes: list[int]) -> None:
        self.query_sha256, _ = record_digest(query_record)
        self.query_digests = {}
        self.ledger.append(kinds.ROUND_OPENED, {
            "round": query.round, "nodes": [str(n) for n in nodes], "query_sha256": self.query_sha256,
            "temperature": float(query.temperature), "codec": query.codec, "samples": int(len(query.sample_ids)),
            "public_fingerprint": query.fingerprint,
        })

    def check_reply(self, query: SoftLabelQuery, node: int, content: RecordDict) -> Attestation | None:
        """Verify a soft-label reply's attestation against the allow-list and the bytes received; raise AuditError."""
        return self._check(query.round, query.fingerprint, node, content)

    def digest_opened(self, instruction: DigestInstruction, record: RecordDict, nodes: list[int]) -> None:
        """FedMD: the consensus goes down; the digest replies that come back are releases too."""
        self.query_sha256, _ = record_digest(record)
        self.query_digests = {}
        self.ledger.append(kinds.DIGEST_OPENED, {
            "round": instruction.round, "nodes": [str(n) for n in nodes], "query_sha256": self.query_sha256,
            "samples": int(len(instruction.sample_ids)), "digest_epochs": instruction.digest_epochs,
            "revisit_epochs": instruction.revisit_epochs,
        })

    def exchange_opened(self, phase: str, round_: int, records: dict[int, RecordDict]) -> None:
        """A secure-aggregation or FedAvg exchange goes out (one message per node, possibly each its own)."""
        self.query_digests = {node: record_digest(record)[0] for node, record in records.items()}
        digests = set(self.query_digests.values())
        self.query_sha256 = digests.pop() if len(digests) == 1 else ""
        self.ledger.append(kinds.EXCHANGE_OPENED, {
            "round": round_, "phase": phase, "nodes": [str(n) for n in sorted(records)],
            "query_sha256": self.query_sha256 or {str(n): d for n, d in sorted(self.query_digests.items())},
        })

    def check_exchange(self, round_: int, fingerprint: str, node: int, content: RecordDict) -> Attestation | None:
        """Verify the attestation of a reply to `exchange_opened`: secure aggregation's keys, bundles and shares,
        and FedAvg's trained weights."""
        return self._check(round_, fingerprint, node, content)

    def check_digest_reply(self, instruction: DigestInstruction, node: int, content: RecordDict) -> Attestation | None:
        return self._check(instruction.round, instruction.fingerprint, node, content)

    def _check(self, round_: int, fingerprint: str, node: int, content: RecordDict) -> Attestation | None:
        try:
            attestation = read_attestation(content)
        except FedstillError as error:
            raise AuditError(f"malformed attestation: {error}", "statement") from None
        if self.allow_list is None:
            return attestation
        if attestation is None:
            raise AuditError("the reply is unsigned; every institution must sign its releases (node config "
                             "signing-key and institution-id)", "unsigned")
        payload_sha256, payload_bytes = record_digest(content)
        fields = check_attestation(attestation, self.allow_list, {
            "run_id": self.run_id, "round": round_, "node_id": str(node), "public_fingerprint": fingerprint,
            "query_sha256": self.query_digests.get(int(node), self.query_sha256),
            "payload_sha256": payload_sha256, "payload_bytes": payload_bytes,
        }, "attestation")
        self._bind(int(node), fields["institution_id"])
        return attestation

    def _bind(self, node: int, institution: str) -> None:
        bound = self.bindings.get(node)
        holder = next((n for n, name in self.bindings.items() if name == institution and n != node), None)
        if bound not in (None, institution) or holder is not None:
            raise AuditError(
                f"identity: node {node} signs as {institution!r}, but "
                + (f"it signed as {bound!r} before" if bound not in (None, institution) else f"node {holder} is {institution!r}"),
                "identity",
            )
        self.bindings[node] = institution

    def record_replies(self, round_: int, replies: Exchange[Any], phase: str = "soft-labels") -> None:
        """One ledger entry per node of the exchange: accepted (with its attestation) or rejected (with why)."""
        uplink = replies.uplink_bytes
        for node in sorted(replies.accepted):
            attestation = replies.attestations.get(node)
            sha256, size = replies.payload_digests.get(node, ("", 0))
            self.ledger.append(kinds.REPLY_ACCEPTED, {
                "round": round_, "phase": phase, "node_id": str(node), "institution_id": claimed_institution(attestation),
                "payload_sha256": sha256, "payload_bytes": size, "uplink_bytes": int(uplink.get(node, 0)),
                "attestation": attestation.as_dict() if attestation else None,
            })
        for node, reason in sorted(replies.rejected.items()):
            attestation = replies.attestations.get(node)
            self.rejections += 1
            self.ledger.append(kinds.REPLY_REJECTED, {
                "round": round_, "phase": phase, "node_id": str(node), "institution_id": claimed_institution(attestation),
                "check": replies.checks.get(node, "format"), "reason": reason,
                "attestation": attestation.as_dict() if attestation else None,
            })

    def aggregated(self, round_: int, rule: str, nodes: list[int], probs: np.ndarray, kept: int) -> None:
        self.ledger.append(kinds.AGGREGATED, {
            "round": round_, "rule": rule, "nodes": [str(n) for n in nodes],
            "institutions": [self.bindings.get(int(n)) for n in nodes], "samples_kept": int(kept),
            "ensemble_sha256": hashlib.sha256(np.ascontiguousarray(probs, dtype=np.float32).tobytes()).hexdigest(),
        })

    def weights_aggregated(self, round_: int, nodes: list[int], weights: ArrayRecord) -> None:
        """FedAvg: the weights of `nodes` (their replies all accepted) were averaged into `weights`."""
        self.ledger.append(kinds.AGGREGATED, {
            "round": round_, "rule": kinds.FEDAVG_PHASE, "nodes": [str(n) for n in nodes],
            "institutions": [self.bindings.get(int(n)) for n in nodes],
            "weights_sha256": weights_digest(weights),
        })

    def weight_caps(self, nodes: list[int]) -> list[float] | None:
        """Each node's agreed largest size (the allow-list's [max-examples] for the institution it signed as),
        inf where none was agreed; None when the allow-list agrees none."""
        if not self.max_examples:
            return None
        return [float(self.max_examples.get(self.bindings.get(int(n), ""), float("inf"))) for n in nodes]

    def weights_clipped(self, round_: int, nodes: list[int], clipped: tuple[ClippedWeight, ...]) -> None:
        """One `weight-clipped` entry per institution whose declared size was capped before a weighted rule."""
        for clip in clipped:
            node = nodes[clip.index]
            self.ledger.append(kinds.WEIGHT_CLIPPED, {
                "round": round_, "node_id": str(node), "institution_id": self.bindings.get(int(node)),
                "check": clip.check, "declared": float(clip.declared), "used": float(clip.used),
            })

    def sum_refused(self, round_: int, check: str, reason: str) -> None:
        """Secure aggregation: the opened sum failed a range check; no institution can be singled out."""
        self.rejections += 1
        self.ledger.append(kinds.SUM_REFUSED, {"round": round_, "check": check, "reason": reason})

    def secagg_dropped(self, round_: int, phase: str, node: int, check: str, reason: str) -> None:
        """Secure aggregation: a node dropped for what a step showed of it beyond its own reply's checks (a dispute
        over share bundles, shares off their polynomial); its replies stay recorded as they were judged."""
        self.rejections += 1
        self.ledger.append(kinds.SECAGG_DROPPED, {"round": round_, "phase": phase, "node_id": str(node),
                                                  "institution_id": self.bindings.get(int(node)), "check": check,
                                                  "reason": reason})

    def checkpoint(self, round_: int, student: Path, accuracy: float) -> dict[str, Any]:
        return self.ledger.append(kinds.CHECKPOINT, {"round": round_, "file": student.name, "sha256": _file_sha256(student),
                                                     "student_accuracy": float(accuracy)})

    def head(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The audit state a run checkpoint keeps: the ledger entry it follows, and the counts so far."""
        return {"seq": entry["seq"], "hash": entry["hash"], "ledger": entry["ledger"], "rejections": self.rejections,
                "institutions": self.institutions()}

    def resumed(self, round_: int, audit: dict[str, Any], run_ids: list[str]) -> dict[str, Any]:
        """A resumed run continues after the checkpoint of round `round_` (ledger entry `audit["seq"]`).

        What was recorded after that entry, by the run(s) that stopped, stays in the chain: this entry says
        which rounds it belongs to, so a verifier knows those attempts were abandoned, not completed.
        """
        self.rejections = int(audit.get("rejections", 0))
        self.earlier_institutions = dict(audit.get("institutions", {}))
        after = [e for e in self.ledger.entries() if e["seq"] > audit["seq"]]
        interrupted = [run_ids[-1]] if run_ids else []
        interrupted += [e["body"].get("run_id") for e in after if e["kind"] == kinds.RUN_STARTED]
        return self.ledger.append(kinds.RUN_RESUMED, {
            "run_id": self.run_id, "checkpoint_round": round_, "checkpoint_seq": audit["seq"],
            "checkpoint_hash": audit["hash"],
            "interrupted_run_ids": sorted({r for r in interrupted if isinstance(r, str) and r != self.run_id}),
            "abandoned_rounds": sorted({e["body"]["round"] for e in after if e["kind"] in kinds.ROUND_WORK
                                        and isinstance(e["body"].get("round"), int)}),
        })

    def unfinished_attempt(self) -> dict[str, Any] | None:
        """The `run-started` entry of an earlier run on this ledger that stopped before completing a round (so
        left no checkpoint) but had begun one: this run starts afresh, and that attempt is abandoned."""
        entries = self.ledger.entries()
        starts = [i for i, e in enumerate(entries) if e["kind"] == kinds.RUN_STARTED]
        if len(starts) < 2:
            return None
        between = entries[starts[-2] + 1:starts[-1]]
        if any(e["kind"] == kinds.RUN_FINISHED for e in between) or not any(e["kind"] in kinds.ROUND_WORK for e in between):
            return None
        return entries[starts[-2]]

    def institutions(self) -> dict[str, str]:
        """Node id -> institution id of every node that signed a reply in this run (and before a resume)."""
        return dict(sorted({**self.earlier_institutions, **{str(n): name for n, name in self.bindings.items()}}.items()))

    def finished(self, rounds: int, student: Path) -> dict[str, Any]:
        self.ledger.append(kinds.RUN_FINISHED, {"status": "completed", "rounds": rounds, "student_sha256": _file_sha256(student)})
        return self.summary()

    def failed(self, error: BaseException) -> dict[str, Any]:
        self.ledger.append(kinds.RUN_FAILED, {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]})
        return self.summary()

    def stopped(self, note: str) -> dict[str, Any]:
        """Flower stopped the run (`flwr stop`, server/stopping.py); nothing can reach the institutions any more."""
        self.ledger.append(kinds.RUN_STOPPED, {"status": "stopped", "error": note[:2000]})
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """The `audit` section of results.json (an `AuditSummary`, server/results/schema.py)."""
        entries = self.ledger.entries()
        return AuditSummary(
            ledger=LEDGER, ledger_entries=len(entries), ledger_head=entries[-1]["hash"],
            coordinator_key=self.ledger.signer.public, signatures_checked=self.allow_list is not None,
            institutions=self.institutions(),
            rejections=self.rejections,
        ).to_json()


def check_coordinator_key(cfg: RunConfig, run_dir: Path) -> None:
    """Whoever can read the run folder must not be able to re-sign its ledger: a configured `coordinator-key` lives
    outside the run folder and, in an audited deployed run (an allow-list, no simulated `sites-dir`), is required and
    passphrase-protected. A simulation, where one machine plays every party, and an unaudited run (no allow-list: no
    signatures are checked) may let the run make its own key in the run folder."""
    deployed = bool(cfg.allow_list) and not cfg.sites_dir
    if not cfg.coordinator_key:
        if not deployed:
            return
        raise ConfigError("a deployed run needs coordinator-key: the coordinator's signing key, outside the run folder "
                          "and encrypted; make it once with `FEDSTILL_KEY_PASSPHRASE=... fedstill keygen coordinator "
                          "--passphrase-env FEDSTILL_KEY_PASSPHRASE --out /srv/fedstill/keys`, set coordinator-key to "
                          "its .key file, and start the SuperLink with FEDSTILL_KEY_PASSPHRASE in its environment")
    key = Path(cfg.coordinator_key).expanduser().resolve()
    if key.is_relative_to(run_dir.expanduser().resolve()):
        raise ConfigError(f"coordinator-key {cfg.coordinator_key} lies inside the run folder {run_dir}: whoever reads the "
                          "folder could re-sign its ledger; keep the key elsewhere and set coordinator-key to it")
    if deployed and key.is_file() and b"ENCRYPTED PRIVATE KEY" not in key.read_bytes()[:64]:
        raise ConfigError(f"coordinator-key {cfg.coordinator_key} is not passphrase-protected; make an encrypted one with "
                          "`fedstill keygen coordinator --passphrase-env FEDSTILL_KEY_PASSPHRASE` and give the SuperLink "
                          "FEDSTILL_KEY_PASSPHRASE")


def coordinator_signer(cfg: RunConfig, run_dir: Path) -> Signer:
    """The coordinator's key: `coordinator-key`, or one made for this run in the run folder."""
    if cfg.coordinator_key:
        return load_signer(cfg.coordinator_key, kinds.COORDINATOR)
    path = private_key_path(run_dir, kinds.COORDINATOR)
    if path.exists():
        return load_signer(path, kinds.COORDINATOR)
    signer = Signer.generate(kinds.COORDINATOR)
    write_key_pair(signer, run_dir)
    return signer


def load_max_examples(path: Path | str, institutions: dict[str, str]) -> dict[str, int]:
    """Institution -> the largest private size the consortium agreed for it, from the allow-list's optional
    `[max-examples]` table (name = integer >= 1, names of the [institutions] table only)."""
    with Path(path).expanduser().open("rb") as handle:
        table = tomllib.load(handle).get("max-examples", {})
    if not isinstance(table, dict):
        raise ConfigError(f"allow-list {path}: [max-examples] must be a table of institution = integer >= 1")
    bad = sorted(name for name, value in table.items()
                 if name not in institutions or isinstance(value, bool) or not isinstance(value, int) or value < 1)
    if bad:
        raise ConfigError(f"allow-list {path}: [max-examples] entries {bad} must name an institution of [institutions] "
                          "and be an integer >= 1")
    return dict(table)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ledger_holds(run_dir: Path, seq: int, digest: str) -> bool:
    """Whether the run folder's ledger holds entry `seq` with hash `digest` (read only, nothing verified)."""
    path = Path(run_dir) / LEDGER
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        for number, line in enumerate(handle):
            if number == seq:
                try:
                    entry = json.loads(line)
                except ValueError:
                    return False
                return isinstance(entry, dict) and entry.get("seq") == seq and entry.get("hash") == digest
    return False
