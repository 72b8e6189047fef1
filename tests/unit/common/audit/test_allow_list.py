"""The allow-list one institution at a time: only signing public keys go in, each name and key once."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.audit.allow_list import add_institution, listed, read_signing_public
from common.audit.keys import Signer, key_id, load_allow_list, write_key_pair
from common.errors import ConfigError


def public_file(folder: Path, name: str) -> tuple[Path, str]:
    """keys/NAME.pub as `fedstill institution-init` writes it, and its "ed25519:..." line."""
    signer = Signer.generate(name)
    return write_key_pair(signer, folder)[1], signer.public


def test_the_signing_public_key_is_read_from_its_file(tmp_path: Path) -> None:
    # Prepare
    path, public = public_file(tmp_path, "hospital-a")

    # Execute / Assert
    assert read_signing_public(path, "hospital-a") == public


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found; give the keys/hospital-a.pub the institution sent"),
    ("ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQ= hospital-a-node\n",
     "that is hospital-a's node key: register it with `fedstill register`; the allow-list takes the signing key "
     "keys/hospital-a.pub"),
    ("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
     "is a private key: it must not leave the institution"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbg==\n-----END OPENSSH PRIVATE KEY-----\n", "is a private key"),
    ("hello\n", "is not a signing public key"),
    ("ed25519:AAAA\n", "not a valid Ed25519 public key"),
    ("", "is not a signing public key"),
])
def test_anything_but_a_signing_public_key_is_refused_naming_it(tmp_path: Path, content: str | None, message: str) -> None:
    # Prepare
    path = tmp_path / "hospital-a.pub"
    if content is not None:
        path.write_text(content)

    # Execute / Assert
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_signing_public(path, "hospital-a")


def test_add_creates_the_list_and_the_same_entry_again_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "allow-list.toml"
    _, a = public_file(tmp_path, "hospital-a")
    _, b = public_file(tmp_path, "bank-b")

    # Execute
    added = [add_institution(path, "hospital-a", a), add_institution(path, "bank-b", b)]
    before = path.read_bytes()
    again = add_institution(path, "hospital-a", a)

    # Assert
    assert added == [True, True] and again is False
    assert path.read_bytes() == before
    assert load_allow_list(path) == {"hospital-a": a, "bank-b": b}


def test_a_listed_name_with_another_key_and_a_listed_key_under_another_name_are_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "allow-list.toml"
    _, a = public_file(tmp_path, "hospital-a")
    _, other = public_file(tmp_path / "other", "hospital-a")
    add_institution(path, "hospital-a", a)
    before = path.read_bytes()

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"already lists 'hospital-a' with another key \({key_id(a)}, the new one is "
                                          rf"{key_id(other)}\); remove its line first"):
        add_institution(path, "hospital-a", other)
    with pytest.raises(ConfigError, match=rf"that key \({key_id(a)}\) is already listed in .* as 'hospital-a'"):
        add_institution(path, "clinic-c", a)
    with pytest.raises(ConfigError, match="identity name"):
        add_institution(path, "../c", other)
    assert path.read_bytes() == before


def test_listed_gives_names_and_key_ids_in_order(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "allow-list.toml"
    _, a = public_file(tmp_path, "zoo-z")
    _, b = public_file(tmp_path, "bank-b")
    add_institution(path, "zoo-z", a)
    add_institution(path, "bank-b", b)

    # Execute / Assert
    assert listed(path) == [("bank-b", key_id(b)), ("zoo-z", key_id(a))]
    with pytest.raises(ConfigError, match="not found; add the first institution with `fedstill allow-list add"):
        listed(tmp_path / "none.toml")
