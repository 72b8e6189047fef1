"""An institution's checks before its SuperNode starts: TLS against a real local TLS server, the local
port, the node key, and the node config (a .toml file or key=value text; absolute paths; each key in its role)."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from common.audit.keys import Signer, write_allow_list, write_key_pair
from common.errors import ConfigError, DataError
from common.node_config import NodeConfig
from simulations.deploy.approved_apps import approve
from simulations.deploy.certs import make_ca, make_node_key, make_server_cert, write_node_key, write_pem
from simulations.deploy.institution import InstitutionFolder, init_institution
from simulations.deploy.node_check import (
    PATH_KEYS,
    check_auth_key,
    check_ca_file,
    check_node_config,
    check_port,
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
    with pytest.raises(ConfigError, match=r"does not name 'localhost'.*fedstill certs --ca-dir CADIR --out CERTS --host localhost"):
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
    with pytest.raises(ConfigError, match="not found; `fedstill institution-init NAME --out DIR` makes DIR/keys/NAME-node.key"):
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
    with pytest.raises(ConfigError, match="needs an elliptic-curve key: keys/NAME-node.key"):
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


# The local port, keys in the wrong role, relative paths, a .toml node config


def test_a_port_in_use_on_loopback_is_refused_naming_another_port() -> None:
    # Prepare: another SuperNode's port
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        # Execute / Assert
        with pytest.raises(ConfigError, match=rf"--port {port} is already in use on 127.0.0.1: another SuperNode on this "
                                              rf"host\? give each node its own --port, e.g. --port {port + 1}"):
            check_port(port)

    check_port(port)  # free again once the other node is gone


def signing_key(folder: Path, name: str = "hospital-a", passphrase: bytes | None = None) -> Path:
    return write_key_pair(Signer.generate(name), folder, passphrase)[0]


@pytest.mark.parametrize("passphrase", [None, b"s3cret"])
def test_the_signing_key_given_as_node_key_is_named_as_such(tmp_path: Path, passphrase: bytes | None) -> None:
    # Prepare
    key = signing_key(tmp_path, passphrase=passphrase)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"is a signing key \(PEM\), not a node key: keys/NAME-node.key \(the OpenSSH EC "
                                          r"node key\) is for --auth-supernode-private-key"):
        check_auth_key(key)


def test_the_node_key_given_as_signing_key_is_named_as_such(tmp_path: Path) -> None:
    # Prepare
    node_key, _ = write_node_key(make_node_key(), tmp_path, "hospital-a-node")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"signing-key=.*hospital-a-node.key' is the node key \(OpenSSH\): "
                                          r"keys/hospital-a-node.key .* is for --auth-supernode-private-key; "
                                          r"keys/hospital-a.key \(the Ed25519 signing key\) is for the node config's signing-key"):
        check_node_config({"institution-id": "hospital-a", "signing-key": str(node_key)})


def test_a_tls_key_given_as_signing_key_is_refused(tmp_path: Path) -> None:
    # Prepare: the CA's key, an EC PEM key
    path = write_pem(tmp_path / "ca.key", make_ca("test CA", 1)[0], private=True)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"holds an EC key \(ca.key or superlink.key\?\), not an Ed25519 signing key; "
                                          r"keys/hospital-a.key"):
        check_node_config({"institution-id": "hospital-a", "signing-key": str(path)})


def test_a_signing_key_in_its_role_passes(tmp_path: Path) -> None:
    # Prepare
    key = signing_key(tmp_path)

    # Execute
    node = check_node_config({"institution-id": "hospital-a", "signing-key": str(key)})

    # Assert
    assert node.signing_key == str(key)


@pytest.mark.parametrize("key", PATH_KEYS)
def test_a_relative_path_in_the_node_config_is_refused(key: str) -> None:
    # Prepare
    config = {key: "keys/hospital-a.x", **({"institution-id": "hospital-a"} if key == "signing-key" else {})}

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"node config {key}='keys/hospital-a.x' is a relative path; give the absolute "
                                          r"path .*a SuperNode under a service manager resolves relative paths"):
        check_node_config(config)


def test_a_coordinator_key_given_as_text_is_no_path(tmp_path: Path) -> None:
    # Prepare
    public = Signer.generate("coordinator").public

    # Execute
    node = check_node_config({"coordinator-key": public})

    # Assert
    assert node.coordinator_key == public


@pytest.mark.parametrize(("key", "fix"), [
    ("allow-list", "copy the consortium's allow-list.toml the coordinator sent there"),
    ("coordinator-key", "copy coordinator.pub the coordinator sent there"),
])
def test_a_file_the_node_will_read_must_be_there_before_it_starts(tmp_path: Path, key: str, fix: str) -> None:
    # Execute / Assert: a node started before the coordinator's files arrived is stopped, with the fix
    with pytest.raises(ConfigError, match=f"node config {key}=.*no such file on this machine; {fix}"):
        check_node_config({key: str(tmp_path / "missing")})


def test_a_toml_node_config_parses_as_flower_supernode_parses_it(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    # Prepare
    path = tmp_path / "node-config.toml"
    path.write_text('institution-id = "hospital-a"\nmax-epsilon = 4.0\npartition-id = 2\n[extra]\nflag = true\n')

    # Execute
    parsed = parse_node_config(str(path))

    # Assert
    assert parsed == parse_config_args([str(path)])
    assert parsed == {"institution-id": "hospital-a", "max-epsilon": 4.0, "partition-id": 2, "extra.flag": True}


@pytest.mark.parametrize(("text", "message"), [
    (None, "node config file .* not found; give the node-config.toml `fedstill institution-init` wrote"),
    ("site-policy=/site/policy.toml", "is read as a file name .*; quote the value"),
    ('data-path = "/unterminated\n', "is not flat TOML"),
    ("data-path = [1, 2]\n", "is not flat TOML"),
])
def test_a_bad_toml_node_config_is_refused(tmp_path: Path, text: str | None, message: str) -> None:
    # Prepare
    path = tmp_path / "node-config.toml"
    if text is not None and text.endswith("\n"):
        path.write_text(text)
    argument = text if text is not None and not text.endswith("\n") else str(path)

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        parse_node_config(argument)


# `fedstill supernode`: the checks on this machine come before the SuperLink's


@pytest.fixture
def institution(tmp_path: Path, pki: Path) -> InstitutionFolder:
    """An institution folder as `fedstill institution-init` lays it out, with what the coordinator sent and its data."""
    folder = init_institution("hospital-a", tmp_path / "inst")
    (folder.root / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    write_allow_list(folder.root / "allow-list.toml", {"hospital-a": folder.signing_public.read_text().strip()})
    (folder.root / "coordinator.pub").write_text(Signer.generate("coordinator").public + "\n")
    (folder.root / "data" / "site.csv").write_text("x0,x1,label\n0.5,1.0,0\n1.5,0.0,1\n")
    approve(folder.root / "approved-apps.toml", "0" * 64)
    return folder


def free_port() -> int:
    """A local port nobody holds now (the default 9094 may be another test's)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def supernode(institution: InstitutionFolder, *extra: str, port: int = 1, node_key: Path | None = None):
    """`fedstill supernode --check-only` for `institution`, dialling 127.0.0.1:`port` (1: nothing listens)."""
    from simulations.cli.main import app

    root = institution.root
    local = [] if "--port" in extra else ["--port", str(free_port())]
    return CliRunner().invoke(app, [
        "supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(root / "ca.crt"),
        "--auth-supernode-private-key", str(node_key or institution.node_key),
        "--approved-apps", str(root / "approved-apps.toml"), "--check-only", *local, *extra])


def test_supernode_with_the_institution_init_folder_passes_every_check(institution: InstitutionFolder, tls_server: int) -> None:
    # Prepare
    free = free_port()

    # Execute
    result = supernode(institution, "--node-config", str(institution.node_config_path), "--port", str(free), port=tls_server)

    # Assert
    assert result.exit_code == 0, result.output
    assert "checks passed" in result.output and f"port {free} free" in result.output
    assert "institution-id" in result.output and "signing-key" in result.output


def test_supernode_starts_flowers_supernode_polling_at_its_interval_beside_the_runner(
    institution: InstitutionFolder, tls_server: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: record what would start instead of starting it
    from simulations.cli import node_commands

    started: list[list[str]] = []
    monkeypatch.setattr(node_commands.subprocess, "Popen", lambda command: started.append(command))
    monkeypatch.setattr(node_commands.os, "execv", lambda path, command: started.append(command))
    root = institution.root
    arguments = ["supernode", "--superlink", f"127.0.0.1:{tls_server}", "--root-certificates", str(root / "ca.crt"),
                 "--auth-supernode-private-key", str(institution.node_key), "--approved-apps", str(root / "approved-apps.toml"),
                 "--node-config", str(institution.node_config_path), "--port", str(free_port())]

    # Execute
    from simulations.cli.main import app

    default = CliRunner().invoke(app, arguments)
    slower = CliRunner().invoke(app, [*arguments, "--poll-interval", "2"])

    # Assert: the runner, then Flower's SuperNode through supernode_poll, with Flower's own arguments after "--"
    assert default.exit_code == 0 and slower.exit_code == 0, default.output + slower.output
    runner_command, node_command = started[0], started[1]
    assert runner_command[1:4] == ["-m", "simulations.deploy.runner", "dispatch"]
    assert node_command[1:6] == ["-m", "simulations.deploy.supernode_poll", "--poll-interval", "0.5", "--"]
    assert node_command[6:8] == ["--superlink", f"127.0.0.1:{tls_server}"] and "--isolation" in node_command
    assert started[3][3:5] == ["--poll-interval", "2.0"]


def test_supernode_refuses_a_port_in_use_before_dialling(institution: InstitutionFolder) -> None:
    # Prepare
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        # Execute
        result = supernode(institution, "--node-config", str(institution.node_config_path), "--port", str(port))

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith(f"ConfigError: --port {port} is already in use on 127.0.0.1")
    assert len(result.output.strip().splitlines()) == 1


def test_supernode_refuses_the_node_key_as_signing_key(institution: InstitutionFolder, tls_server: int) -> None:
    # Prepare: a node config naming the node key where the signing key belongs
    config = f'institution-id="hospital-a" signing-key="{institution.node_key}" data-path="{institution.root / "data"}"'

    # Execute
    result = supernode(institution, "--node-config", config, port=tls_server)

    # Assert
    assert result.exit_code == 1
    assert "ConfigError: node config signing-key=" in result.output and "is the node key (OpenSSH)" in result.output


def test_supernode_refuses_the_signing_key_as_node_key(institution: InstitutionFolder, tls_server: int) -> None:
    # Execute
    result = supernode(institution, "--node-config", str(institution.node_config_path), port=tls_server,
                       node_key=institution.signing_key)

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith(f"ConfigError: --auth-supernode-private-key {institution.signing_key} is a signing key")


def test_supernode_refuses_a_relative_path_before_dialling(institution: InstitutionFolder) -> None:
    # Execute
    result = supernode(institution, "--node-config", 'institution-id="hospital-a" signing-key="keys/hospital-a.key"')

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith("ConfigError: node config signing-key='keys/hospital-a.key' is a relative path")
