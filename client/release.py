"""What leaves the site, signed and logged: the institution's identity, attestations and release log.

An institution's identity comes from its node config (`institution-id`, `signing-key`, and
`release-log`, deployment) or, in simulation, from `sites-dir/institution-<partition-id>/`, which
`fedstill simulate` provisions as each institution's `fedstill keygen` would. Every reply is logged
in the release log before it is returned, so the site's record never misses something that left.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.logger import log

from common.audit import kinds
from common.audit.attestation import attest
from common.audit.keys import Signer, load_allow_list, load_signer, private_key_path
from common.audit.ledger import Ledger
from common.config import RunConfig
from common.errors import ConfigError
from common.messages import QUERY_DIGEST_EXCLUDES, attach_attestation, payload_description, record_digest
from common.node_config import NodeConfig

RELEASE_LOG = "release-log.jsonl"
SITE_CONFIG = "site.toml"  # a simulated institution's own settings (its privacy budget)
PEERS_FILE = "allow-list.toml"  # the institution's own copy of the consortium's allow-list
SOFT_LABEL_CATEGORIES = ["soft labels on public transfer samples", "training summary (num-examples, loss, teacher size)"]
COUNTS_CATEGORY = "per-class counts of private data"
ACCURACY_CATEGORY = "teacher accuracy on the benchmark test set"
DIGEST_CATEGORY = "training summary (FedMD digest and revisit losses)"
WITNESS_CATEGORY = "a cosignature of the coordinator's ledger head (no data)"
TIMINGS_CATEGORY = "compute timings (seconds per phase on the node; attached after the signature, outside the payload)"
FEDAVG_CATEGORIES = ["model weights trained on private data (FedAvg baseline)", "training summary (num-examples, loss)"]


@dataclass(frozen=True)
class Identity:
    signer: Signer
    release_log: Path


def site_folder(sites_dir: str | Path, partition_id: int) -> Path:
    return Path(sites_dir) / simulated_institution(partition_id)


def simulated_institution(partition_id: int) -> str:
    return f"institution-{partition_id}"


def load_identity(cfg: RunConfig, node: NodeConfig) -> Identity | None:
    """This node's signing identity, or None when it has none (an unaudited simulation)."""
    if node.institution_id is not None and node.signing_key is not None:  # NodeConfig: both, or neither
        log = node.release_log or str(Path(node.signing_key).expanduser().parent / RELEASE_LOG)
        return Identity(load_signer(node.signing_key, node.institution_id), Path(log).expanduser())
    if cfg.sites_dir and node.partition_id is not None:
        name = simulated_institution(node.partition_id)
        folder = site_folder(cfg.sites_dir, node.partition_id)
        return Identity(load_signer(private_key_path(folder, name), name), folder / RELEASE_LOG)
    return None


def institution_name(cfg: RunConfig, node: NodeConfig) -> str | None:
    """The institution id this node signs as (load_identity's, without loading the key), or None."""
    if node.institution_id is not None and node.signing_key is not None:
        return node.institution_id
    if cfg.sites_dir and node.partition_id is not None:
        return simulated_institution(node.partition_id)
    return None


def site_home(cfg: RunConfig, node: NodeConfig) -> Path | None:
    """The institution's own folder, where it keeps what is its own (release log, privacy ledger, teacher):
    the release log's folder in deployment, `sites-dir/institution-<partition-id>/` in simulation; None
    for a node without an identity (an unaudited simulation)."""
    if node.has_identity:
        if node.release_log:
            return Path(node.release_log).expanduser().parent
        return Path(node.signing_key).expanduser().parent if node.signing_key else None
    if cfg.sites_dir and node.partition_id is not None:
        return site_folder(cfg.sites_dir, node.partition_id)
    return None


def state_folder(cfg: RunConfig, node: NodeConfig) -> Path | None:
    """Where the node keeps its working state on disk (its teacher, the cache of its own data): node config
    `state-dir`, else the institution's own folder (`site_home`); None for a node that keeps it in memory only."""
    return Path(node.state_dir).expanduser() if node.state_dir else site_home(cfg, node)


def load_peers(cfg: RunConfig, node: NodeConfig) -> dict[str, str] | None:
    """The institution's own copy of the consortium's allow-list (institution -> Ed25519 key): node config
    `allow-list`, else `allow-list.toml` in its own folder; None when it keeps none. Never the coordinator's
    run-config allow-list: a coordinator that could name the keys a node trusts could add its own."""
    home = site_home(cfg, node)
    path = Path(node.allow_list).expanduser() if node.allow_list else (home / PEERS_FILE if home else None)
    if path is None or not (node.allow_list or path.is_file()):
        return None
    try:
        return load_allow_list(path)
    except ConfigError as error:
        log(WARNING, "%s", error)  # the path stays on the node
        raise ConfigError(f"this node's own allow-list (node config allow-list, or {PEERS_FILE} in its folder) cannot "
                          "be read or is not a valid allow-list; fix it (see the node's log)") from None


COUNT_REVEALING = ("sample_rate", "steps_per_round")  # DP-SGD's parameters that give away num-examples (batch / n)


def released_statement(privacy: dict[str, Any] | None, released: dict[str, str]) -> dict[str, Any] | None:
    """The privacy statement a reply signs: the mechanism's own, plus `released` (value by value, what else the
    reply carries in the clear, as the site policy allowed it). When num-examples is not released exactly, the
    mechanism parameters that would give it away stay on the node (its privacy ledger keeps them)."""
    if privacy is None:
        return None
    parameters = dict(privacy.get("parameters") or {})
    if released.get("num-examples") != "exact":
        parameters = {k: v for k, v in parameters.items() if k not in COUNT_REVEALING}
    return {**privacy, "parameters": parameters, "released": dict(released)}


SECAGG_RELEASES = {
    "secagg-keys": ["ephemeral public keys for secure aggregation"],
    "secagg-bundles": ["encrypted secret shares for secure aggregation, readable only by their addressee"],
    "secagg-complaints": ["the peers whose share bundles did not open for this institution"],
    "secagg-masked": ["masked soft labels on public transfer samples (unreadable alone: secure aggregation)",
                      "training summary (loss, teacher size)"],
    "secagg-signature": ["a signature of the survivor set of a secure-aggregation round"],
    "secagg-shares": ["secret shares that open the sum of the institutions' soft labels"],
}


def sign_and_log(
    identity: Identity, reply: RecordDict, query: RecordDict, *, run_id: int, round_: int, node_id: int,
    fingerprint: str, with_counts: bool = False, with_accuracy: bool = False, digest: bool = False,
    kind: str | None = None, privacy: dict | None = None, with_timings: bool = False,
) -> RecordDict:
    """Attest `reply` (bound to its exact bytes and to the query), log the release, attach the attestation.

    A soft-label reply states the soft labels and what else it carries (counts, accuracy, and the compute
    timings attached after signing: `with_timings`; a FedAvg reply states those too); a FedMD
    digest reply (`digest=True`) releases only two losses; `kind` names a secure-aggregation
    message (a key of SECAGG_RELEASES) or a FedAvg reply (`kinds.FEDAVG_PAYLOAD`: trained weights).
    """
    payload_sha256, payload_bytes = record_digest(reply)
    query_sha256, _ = record_digest(query, exclude=QUERY_DIGEST_EXCLUDES)  # its witness request is not the query
    payload: dict[str, Any]
    if kind == kinds.FEDAVG_PAYLOAD:  # full weights leave: each array's name, dtype and shape are stated
        payload, categories = {**payload_description(reply, "arrays"), "kind": kind}, FEDAVG_CATEGORIES
    elif kind == kinds.WITNESS_PHASE:
        payload, categories = {"kind": kind, "codec": None, "arrays": {}}, [WITNESS_CATEGORY]
    elif kind is not None:
        payload, categories = {"kind": kind, "codec": None, "arrays": {}}, SECAGG_RELEASES[kind]
    elif digest:
        payload, categories = {"kind": "digest-losses", "codec": None, "arrays": {}}, [DIGEST_CATEGORY]
    else:
        payload = payload_description(reply)
        categories = SOFT_LABEL_CATEGORIES + [COUNTS_CATEGORY] * with_counts + [ACCURACY_CATEGORY] * with_accuracy
    categories = categories + [TIMINGS_CATEGORY] * with_timings
    attestation = attest(
        identity.signer, run_id=run_id, round_=round_, node_id=node_id, public_fingerprint=fingerprint,
        query_sha256=query_sha256, payload_sha256=payload_sha256, payload_bytes=payload_bytes,
        payload=payload, data_categories=categories, privacy=privacy,
    )
    log = Ledger.open(identity.release_log, identity.signer, {"institution_id": identity.signer.name})
    log.append(kinds.RELEASE, {"run_id": str(run_id), "round": int(round_), "node_id": str(node_id),
                               "attestation": attestation.as_dict()})
    return attach_attestation(reply, attestation)


def with_site_toml(cfg: RunConfig, node: NodeConfig) -> NodeConfig:
    """The node config, with a simulated institution's site.toml filling the budget keys it leaves unset."""
    if not cfg.sites_dir or node.partition_id is None:
        return node
    path = site_folder(cfg.sites_dir, node.partition_id) / SITE_CONFIG
    if not path.is_file():
        return node
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        log(WARNING, "%s is not valid TOML: %s", path, error)  # the path stays on the node
        raise ConfigError(f"this institution's {SITE_CONFIG} is not valid TOML: {error}; fix it") from None
    return node.with_site_settings(settings)
