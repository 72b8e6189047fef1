"""Registering an institution's node key: the key is checked first (a signing key, a key on no NIST curve and a
private key are refused with the file to use instead), then `flwr supernode register` is run; node listing rows
and key fingerprints."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from common.audit.keys import Signer, write_key_pair
from common.errors import ConfigError
from simulations.deploy.certs import make_node_key, write_node_key
from simulations.deploy.coordinator import Control, DeployError
from simulations.deploy.federation_nodes import (
    check_node_public_key,
    fingerprint,
    fingerprint_of_bytes,
    node_entries,
    register_node,
)


class RecordingFlwr:
    """`flwr ARGS` answering one fixed output; records every call."""

    def __init__(self, code: int, output: str) -> None:
        self.code, self.output = code, output
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        return subprocess.CompletedProcess(list(args), self.code, self.output, "")


@pytest.fixture
def node_pub(tmp_path: Path) -> Path:
    return write_node_key(make_node_key(), tmp_path / "keys", "hospital-a-node")[1]


def openssh_line(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def test_a_p384_node_key_is_accepted(node_pub: Path) -> None:
    # Execute
    key = check_node_public_key(node_pub, "hospital-a")

    # Assert
    assert key.curve.name == "secp384r1"


def test_the_signing_key_is_refused_and_the_allow_list_named(tmp_path: Path) -> None:
    # Prepare: keys/NAME.pub, the "ed25519:..." line
    _, public = write_key_pair(Signer.generate("hospital-a"), tmp_path / "keys")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"is hospital-a's signing key: add it with `fedstill allow-list add hospital-a .*"
                                          r"register hospital-a's node key keys/hospital-a-node.pub"):
        check_node_public_key(public, "hospital-a")


@pytest.mark.parametrize("key", [ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)],
                         ids=["ssh-ed25519", "ssh-rsa"])
def test_a_key_on_no_nist_curve_is_refused(tmp_path: Path, key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> None:
    # Prepare
    path = tmp_path / "node.pub"
    path.write_bytes(openssh_line(key) + b" hospital-a\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="not an EC node key; register hospital-a's node key keys/hospital-a-node.pub"):
        check_node_public_key(path, "hospital-a")


def test_a_private_key_or_garbage_is_refused(tmp_path: Path) -> None:
    # Prepare
    private, _ = write_node_key(make_node_key(), tmp_path, "hospital-a-node")
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="is a private key, which never leaves the institution"):
        check_node_public_key(private, "hospital-a")
    with pytest.raises(ConfigError, match="is not an OpenSSH public key line"):
        check_node_public_key(garbage, "hospital-a")
    with pytest.raises(ConfigError, match="cannot read"):
        check_node_public_key(tmp_path / "absent.pub", "hospital-a")


def test_register_runs_flwr_supernode_register_with_the_name(node_pub: Path) -> None:
    # Prepare
    flwr = RecordingFlwr(0, "Using SuperLink: remote (superlink.example.org:8000)\n✅ SuperNode 1234567 registered successfully.\n")

    # Execute
    registration = register_node(Control("remote", flwr), node_pub, "hospital-a")

    # Assert
    assert flwr.calls == [["supernode", "register", str(node_pub), "remote", "--name", "hospital-a"]]
    assert registration.node_id == 1234567 and not registration.already


def test_a_key_registered_before_is_no_error(node_pub: Path) -> None:
    # Prepare: Flower's answer to a second registration of the same key
    flwr = RecordingFlwr(1, "╭─ Error ─╮\n│ [code: 412] Public key already in use. │\n╰──╯\n")

    # Execute
    registration = register_node(Control("remote", flwr), node_pub, "hospital-a")

    # Assert
    assert registration.already and registration.node_id is None


def test_any_other_refusal_is_an_error_with_flowers_reason(node_pub: Path) -> None:
    # Prepare
    flwr = RecordingFlwr(1, "╭─ Error ─╮\n│ Connection to the SuperLink is unavailable. │\n╰──╯\n")

    # Execute / Assert
    with pytest.raises(DeployError, match="did not register hospital-a's node key on remote: Connection to the SuperLink"):
        register_node(Control("remote", flwr), node_pub, "hospital-a")


def test_the_cli_refuses_a_signing_key_before_calling_flwr(tmp_path: Path) -> None:
    from simulations.cli.main import app

    # Prepare
    _, public = write_key_pair(Signer.generate("hospital-a"), tmp_path / "keys")

    # Execute
    result = CliRunner().invoke(app, ["register", "hospital-a", str(public), "--federation", "nowhere"])

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith("ConfigError: ") and "signing key" in result.output


def test_the_fingerprint_of_the_pub_file_is_the_one_of_the_key_the_superlink_holds(node_pub: Path) -> None:
    # Prepare: the SuperLink keeps the key as Flower's register command sends it
    key = check_node_public_key(node_pub, "hospital-a")

    # Execute / Assert
    assert fingerprint(key) == fingerprint_of_bytes(public_key_to_bytes(key))
    assert len(fingerprint(key)) == 16 and fingerprint(key) != fingerprint(make_node_key().public_key())


def test_node_rows_carry_the_registered_name_and_leave_out_unregistered_nodes() -> None:
    # Prepare
    keys = [public_key_to_bytes(make_node_key().public_key()) for _ in range(3)]
    infos = [NodeInfo(node_id=9, name="hospital-b", status="online", public_key=keys[0]),
             NodeInfo(node_id=3, name="hospital-a", status="registered", public_key=keys[1]),
             NodeInfo(node_id=5, name="gone", status="unregistered", public_key=keys[2]),
             NodeInfo(node_id=7, status="offline", public_key=b"not pem")]

    # Execute
    rows = node_entries(infos)

    # Assert
    assert [(r.node_id, r.name, r.status) for r in rows] == [(7, "-", "offline"), (3, "hospital-a", "registered"),
                                                             (9, "hospital-b", "online")]
    assert rows[1].fingerprint == fingerprint_of_bytes(keys[1]) and len(rows[0].fingerprint) == 16
