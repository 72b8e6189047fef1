"""`fedstill allow-list add|show` and `fedstill keygen --allow-list`, run as the command line runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.audit.keys import Signer, key_id, load_allow_list, write_key_pair
from simulations.deploy.certs import make_node_key, write_node_key


def fedstill(*args: str):
    from simulations.cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """hospital-a's signing and node public keys, as `fedstill institution-init` names them."""
    write_key_pair(Signer.generate("hospital-a"), tmp_path)
    write_node_key(make_node_key(), tmp_path, "hospital-a-node")
    return tmp_path


def test_add_then_add_again_then_show(tmp_path: Path, keys: Path) -> None:
    # Prepare
    path = tmp_path / "allow-list.toml"
    public = (keys / "hospital-a.pub").read_text().strip()

    # Execute
    added = fedstill("allow-list", "add", "hospital-a", str(keys / "hospital-a.pub"), "--allow-list", str(path))
    again = fedstill("allow-list", "add", "hospital-a", str(keys / "hospital-a.pub"), "--allow-list", str(path))
    shown = fedstill("allow-list", "show", "--allow-list", str(path))

    # Assert
    assert added.exit_code == again.exit_code == shown.exit_code == 0, added.output + again.output + shown.output
    assert added.output == f"added hospital-a (key {key_id(public)}) to {path}\n"
    assert again.output == f"{path} lists hospital-a with this key already (key {key_id(public)}); nothing changed\n"
    assert shown.output.splitlines() == [f"{path}: 1 institution(s)", "  name        key id",
                                         f"  hospital-a  {key_id(public)}"]
    assert load_allow_list(path) == {"hospital-a": public}


@pytest.mark.parametrize(("args", "message"), [
    (["hospital-a", "{keys}/hospital-a-node.pub"], "that is hospital-a's node key: register it with `fedstill register`; "
                                                    "the allow-list takes the signing key keys/hospital-a.pub"),
    (["hospital-a", "{keys}/hospital-a.key"], "is a private key: it must not leave the institution"),
    (["hospital-a", "{keys}/missing.pub"], "not found; give the keys/hospital-a.pub the institution sent"),
    (["clinic-c", "{keys}/listed.pub"], "is already listed in"),  # bank-b's key under another name
    (["bank-b", "{keys}/hospital-a.pub"], "already lists 'bank-b' with another key"),
])
def test_add_refusals_exit_1_with_one_line_and_change_nothing(tmp_path: Path, keys: Path, args: list[str], message: str) -> None:
    # Prepare: bank-b is listed already
    path = tmp_path / "allow-list.toml"
    bank = Signer.generate("bank-b")
    (keys / "listed.pub").write_text(bank.public + "\n")
    assert fedstill("allow-list", "add", "bank-b", str(keys / "listed.pub"), "--allow-list", str(path)).exit_code == 0
    before = path.read_bytes()

    # Execute
    result = fedstill("allow-list", "add", *[a.format(keys=keys) for a in args], "--allow-list", str(path))

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith("ConfigError: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert path.read_bytes() == before


def test_show_of_a_missing_list_says_how_to_start_one(tmp_path: Path) -> None:
    # Execute
    result = fedstill("allow-list", "show", "--allow-list", str(tmp_path / "none.toml"))

    # Assert
    assert result.exit_code == 1
    assert result.output.startswith("ConfigError: allow-list ") and "fedstill allow-list add NAME NAME.pub" in result.output


def test_keygen_allow_list_writes_the_same_file_allow_list_reads(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "allow-list.toml"

    # Execute
    made = fedstill("keygen", "hospital-a", "--out", str(tmp_path / "keys"), "--allow-list", str(path))
    again = fedstill("allow-list", "add", "hospital-a", str(tmp_path / "keys" / "hospital-a.pub"), "--allow-list", str(path))
    shown = fedstill("allow-list", "show", "--allow-list", str(path))

    # Assert
    assert made.exit_code == again.exit_code == shown.exit_code == 0, made.output + again.output
    assert "nothing changed" in again.output
    public = (tmp_path / "keys" / "hospital-a.pub").read_text().strip()
    assert f"  hospital-a  {key_id(public)}" in shown.output
