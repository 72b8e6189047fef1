"""Deployment certificates and node keys: X.509, TLS handshakes on loopback, Flower's own loaders, the CLI."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from common.errors import ConfigError
from simulations.deploy.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    check_bundle,
    load_ca,
    make_ca,
    make_node_key,
    make_server_cert,
    parse_host,
    subject_alt_names,
    write_node_key,
    write_pem,
)

HOSTS = ["superlink.example.org", "10.0.0.5", "2001:db8::1"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_bundle(folder: Path, hosts: list[str] = HOSTS, ca: tuple | None = None) -> Path:
    ca_key, ca_cert = ca or make_ca("test CA", 30)
    key, cert = make_server_cert(ca_key, ca_cert, hosts, 30)
    write_pem(folder / CA_CERT, ca_cert)
    write_pem(folder / CA_KEY, ca_key, private=True)
    write_pem(folder / SERVER_CERT, cert)
    write_pem(folder / SERVER_KEY, key, private=True)
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same CA name, different CA key: must not be trusted in place of `bundle`'s."""
    return write_bundle(tmp_path_factory.mktemp("other"))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# X.509 properties


def test_ca_is_a_self_signed_p384_ca_that_can_only_sign_end_entities() -> None:
    # Execute
    key, cert = make_ca("fedstill CA", 10)

    # Assert
    assert isinstance(key.curve, ec.SECP384R1)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.issuer == cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fedstill CA"
    cert.verify_directly_issued_by(cert)  # self-signed
    assert 9.9 < (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400 < 10.1


def test_two_cas_get_different_random_serials() -> None:
    # Execute
    serials = {make_ca("fedstill CA", 1)[1].serial_number for _ in range(3)}

    # Assert
    assert len(serials) == 3


def test_server_cert_chains_to_the_ca_and_names_every_host_plus_loopback() -> None:
    # Prepare
    ca_key, ca_cert = make_ca("fedstill CA", 10)

    # Execute
    key, cert = make_server_cert(ca_key, ca_cert, HOSTS, 10)

    # Assert
    ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    assert cert.issuer == ca_cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(h) for h in ("10.0.0.5", "2001:db8::1", "127.0.0.1", "::1")}
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "superlink.example.org"
    assert key.public_key() == cert.public_key()


def test_loopback_names_can_be_left_out() -> None:
    # Prepare
    ca_key, ca_cert = make_ca("fedstill CA", 10)

    # Execute
    _, cert = make_server_cert(ca_key, ca_cert, ["SuperLink.Example.org."], 10, with_loopback=False)

    # Assert
    assert subject_alt_names(cert) == ["superlink.example.org"]


@pytest.mark.parametrize("text, expected", [
    ("superlink.example.org", "superlink.example.org"),
    ("SuperLink.Example.ORG.", "superlink.example.org"),
    ("*.example.org", "*.example.org"),
    ("localhost", "localhost"),
    ("192.168.1.20", ipaddress.ip_address("192.168.1.20")),
    ("[fe80::1]", ipaddress.ip_address("fe80::1")),
    ("2001:db8::1", ipaddress.ip_address("2001:db8::1")),
])
def test_hosts_parse_as_dns_names_or_ip_addresses(text: str, expected: object) -> None:
    # Execute
    parsed = parse_host(text)

    # Assert
    assert parsed == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("super link", "spaces"),
    ("https://superlink.example.org", "not a URL"),
    ("superlink.example.org:8000", ":port"),
    ("-bad.example.org", "not a valid DNS name"),
    ("bad_name.example.org", "not a valid DNS name"),
    ("a" * 64 + ".org", "not a valid DNS name"),
    ("10.0.0.256", "not a valid one"),
    ("exämple.org", "punycode"),
    ("foo.*.org", "not a valid DNS name"),
])
def test_bad_hosts_are_config_errors_saying_what_is_wrong(text: str, fragment: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        parse_host(text)

    # Assert
    assert fragment in str(caught.value)


@settings(max_examples=50, deadline=None)
@given(st.ip_addresses())
def test_every_ip_address_parses_to_itself(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    # Execute / Assert
    assert parse_host(str(address)) == address


@pytest.mark.parametrize("days", [0, -5])
def test_non_positive_validity_is_a_config_error(days: int) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="--days"):
        make_ca("fedstill CA", days)


def test_no_hosts_is_a_config_error() -> None:
    # Prepare
    ca_key, ca_cert = make_ca("fedstill CA", 10)

    # Execute / Assert
    with pytest.raises(ConfigError, match="no host given"):
        make_server_cert(ca_key, ca_cert, [], 10)


# TLS handshakes on loopback: the SuperLink serves with uvicorn (Python ssl); nodes verify with httpx (Python ssl)


def handshake(bundle: Path, cafile: Path, server_hostname: str) -> str:
    """Serve one TLS connection on 127.0.0.1 with the bundle's server files; return the negotiated version."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(bundle / SERVER_CERT, bundle / SERVER_KEY)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError):
            pass  # the client's failure is what the test looks at

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_context = ssl.create_default_context(cafile=str(cafile))
        client_context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
                return tls.version() or ""
    finally:
        thread.join(timeout=5)
        listener.close()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_succeeds_with_the_ca_and_a_named_host(bundle: Path, server_hostname: str) -> None:
    # Execute
    version = handshake(bundle, bundle / CA_CERT, server_hostname)

    # Assert
    assert version.startswith("TLS")


def test_tls_handshake_fails_against_another_ca(bundle: Path, other_bundle: Path) -> None:
    # Execute / Assert
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(bundle, other_bundle / CA_CERT, "localhost")


def test_tls_handshake_fails_for_a_host_not_in_the_certificate(bundle: Path) -> None:
    # Execute / Assert
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        handshake(bundle, bundle / CA_CERT, "elsewhere.example.org")


def test_grpc_accepts_the_p384_certificate_as_flower_configures_it(bundle: Path) -> None:
    """Flower's Control API and legacy Fleet API are gRPC servers built from the same three files."""
    grpc = pytest.importorskip("grpc")
    # Prepare
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials(
        (((bundle / SERVER_KEY).read_bytes(), (bundle / SERVER_CERT).read_bytes()),),
        root_certificates=(bundle / CA_CERT).read_bytes(), require_client_auth=False)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        channel = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials((bundle / CA_CERT).read_bytes()))

        # Execute / Assert
        grpc.channel_ready_future(channel).result(timeout=10)
        channel.close()
    finally:
        server.stop(None)


# Node authentication keys, loaded by Flower's own code


def test_node_key_files_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes, sign_message, verify_signature
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    # Prepare
    private_path, public_path = write_node_key(make_node_key(), tmp_path / "nodes", "hospital-a")

    # Execute
    private, public = _try_setup_client_authentication(argparse.Namespace(  # what --auth-supernode-private-key runs
        auth_supernode_private_key=str(private_path), auth_supernode_public_key=None))
    registered = try_load_public_key(public_path)  # what `flwr supernode register NAME.pub` runs

    # Assert
    assert isinstance(private.curve, ec.SECP384R1)
    assert registered == public_key_to_bytes(public)
    assert verify_signature(bytes_to_public_key(registered), b"2025-01-01T00:00:00", sign_message(private, b"2025-01-01T00:00:00"))
    assert public_path.read_text().startswith("ecdsa-sha2-nistp384 AAAA")
    assert public_path.read_text().rstrip("\n").endswith(" hospital-a")
    assert private_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert mode(private_path) == 0o600


def test_a_node_key_passphrase_is_refused_because_flower_cannot_read_it(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(ConfigError, match="flower-supernode cannot read"):
        write_node_key(make_node_key(), tmp_path, "bank-b", passphrase=b"correct horse")

    # Assert
    assert not list(tmp_path.iterdir())


def test_bad_node_names_are_config_errors(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="identity name"):
        write_node_key(make_node_key(), tmp_path, "../escape")


# Files on disk


def test_private_pem_is_0600_and_certificate_0644(bundle: Path) -> None:
    # Assert
    assert mode(bundle / CA_KEY) == 0o600 and mode(bundle / SERVER_KEY) == 0o600
    assert mode(bundle / CA_CERT) == 0o644 and mode(bundle / SERVER_CERT) == 0o644
    assert not list(bundle.glob(".*.tmp"))


def test_existing_files_are_never_overwritten_by_default(tmp_path: Path) -> None:
    # Prepare
    key = make_node_key()
    path = write_pem(tmp_path / "a.key", key, private=True)
    before = path.read_bytes()

    # Execute
    with pytest.raises(ConfigError) as caught:
        write_pem(path, make_node_key(), private=True)

    # Assert
    assert str(path) in str(caught.value) and "--overwrite" in str(caught.value)
    assert path.read_bytes() == before


def test_overwrite_replaces_the_file_and_tightens_loose_permissions(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "a.key"
    path.write_text("old")
    path.chmod(0o644)

    # Execute
    write_pem(path, make_node_key(), private=True, overwrite=True)

    # Assert
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert mode(path) == 0o600


def test_encrypted_pem_key_loads_with_its_passphrase(tmp_path: Path) -> None:
    # Prepare
    key = make_node_key()

    # Execute
    path = write_pem(tmp_path / "ca.key", key, private=True, passphrase=b"secret")

    # Assert
    assert serialization.load_pem_private_key(path.read_bytes(), b"secret").private_numbers() == key.private_numbers()


def test_a_private_key_is_not_written_without_private_true(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="private=True"):
        write_pem(tmp_path / "a.key", make_node_key())
    assert not (tmp_path / "a.key").exists()


# check_bundle


def test_check_bundle_finds_nothing_wrong_with_a_fresh_bundle(bundle: Path) -> None:
    # Execute / Assert
    assert check_bundle(bundle) == []
    assert check_bundle(bundle, hosts=HOSTS) == []


def test_check_bundle_detects_a_key_that_does_not_match(tmp_path: Path, bundle: Path, other_bundle: Path) -> None:
    # Prepare
    for name in (CA_CERT, SERVER_CERT):
        (tmp_path / name).write_bytes((bundle / name).read_bytes())
    (tmp_path / SERVER_KEY).write_bytes((other_bundle / SERVER_KEY).read_bytes())

    # Execute
    problems = check_bundle(tmp_path)

    # Assert
    assert len(problems) == 1 and "does not belong to" in problems[0]


def test_check_bundle_detects_a_certificate_from_another_ca(tmp_path: Path, bundle: Path, other_bundle: Path) -> None:
    # Prepare
    (tmp_path / CA_CERT).write_bytes((bundle / CA_CERT).read_bytes())
    for name in (SERVER_CERT, SERVER_KEY):
        (tmp_path / name).write_bytes((other_bundle / name).read_bytes())

    # Execute
    problems = check_bundle(tmp_path)

    # Assert
    assert len(problems) == 1 and "is not signed by" in problems[0]


def test_check_bundle_reports_missing_hosts_and_missing_files(tmp_path: Path, bundle: Path) -> None:
    # Prepare
    (tmp_path / CA_CERT).write_bytes((bundle / CA_CERT).read_bytes())

    # Execute
    missing_host = check_bundle(bundle, hosts=["other.example.org"])
    missing_files = check_bundle(tmp_path)

    # Assert
    assert len(missing_host) == 1 and "does not name other.example.org" in missing_host[0]
    assert len(missing_files) == 2 and all("is missing" in p for p in missing_files)


# The CLI: the coordinator keeps its CA apart (--ca-dir); an institution makes its node key (--node)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def certs_cli(runner: CliRunner, *args: str):
    from simulations.cli.main import app

    return runner.invoke(app, ["certs", *args])


def test_cli_keeps_the_ca_apart_and_writes_the_superlink_files(tmp_path: Path, runner: CliRunner) -> None:
    # Prepare
    ca_dir, out = tmp_path / "ca", tmp_path / "certs"

    # Execute
    result = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(out), "--host", "superlink.example.org",
                       "--host", "10.0.0.5", "--days", "30")

    # Assert
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ca_dir.iterdir()) == [CA_CERT, CA_KEY]
    assert sorted(p.name for p in out.iterdir()) == [CA_CERT, SERVER_CERT, SERVER_KEY]
    assert (out / CA_CERT).read_bytes() == (ca_dir / CA_CERT).read_bytes()
    load_cert(out / SERVER_CERT).verify_directly_issued_by(load_cert(ca_dir / CA_CERT))
    assert check_bundle(out, hosts=["superlink.example.org", "10.0.0.5", "localhost", "::1"]) == []
    assert mode(ca_dir / CA_KEY) == 0o600 and mode(out / SERVER_KEY) == 0o600 and mode(ca_dir) == 0o700
    assert "superlink.example.org, localhost, 10.0.0.5, 127.0.0.1, ::1" in result.output
    assert f"fedstill superlink --certs {out} --database /var/lib/fedstill/superlink.db" in result.output
    assert f"fedstill register NAME {out}/nodes/NAME.pub --federation remote" in result.output
    assert "fedstill allow-list add NAME NAME.pub --allow-list allow-list.toml" in result.output
    assert "open only /v1/fleet/ to the institutions" in result.output
    assert 'address = "superlink.example.org:8000"' in result.output
    assert "flower-superlink" not in result.output and "flwr supernode register" not in result.output


def test_cli_reuses_the_ca_already_in_ca_dir(tmp_path: Path, runner: CliRunner) -> None:
    # Prepare
    ca_dir = tmp_path / "ca"
    certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "first"), "--host", "localhost")
    ca_before = {name: (ca_dir / name).read_bytes() for name in (CA_CERT, CA_KEY)}

    # Execute
    result = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "second"), "--host", "superlink.example.org")

    # Assert
    assert result.exit_code == 0, result.output
    assert f"reused the CA in {ca_dir}" in result.output
    assert {name: (ca_dir / name).read_bytes() for name in (CA_CERT, CA_KEY)} == ca_before
    assert (tmp_path / "second" / CA_CERT).read_bytes() == ca_before[CA_CERT]
    assert "note: the CA expires" not in result.output  # both for 365 days from their making
    load_cert(tmp_path / "second" / SERVER_CERT).verify_directly_issued_by(load_cert(ca_dir / CA_CERT))
    assert check_bundle(tmp_path / "second", hosts=["superlink.example.org"]) == []


def test_cli_notes_a_reused_ca_that_expires_before_the_new_certificate(tmp_path: Path, runner: CliRunner) -> None:
    # Prepare
    ca_dir = tmp_path / "ca"
    certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "first"), "--host", "localhost", "--days", "2")

    # Execute
    result = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "second"), "--host", "localhost",
                       "--days", "30")

    # Assert
    assert result.exit_code == 0, result.output
    assert "note: the CA expires on" in result.output and "make a new CA in an empty --ca-dir" in result.output


def test_cli_opens_an_encrypted_ca_only_with_its_passphrase(
    tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setenv("TEST_CA_PASSPHRASE", "s3cret")
    monkeypatch.setenv("TEST_WRONG_PASSPHRASE", "guess")
    ca_dir = tmp_path / "ca"
    made = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "a"), "--host", "localhost",
                     "--passphrase-env", "TEST_CA_PASSPHRASE")

    # Execute
    without = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "b"), "--host", "localhost")
    wrong = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "c"), "--host", "localhost",
                      "--passphrase-env", "TEST_WRONG_PASSPHRASE")
    right = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(tmp_path / "d"), "--host", "localhost",
                      "--passphrase-env", "TEST_CA_PASSPHRASE")

    # Assert
    assert made.exit_code == 0, made.output
    serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), b"s3cret")
    assert without.exit_code == 1 and f"ConfigError: {ca_dir / CA_KEY} is encrypted: pass --passphrase-env" in without.output
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert right.exit_code == 0, right.output
    assert check_bundle(tmp_path / "d") == []  # superlink.key stays readable without a passphrase
    assert (tmp_path / "d" / CA_CERT).read_bytes() == (tmp_path / "a" / CA_CERT).read_bytes()


@pytest.mark.parametrize("args, fragment", [
    (["--host", "localhost"], "ConfigError: --host without --ca-dir: keep the CA key apart from the SuperLink's files: "
                              "--ca-dir /root/fedstill-ca"),
    (["--ca-dir", "{out}", "--host", "localhost"], "is the --out folder: keep the CA key apart from the SuperLink's files"),
    (["--ca-dir", "{out}/ca", "--host", "localhost"], "is inside --out"),
    (["--ca-dir", "{tmp}/ca"], "ConfigError: --ca-dir signs the SuperLink's certificate: give --host HOST as well"),
    (["--ca-dir", "{tmp}/ca", "--host", "super link"], "ConfigError: --host 'super link': contains spaces"),
    ([], "ConfigError: nothing to make"),
    (["--node", "a", "--node", "a"], "ConfigError: --node names repeat"),
    (["--node", "../escape"], "ConfigError: identity name '../escape'"),
])
def test_cli_errors_exit_1_with_one_clean_line_and_write_nothing(
    tmp_path: Path, runner: CliRunner, args: list[str], fragment: str,
) -> None:
    # Prepare
    out = tmp_path / "deploy"
    args = [a.format(out=out, tmp=tmp_path) for a in args]

    # Execute
    result = certs_cli(runner, "--out", str(out), *args)

    # Assert
    assert result.exit_code == 1
    assert fragment in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "ca").exists()


def test_cli_institution_mode_makes_the_node_key_only_and_no_superlink_advice(tmp_path: Path, runner: CliRunner) -> None:
    # Execute
    result = certs_cli(runner, "--out", str(tmp_path), "--node", "clinic-c")

    # Assert
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "nodes", "nodes/clinic-c.key", "nodes/clinic-c.pub"]
    assert mode(tmp_path / "nodes" / "clinic-c.key") == 0o600
    assert f"send {tmp_path}/nodes/clinic-c.pub" in result.output
    assert (f"fedstill supernode --superlink SUPERLINK-HOST:8000 --root-certificates ca.crt "
            f"--auth-supernode-private-key {tmp_path}/nodes/clinic-c.key") in result.output
    for advice in ("flower-superlink", "flower-supernode ", "fedstill superlink", "fedstill register", "ca.key",
                   "--ca-dir", "--host", "fedstill certs", "your own CA"):
        assert advice not in result.output


def test_cli_adds_node_keys_beside_the_superlink_files(tmp_path: Path, runner: CliRunner) -> None:
    # Prepare
    out = tmp_path / "certs"
    certs_cli(runner, "--ca-dir", str(tmp_path / "ca"), "--out", str(out), "--host", "2001:db8::7")
    before = (out / SERVER_CERT).read_bytes()

    # Execute
    result = certs_cli(runner, "--out", str(out), "--node", "clinic-c")

    # Assert
    assert result.exit_code == 0, result.output
    assert (out / SERVER_CERT).read_bytes() == before
    assert (out / "nodes" / "clinic-c.key").is_file() and (out / "nodes" / "clinic-c.pub").is_file()
    assert f"fedstill register clinic-c {out}/nodes/clinic-c.pub --federation remote" in result.output
    assert 'address = "[2001:db8::7]:8000"' in result.output


def test_cli_refuses_to_overwrite_and_overwrite_keeps_the_ca(tmp_path: Path, runner: CliRunner) -> None:
    # Prepare
    ca_dir, out = tmp_path / "ca", tmp_path / "certs"
    certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(out), "--host", "localhost")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # Execute
    refused = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(out), "--host", "localhost", "--node", "new-node")
    replaced = certs_cli(runner, "--ca-dir", str(ca_dir), "--out", str(out), "--host", "localhost", "--overwrite")

    # Assert
    assert refused.exit_code == 1 and "ConfigError" in refused.output and "--overwrite" in refused.output
    assert not (out / "nodes").exists()
    assert replaced.exit_code == 0, replaced.output
    assert (out / SERVER_CERT).read_bytes() != before[SERVER_CERT]
    assert (out / CA_CERT).read_bytes() == before[CA_CERT] == (ca_dir / CA_CERT).read_bytes()
    assert check_bundle(out) == []


def test_cli_refuses_an_unset_passphrase_variable(tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.delenv("TEST_UNSET_PASSPHRASE", raising=False)

    # Execute
    unset = certs_cli(runner, "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "x"), "--host", "localhost",
                      "--passphrase-env", "TEST_UNSET_PASSPHRASE")

    # Assert
    assert unset.exit_code == 1 and "ConfigError: --passphrase-env TEST_UNSET_PASSPHRASE" in unset.output
    assert not (tmp_path / "ca").exists()


# load_ca


def test_load_ca_refuses_half_a_ca_and_a_key_of_another_ca(tmp_path: Path) -> None:
    # Prepare
    ca_key, ca_cert = make_ca("test CA", 1)
    other_key, _ = make_ca("test CA", 1)
    write_pem(tmp_path / CA_CERT, ca_cert)

    # Execute / Assert
    assert load_ca(tmp_path / "empty") is None
    with pytest.raises(ConfigError, match="is there but .*ca.key is not"):
        load_ca(tmp_path)
    write_pem(tmp_path / CA_KEY, other_key, private=True)
    with pytest.raises(ConfigError, match="is not the key of"):
        load_ca(tmp_path)
    write_pem(tmp_path / CA_KEY, ca_key, private=True, overwrite=True)
    loaded = load_ca(tmp_path)
    assert loaded is not None and loaded[1] == ca_cert
