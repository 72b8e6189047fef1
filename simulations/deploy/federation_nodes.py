"""The coordinator's register of SuperNodes: check an institution's node key, register it with the SuperLink,
and list the registered nodes with their names and key fingerprints.

A node key is the OpenSSH public line of an EC key on a NIST curve (`ecdsa-sha2-nistp384 AAAA... NAME`,
keys/NAME-node.pub of `fedstill institution-init`); the institution's Ed25519 signing key (`ed25519:...`,
keys/NAME.pub) belongs in the allow-list instead. `flwr supernode list` leaves out the name a node was
registered under, so the list is read here with the same connection code through the Control API.
A key's fingerprint is the first 16 hex digits of the sha256 of its DER SubjectPublicKeyInfo: the same
for the .pub file the institution sent and for the key the SuperLink holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.audit.keys import KEY_PREFIX
from common.errors import ConfigError
from simulations.deploy.coordinator import ANSI, Control, DeployError
from simulations.launcher import cli_error_in

NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts
REGISTERED = re.compile(r"SuperNode (\d+) registered")


@dataclass(frozen=True)
class Registration:
    node_id: int | None
    already: bool = False  # the key was registered before


@dataclass(frozen=True)
class NodeEntry:
    node_id: int
    name: str
    status: str
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {"node-id": self.node_id, "name": self.name, "status": self.status, "fingerprint": self.fingerprint}


def check_node_public_key(path: Path, name: str) -> ec.EllipticCurvePublicKey:
    """The node key in `path`, or a ConfigError saying which key the file holds and which one to register."""
    fix = f"register {name}'s node key keys/{name}-node.pub"
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as error:
        raise ConfigError(f"cannot read {path} ({error.strerror}); {fix}") from None
    if text.startswith(KEY_PREFIX):
        raise ConfigError(f"{path} is {name}'s signing key: add it with `fedstill allow-list add {name} {path} "
                          f"--allow-list FILE`; {fix}")
    if "PRIVATE KEY" in text:
        raise ConfigError(f"{path} is a private key, which never leaves the institution; {fix}")
    try:
        key = serialization.load_ssh_public_key(text.splitlines()[0].encode("ascii") if text else b"")
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        raise ConfigError(f"{path} is not an OpenSSH public key line (\"ecdsa-sha2-nistp384 AAAA... {name}\"); {fix}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__.removeprefix('_')}, not an EC node key; {fix}")
    if not isinstance(key.curve, NIST_CURVES):
        raise ConfigError(f"{path} is an EC key on {key.curve.name}, which Flower refuses (NIST curves only, "
                          f"e.g. P-384); {fix}")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def fingerprint_of_bytes(public_key: bytes) -> str:
    """The fingerprint of a key as the SuperLink keeps it (PEM SubjectPublicKeyInfo); of the raw bytes otherwise."""
    try:
        key = serialization.load_pem_public_key(public_key)
    except (ValueError, UnsupportedAlgorithm):
        return hashlib.sha256(public_key).hexdigest()[:16]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return fingerprint(key)
    return hashlib.sha256(public_key).hexdigest()[:16]


def register_node(control: Control, public_key: Path, name: str) -> Registration:
    """`flwr supernode register NODEPUB FED --name NAME`: the new node id, or `already` when the key is registered."""
    out = control.flwr(["supernode", "register", str(public_key), control.federation, "--name", name])
    output = ANSI.sub("", out.stdout + out.stderr)
    match = REGISTERED.search(output)
    if out.returncode == 0 and match:
        return Registration(int(match.group(1)))
    if "already in use" in output:
        return Registration(None, already=True)
    raise DeployError(f"`flwr supernode register` did not register {name}'s node key on {control.federation}: "
                      f"{cli_error_in(output) or output.strip()[-500:] or 'no output'}")


def node_entries(infos: Iterable[Any]) -> list[NodeEntry]:
    """Flower's NodeInfo records as table rows, by name then id; unregistered nodes are left out, as Flower does."""
    rows = [NodeEntry(int(info.node_id), info.name or "-", info.status, fingerprint_of_bytes(info.public_key))
            for info in infos if info.status != "unregistered"]
    return sorted(rows, key=lambda row: (row.name, row.node_id))


def list_nodes(federation: str) -> list[NodeEntry]:
    """The federation's nodes, read from the SuperLink's Control API with the connection in $FLWR_HOME/config.toml."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    chatter = io.StringIO()  # Flower prints "Using SuperLink: ..." on stdout
    try:
        with contextlib.redirect_stdout(chatter):
            connection = read_superlink_connection(federation)
            client = init_http_client_from_connection(connection)
            try:
                with flwr_cli_exc_handler():
                    response = client.ListNodes(ListNodesRequest())
            finally:
                client.close()
    except click.ClickException as error:
        raise DeployError(f"cannot list the nodes of {federation}: {error.format_message()}") from None
    return node_entries(response.nodes_info)
