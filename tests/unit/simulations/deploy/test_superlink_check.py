"""The coordinator's checks before `fedstill superlink` starts the SuperLink: each refusal names its fix; the
checked command runs flower-superlink with TLS, node authentication and an owner-only umask."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.audit.keys import PASSPHRASE_ENV, Signer, write_key_pair
from common.errors import ConfigError
from simulations.deploy.certs import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, make_ca, make_server_cert, write_pem
from simulations.deploy.superlink_check import check_superlink, serverapp_environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_certs(folder: Path, ca: tuple | None = None) -> Path:
    ca_key, ca_cert = ca or make_ca("test CA", 1)
    key, cert = make_server_cert(ca_key, ca_cert, ["superlink.example.org"], 1)
    write_pem(folder / CA_CERT, ca_cert, overwrite=True)
    write_pem(folder / SERVER_CERT, cert, overwrite=True)
    write_pem(folder / SERVER_KEY, key, private=True, overwrite=True)
    return folder


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return write_certs(tmp_path / "certs")


@pytest.fixture
def database(tmp_path: Path) -> Path:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    return folder / "superlink.db"


def test_a_fresh_bundle_and_database_folder_pass(certs: Path, database: Path) -> None:
    # Execute
    plan = check_superlink(certs, database, "127.0.0.1", free_port())

    # Assert: the command Flower gets, with absolute paths
    command = plan.command()
    assert Path(command[0]).name == "flower-superlink"
    assert command[command.index("--ssl-ca-certfile") + 1] == str(certs / CA_CERT)
    assert command[command.index("--ssl-keyfile") + 1] == str(certs / SERVER_KEY)
    assert command[command.index("--database") + 1] == str(database)
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(command)
    assert "--insecure" not in command


def test_a_missing_database_folder_is_refused_with_the_mkdir_to_run(certs: Path, tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"does not exist; create it: mkdir -p -m 700 .*/absent$"):
        check_superlink(certs, tmp_path / "absent" / "superlink.db", "127.0.0.1", free_port())


def test_a_port_in_use_is_refused(certs: Path, database: Path) -> None:
    # Prepare: something listens on the port
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        # Execute / Assert
        with pytest.raises(ConfigError, match=rf"port {port} is already in use on 127.0.0.1: .*another --port"):
            check_superlink(certs, database, "127.0.0.1", port)


def test_a_key_that_does_not_match_the_certificate_is_refused(certs: Path, database: Path, tmp_path: Path) -> None:
    # Prepare: the key of another bundle
    other = write_certs(tmp_path / "other")
    (certs / SERVER_KEY).write_bytes((other / SERVER_KEY).read_bytes())

    # Execute / Assert
    with pytest.raises(ConfigError, match="does not belong to .*superlink.crt"):
        check_superlink(certs, database, "127.0.0.1", free_port())


def test_a_certificate_not_signed_by_ca_crt_is_refused(certs: Path, database: Path) -> None:
    # Prepare: ca.crt of another CA
    write_pem(certs / CA_CERT, make_ca("other CA", 1)[1], overwrite=True)

    # Execute / Assert
    with pytest.raises(ConfigError, match="superlink.crt is not signed by .*ca.crt"):
        check_superlink(certs, database, "127.0.0.1", free_port())


def test_a_key_readable_by_others_is_refused_with_the_chmod(certs: Path, database: Path) -> None:
    # Prepare
    (certs / SERVER_KEY).chmod(0o644)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"readable by others \(mode 644\): chmod 600 .*superlink.key"):
        check_superlink(certs, database, "127.0.0.1", free_port())


def test_the_ca_key_beside_the_superlinks_files_is_refused(certs: Path, database: Path) -> None:
    # Prepare
    write_pem(certs / CA_KEY, make_ca("x", 1)[0], private=True)

    # Execute / Assert
    with pytest.raises(ConfigError, match="move ca.key off the SuperLink host: fedstill certs --ca-dir"):
        check_superlink(certs, database, "127.0.0.1", free_port())


def test_an_unencrypted_coordinator_key_is_refused(certs: Path, database: Path, tmp_path: Path) -> None:
    # Prepare
    key, _ = write_key_pair(Signer.generate("coordinator"), tmp_path / "keys")

    # Execute / Assert
    with pytest.raises(ConfigError, match="is not passphrase-protected; make an encrypted one"):
        check_superlink(certs, database, "127.0.0.1", free_port(), key)


def test_a_coordinator_key_without_its_passphrase_is_refused(certs: Path, database: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    key, _ = write_key_pair(Signer.generate("coordinator"), tmp_path / "keys", b"right passphrase")
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)

    # Execute / Assert: unset, then wrong
    with pytest.raises(ConfigError, match=f"{PASSPHRASE_ENV} is not set: export {PASSPHRASE_ENV}"):
        check_superlink(certs, database, "127.0.0.1", free_port(), key)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong passphrase")
    with pytest.raises(ConfigError, match=f"does not open with \\${PASSPHRASE_ENV}: export {PASSPHRASE_ENV}"):
        check_superlink(certs, database, "127.0.0.1", free_port(), key)


def test_check_only_passes_with_an_encrypted_coordinator_key_and_its_passphrase(
        certs: Path, database: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.cli.main import app

    # Prepare
    key, _ = write_key_pair(Signer.generate("coordinator"), tmp_path / "keys", b"right passphrase")
    monkeypatch.setenv(PASSPHRASE_ENV, "right passphrase")

    # Execute
    result = CliRunner().invoke(app, ["superlink", "--certs", str(certs), "--database", str(database),
                                      "--port", str(free_port()), "--coordinator-key", str(key), "--check-only"])

    # Assert
    assert result.exit_code == 0, result.output
    assert result.output.startswith("checks passed: ") and f"{key} opens with ${PASSPHRASE_ENV}" in result.output


def test_the_cli_prints_one_error_line_and_exits_1(certs: Path, tmp_path: Path) -> None:
    from simulations.cli.main import app

    # Execute
    result = CliRunner().invoke(app, ["superlink", "--certs", str(certs), "--database", str(tmp_path / "no" / "x.db"),
                                      "--port", str(free_port())])

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith("ConfigError: ") and len(result.output.strip().splitlines()) == 1


def test_the_superlink_starts_with_an_owner_only_umask_and_this_environments_flower(
        certs: Path, database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.cli.main import app

    # Prepare: exec is the end of this process; record what it would run, and the umask it would run under
    started: list[tuple[list[str], int, dict[str, str]]] = []

    def execve(path: str, args: list[str], env: dict[str, str]) -> None:
        mask = os.umask(0o022)
        os.umask(mask)
        started.append((args, mask, env))

    monkeypatch.setattr(os, "execve", execve)
    before = os.umask(0o022)

    # Execute
    try:
        result = CliRunner().invoke(app, ["superlink", "--certs", str(certs), "--database", str(database),
                                          "--port", str(free_port())])
    finally:
        os.umask(before)

    # Assert
    assert result.exit_code == 0, result.output
    (args, mask, env), = started
    assert mask == 0o077
    assert args[args.index("--database") + 1] == str(database) and "--enable-supernode-auth" in args
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # where flower-superexec is
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # its ServerApps' OpenMP threads sleep at barriers


def test_a_wait_policy_the_coordinator_set_is_kept() -> None:
    # Execute / Assert
    assert serverapp_environment({"OMP_WAIT_POLICY": "ACTIVE", "A": "1"}) == {"OMP_WAIT_POLICY": "ACTIVE", "A": "1"}
    assert serverapp_environment({"A": "1"}) == {"OMP_WAIT_POLICY": "PASSIVE", "A": "1"}
