"""`fedstill institution-init`: an institution's own keys, folders and node config, ready for `fedstill supernode`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.audit.keys import Signer, load_signer, write_allow_list
from common.errors import ConfigError, DataError
from common.node_config import NodeConfig
from simulations.deploy.certs import make_ca, write_pem
from simulations.deploy.institution import init_institution
from simulations.deploy.node_check import check_auth_key, check_node_config, check_site_policy, parse_node_config

NAME = "hospital-a"
LAYOUT = ["data", "keys", "keys/hospital-a-node.key", "keys/hospital-a-node.pub", "keys/hospital-a.key",
          "keys/hospital-a.pub", "node-config.toml", "state"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def layout(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_the_folder_holds_exactly_the_layout_with_private_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a relative --out
    monkeypatch.chdir(tmp_path)

    # Execute
    folder = init_institution(NAME, Path("inst"))

    # Assert
    assert folder.root == tmp_path / "inst" and folder.root.is_absolute()
    assert layout(folder.root) == LAYOUT
    for path in (folder.root, folder.keys, folder.root / "data", folder.root / "state"):
        assert mode(path) == 0o700, path
    assert mode(folder.signing_key) == 0o600 and mode(folder.node_key) == 0o600
    assert folder.signing_public.read_text() == load_signer(folder.signing_key, NAME).public + "\n"
    assert folder.node_public.read_text().startswith("ecdsa-sha2-nistp384 AAAA")
    check_auth_key(folder.node_key)  # what flower-supernode loads


def test_the_node_config_parses_and_passes_the_node_check_once_the_coordinator_files_arrive(tmp_path: Path) -> None:
    # Prepare
    folder = init_institution(NAME, tmp_path / "inst")
    root = folder.root

    # Execute
    raw = parse_node_config(str(folder.node_config_path))
    with pytest.raises(DataError, match="is an empty folder"):
        check_node_config(raw)  # no data yet
    (root / "data" / "site.csv").write_text("x0,x1,label\n0.5,1.0,0\n1.5,0.0,1\n")
    write_pem(root / "ca.crt", make_ca("federation CA", 1)[1])
    write_allow_list(root / "allow-list.toml", {NAME: folder.signing_public.read_text().strip()})
    (root / "coordinator.pub").write_text(Signer.generate("coordinator").public + "\n")
    node = check_node_config(raw)

    # Assert
    assert raw == {
        "institution-id": NAME, "signing-key": str(root / "keys" / f"{NAME}.key"),
        "release-log": str(root / "release-log.jsonl"), "privacy-ledger": str(root / "privacy-ledger.json"),
        "state-dir": str(root / "state"), "data-path": str(root / "data"),
        "allow-list": str(root / "allow-list.toml"), "coordinator-key": str(root / "coordinator.pub"),
    }
    assert node == NodeConfig.from_node_config(raw) and node.institution_id == NAME
    assert check_site_policy(node).startswith("no site policy")


def test_existing_files_are_refused_and_left_alone_unless_overwrite(tmp_path: Path) -> None:
    # Prepare
    folder = init_institution(NAME, tmp_path)
    before = {p: p.read_bytes() for p in folder.root.rglob("*") if p.is_file()}

    # Execute
    with pytest.raises(ConfigError) as refused:
        init_institution(NAME, tmp_path)
    init_institution(NAME, tmp_path, overwrite=True)

    # Assert
    assert str(folder.signing_key) in str(refused.value) and "--overwrite" in str(refused.value)
    assert folder.signing_key.read_bytes() != before[folder.signing_key]
    assert folder.node_key.read_bytes() != before[folder.node_key]
    assert layout(folder.root) == LAYOUT


@pytest.mark.parametrize(("name", "message"), [
    ("../escape", "identity name '../escape'"),
    ("a" * 60, "is 60 characters long; give at most 59"),
])
def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path, name: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        init_institution(name, tmp_path / "inst")
    assert not (tmp_path / "inst").exists()


def test_the_cli_says_what_to_send_and_receive_and_how_to_start_without_private_key_text(tmp_path: Path) -> None:
    from simulations.cli.main import app

    # Prepare
    root = tmp_path / "inst"

    # Execute
    result = CliRunner().invoke(app, ["institution-init", NAME, "--out", str(root)])
    again = CliRunner().invoke(app, ["institution-init", NAME, "--out", str(root)])

    # Assert
    assert result.exit_code == 0, result.output
    assert f"{root}/keys/{NAME}.pub  signing key, for the allow-list" in result.output
    assert f"{root}/keys/{NAME}-node.pub  node key, to register" in result.output
    assert f"Receive from the coordinator, into {root}: ca.crt, allow-list.toml, coordinator.pub" in result.output
    assert (f"fedstill supernode --superlink SUPERLINK-HOST:8000 --root-certificates {root}/ca.crt "
            f"--auth-supernode-private-key {root}/keys/{NAME}-node.key --approved-apps {root}/approved-apps.toml "
            f"--node-config {root}/node-config.toml --port 9094") in result.output
    assert "PRIVATE KEY" not in result.output
    for private in (root / "keys" / f"{NAME}.key", root / "keys" / f"{NAME}-node.key"):
        assert all(line not in result.output for line in private.read_text().splitlines()[1:-1])
    assert again.exit_code == 1 and again.output.startswith("ConfigError: ") and "Traceback" not in again.output
