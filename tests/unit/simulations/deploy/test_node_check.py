"""An institution's checks before its SuperNode starts: TLS against a real local TLS server, the node
key, and the node config."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from common.errors import ConfigError, DataError
from common.node_config import NodeConfig
from simulations.deploy.certs import make_ca, make_node_key, make_server_cert, write_node_key, write_pem
from simulations.deploy.node_check import (
    check_auth_key,
    check_ca_file,
    check_node_config,
    check_site_policy,
    check_superlink,
    parse_node_config,
    split_address,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 only (no loopback names added), and another CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca("test CA", 1)
    key, cert = make_server_cert(ca_key, ca, ["127.0.0.1"], 1, with_loopback=False)
    write_pem(folder / "ca.crt", ca)
    write_pem(folder / "server.crt", cert)
    write_pem(folder / "server.key", key, private=True)
    _, other = make_ca("other CA", 1)
    write_pem(folder / "other.crt", other)
    return folder


@pytest.fixture(scope="module")
def tls_server(pki):
    """A TLS server on 127.0.0.1 that completes handshakes (as the SuperLink would) and hangs up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(timeout=2)
    listener.close()


def test_the_right_ca_completes_the_handshake(pki: Path, tls_server: int) -> None:
    # Execute / Assert: no error
    check_superlink(f"127.0.0.1:{tls_server}", pki / "ca.crt")


def test_the_wrong_ca_is_named_as_such(pki: Path, tls_server: int) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"does not vouch for .*this node was given the wrong CA; get the federation's ca.crt"):
        check_superlink(f"127.0.0.1:{tls_server}", pki / "other.crt")


def test_a_host_the_certificate_does_not_name(pki: Path, tls_server: int) -> None:
    # Execute / Assert: the certificate names 127.0.0.1 only
    with pytest.raises(ConfigError, match=r"does not name 'localhost'.*fedstill certs --host localhost"):
        check_superlink(f"localhost:{tls_server}", pki / "ca.crt")


def test_nothing_listening(pki: Path) -> None:
    # Prepare: a port nobody listens on
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"nothing accepts connections at 127.0.0.1:\d+: check that the SuperLink runs"):
        check_superlink(f"127.0.0.1:{port}", pki / "ca.crt")


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found; copy the federation's ca.crt"),
    (b"not a certificate", "holds no PEM certificate"),
])
def test_bad_ca_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    # Prepare
    path = tmp_path / "ca.crt"
    if content is not None:
        path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        check_ca_file(path)


@pytest.mark.parametrize("address", ["superlink", "superlink:", ":8000", "superlink:port"])
def test_addresses_without_host_and_port(address: str) -> None:
    with pytest.raises(ConfigError, match="is not host:port"):
        split_address(address)


def test_addresses() -> None:
    assert split_address("superlink.example.org:8000") == ("superlink.example.org", 8000)
    assert split_address("[::1]:9092") == ("::1", 9092)


def test_a_node_key_from_fedstill_certs_is_accepted(tmp_path: Path) -> None:
    # Prepare
    private, _ = write_node_key(make_node_key(), tmp_path, "hospital-a")

    # Execute / Assert: no error
    check_auth_key(private)


def test_node_key_problems(tmp_path: Path) -> None:
    # missing
    with pytest.raises(ConfigError, match="not found; make one with `fedstill certs"):
        check_auth_key(tmp_path / "missing.key")
    # not an OpenSSH key
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(ConfigError, match="is not an unencrypted OpenSSH private key"):
        check_auth_key(tmp_path / "junk.key")
    # an OpenSSH key of the wrong kind
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    (tmp_path / "ed.key").write_bytes(ed)
    os.chmod(tmp_path / "ed.key", 0o600)
    with pytest.raises(ConfigError, match="needs an elliptic-curve key"):
        check_auth_key(tmp_path / "ed.key")
    # readable by others
    private, _ = write_node_key(make_node_key(), tmp_path, "open")
    os.chmod(private, 0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 644\); `chmod 600"):
        check_auth_key(private)


def test_node_config_parses_as_flower_does() -> None:
    assert parse_node_config('data-path="/data/a b" max-epsilon=4.0 partition-id=2 flag=true') == {
        "data-path": "/data/a b", "max-epsilon": 4.0, "partition-id": 2, "flag": True,
    }
    assert parse_node_config("  ") == {}


def test_node_config_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a list of key=value"):
        parse_node_config('data-path="/unterminated')
    with pytest.raises(ConfigError, match="signing-key='/nowhere/k.key': no such file"):
        check_node_config({"signing-key": "/nowhere/k.key", "institution-id": "a"})
    with pytest.raises(ConfigError, match="release-log=.*its folder does not exist"):
        check_node_config({"release-log": str(tmp_path / "no" / "log.jsonl")})
    (tmp_path / "k.key").write_text("x")
    with pytest.raises(ConfigError, match="has signing-key but no institution-id"):
        check_node_config({"signing-key": str(tmp_path / "k.key")})
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="is an empty folder"):
        check_node_config({"data-path": str(tmp_path / "data")})


def test_the_node_check_parses_the_node_config_as_the_clientapp_does(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "k.key").write_text("x")
    good = {"institution-id": "a", "signing-key": str(tmp_path / "k.key"), "partition-id": 2, "max-epsilon": 4}

    # Execute / Assert: the ClientApp's words for an ill-typed key, and its NodeConfig when all is well
    with pytest.raises(ConfigError, match=r"node config state-dir must be a folder path \(a string\), got 3"):
        check_node_config({"state-dir": 3})
    with pytest.raises(ConfigError, match=r"delta must be a float in \(0, 1\), got 2.0"):
        check_node_config({"delta": 2.0})
    assert check_node_config(good) == NodeConfig.from_node_config(good)


def test_the_node_check_reads_the_site_policy_where_the_node_will(tmp_path: Path) -> None:
    # Prepare: the policy lives next to the release log (the institution's own folder)
    (tmp_path / "k.key").write_text("x")
    node = check_node_config({"institution-id": "a", "signing-key": str(tmp_path / "k.key")})

    # Execute / Assert: no file is the defaults; a file is summarised; a bad file stops the node before it starts
    assert check_site_policy(node).startswith("no site policy")
    (tmp_path / "site-policy.toml").write_text('mechanisms = ["dp-sgd"]\nmax-epsilon = 4.0\n')
    assert check_site_policy(node) == 'site policy max-epsilon = 4; mechanisms = ["dp-sgd"]'
    (tmp_path / "site-policy.toml").write_text('counts = "approx"\n')
    with pytest.raises(ConfigError, match=r"site-policy: counts must be one of .* got 'approx'; fix site-policy.toml"):
        check_site_policy(node)
    with pytest.raises(ConfigError, match="node config site-policy names no readable file"):
        check_site_policy(check_node_config({"site-policy": str(tmp_path / "none.toml")}))
