"""Institution and coordinator keys: files on disk, passphrases, the allow-list, signatures."""

from __future__ import annotations

import base64
import stat
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from common.audit.keys import (
    NAME_PATTERN,
    PASSPHRASE_ENV,
    Signer,
    check_name,
    decode_public,
    key_id,
    load_allow_list,
    load_signer,
    verify_signature,
    write_allow_list,
    write_key_pair,
)
from common.errors import AuditError, ConfigError

NAMES = st.from_regex(NAME_PATTERN, fullmatch=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_passphrase(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No passphrase in the environment, whatever the shell running the tests holds."""
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    return monkeypatch


def test_key_pair_is_written_0600_and_loads_as_the_same_identity(tmp_path: Path, no_passphrase: pytest.MonkeyPatch) -> None:
    # Prepare
    signer = Signer.generate("hospital-a")

    # Execute
    private, public = write_key_pair(signer, tmp_path / "keys")
    loaded = load_signer(private, "hospital-a")

    # Assert
    assert (private.name, public.name) == ("hospital-a.key", "hospital-a.pub")
    assert mode(private) == 0o600
    assert public.read_text(encoding="ascii") == signer.public + "\n"
    assert loaded.public == signer.public and loaded.key_id == signer.key_id
    verify_signature(signer.public, loaded.sign(b"release"), b"release", "test")


def test_overwriting_a_key_tightens_loose_permissions(tmp_path: Path, no_passphrase: pytest.MonkeyPatch) -> None:
    # Prepare
    first, second = Signer.generate("bank-b"), Signer.generate("bank-b")
    private, _ = write_key_pair(first, tmp_path)
    private.chmod(0o644)

    # Execute
    write_key_pair(second, tmp_path, overwrite=True)

    # Assert
    assert mode(private) == 0o600
    assert load_signer(private, "bank-b").public == second.public


def test_an_existing_key_is_never_overwritten_by_default(tmp_path: Path) -> None:
    # Prepare
    private, _ = write_key_pair(Signer.generate("bank-b"), tmp_path)
    before = private.read_bytes()

    # Execute
    with pytest.raises(ConfigError) as error:
        write_key_pair(Signer.generate("bank-b"), tmp_path)

    # Assert
    assert "refusing to overwrite" in str(error.value) and str(private) in str(error.value)
    assert private.read_bytes() == before


def test_encrypted_key_loads_with_the_passphrase_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    signer = Signer.generate("hospital-a")
    private, _ = write_key_pair(signer, tmp_path, passphrase=b"correct horse")
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")

    # Execute
    loaded = load_signer(private, "hospital-a")

    # Assert
    assert b"ENCRYPTED PRIVATE KEY" in private.read_bytes()
    assert mode(private) == 0o600
    assert loaded.public == signer.public


def test_encrypted_key_loads_with_an_explicit_passphrase(tmp_path: Path, no_passphrase: pytest.MonkeyPatch) -> None:
    # Prepare
    signer = Signer.generate("hospital-a")
    private, _ = write_key_pair(signer, tmp_path, passphrase=b"s3cret")

    # Execute
    loaded = load_signer(private, "hospital-a", passphrase=b"s3cret")

    # Assert
    assert loaded.public == signer.public


def test_encrypted_key_without_passphrase_says_which_variable_to_set(tmp_path: Path, no_passphrase: pytest.MonkeyPatch) -> None:
    # Prepare
    private, _ = write_key_pair(Signer.generate("hospital-a"), tmp_path, passphrase=b"s3cret")

    # Execute
    with pytest.raises(ConfigError) as error:
        load_signer(private, "hospital-a")

    # Assert
    assert f"{private} is encrypted: set {PASSPHRASE_ENV}" in str(error.value)


def test_encrypted_key_with_a_wrong_passphrase_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    private, _ = write_key_pair(Signer.generate("hospital-a"), tmp_path, passphrase=b"s3cret")
    monkeypatch.setenv(PASSPHRASE_ENV, "not it")

    # Execute
    with pytest.raises(ConfigError) as error:
        load_signer(private, "hospital-a")

    # Assert
    assert "wrong passphrase" in str(error.value) and "not it" not in str(error.value)


def test_plain_key_with_a_passphrase_set_says_to_unset_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    private, _ = write_key_pair(Signer.generate("hospital-a"), tmp_path)
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")

    # Execute
    with pytest.raises(ConfigError) as error:
        load_signer(private, "hospital-a")

    # Assert
    assert f"is not encrypted: unset {PASSPHRASE_ENV}" in str(error.value)


@pytest.mark.parametrize(("content", "expected"), [
    (None, "not found; create one with `fedstill keygen hospital-a"),
    (b"not a key at all\n", "wrong passphrase, or not a PEM private key"),
    ("ec", "PrivateKey, expected an Ed25519 key from `fedstill keygen`"),
])
def test_unusable_key_files_are_config_errors_naming_the_file(
    tmp_path: Path, no_passphrase: pytest.MonkeyPatch, content: bytes | str | None, expected: str,
) -> None:
    # Prepare
    path = tmp_path / "hospital-a.key"
    if content == "ec":
        content = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if content is not None:
        path.write_bytes(content)

    # Execute
    with pytest.raises(ConfigError) as error:
        load_signer(path, "hospital-a")

    # Assert
    assert str(path) in str(error.value) and expected in str(error.value)


@settings(max_examples=60, deadline=None)
@given(name=NAMES)
def test_valid_names_are_accepted(name: str) -> None:
    # Execute
    signer = Signer.generate(name)

    # Assert
    assert signer.name == name


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=70).filter(lambda text: not NAME_PATTERN.match(text)))
def test_invalid_names_are_config_errors(name: str) -> None:
    # Execute
    with pytest.raises(ConfigError) as error:
        check_name(name)

    # Assert
    assert repr(name) in str(error.value)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=256), flip=st.integers(min_value=0))
def test_a_signature_holds_for_its_data_and_no_other(data: bytes, flip: int) -> None:
    # Prepare
    signer = Signer.generate("hospital-a")
    signature = signer.sign(data)
    changed = bytearray(data + b"\0")
    changed[flip % len(changed)] ^= 1 << (flip % 8)

    # Execute
    verify_signature(signer.public, signature, data, "release")
    with pytest.raises(AuditError) as error:
        verify_signature(signer.public, signature, bytes(changed), "release")

    # Assert
    assert f"release: bad signature (key {signer.key_id})" in str(error.value)


@pytest.mark.parametrize(("signature", "expected"), [
    ("not base64!", "signature is not base64"),
    (base64.b64encode(b"\0" * 64).decode(), "bad signature"),
    (base64.b64encode(b"short").decode(), "bad signature"),
])
def test_malformed_signatures_are_audit_errors(signature: str, expected: str) -> None:
    # Prepare
    signer = Signer.generate("hospital-a")

    # Execute
    with pytest.raises(AuditError) as error:
        verify_signature(signer.public, signature, b"data", "entry 3")

    # Assert
    assert str(error.value).startswith("entry 3: ") and expected in str(error.value)


@pytest.mark.parametrize("text", ["ssh-ed25519 AAAA", "ed25519:###", "ed25519:" + base64.b64encode(b"x" * 31).decode(), 42])
def test_malformed_public_keys_are_audit_errors(text: object) -> None:
    # Execute
    with pytest.raises(AuditError) as error:
        decode_public(text, "allow-list entry")  # type: ignore[arg-type]

    # Assert
    assert str(error.value).startswith("allow-list entry: ")


def test_key_id_is_short_and_stable() -> None:
    # Prepare
    signer = Signer.generate("hospital-a")

    # Execute
    ids = {key_id(signer.public), signer.key_id, key_id(Signer(signer.name, signer.private).public)}

    # Assert
    assert len(ids) == 1 and len(signer.key_id) == 16
    assert key_id(Signer.generate("hospital-a").public) != signer.key_id


@settings(max_examples=25, deadline=None)
@given(names=st.lists(NAMES, min_size=1, max_size=5, unique=True))
def test_allow_list_round_trips(names: list[str]) -> None:
    # Prepare
    institutions = {name: Signer.generate(name).public for name in names}

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "allow-list.toml"

        # Execute
        write_allow_list(path, institutions)
        loaded = load_allow_list(path)

    # Assert
    assert loaded == institutions


GOOD_KEY = Signer.generate("spare").public


@pytest.mark.parametrize(("text", "expected"), [
    (None, "not found; set allow-list"),
    ("[institutions\nhospital-a = 1\n", "is not valid TOML"),
    ('hospital-a = "x"\n', 'needs an [institutions] table'),
    ("[institutions]\n", 'needs an [institutions] table'),
    ('[institutions]\nhospital-a = "ed25519:AAAA"\n', "institution 'hospital-a': not a valid Ed25519 public key"),
    ('[institutions]\nhospital-a = "rsa:AAAA"\n', "institution 'hospital-a': expected 'ed25519:<base64>'"),
    ('[institutions]\nhospital-a = 7\n', "institution 'hospital-a': expected 'ed25519:<base64>'"),
    (f'[institutions]\nhospital-a = "{GOOD_KEY}"\nbank-b = "{GOOD_KEY}"\n', "institutions 'hospital-a' and 'bank-b' share one key"),
    (f'[institutions]\n"bad name!" = "{GOOD_KEY}"\n', "identity name 'bad name!'"),
    (f'[institutions]\nhospital-a = "{GOOD_KEY}"\nhospital-a = "{GOOD_KEY}"\n', "is not valid TOML"),
])
def test_bad_allow_lists_are_config_errors_naming_the_problem(tmp_path: Path, text: str | None, expected: str) -> None:
    # Prepare
    path = tmp_path / "allow-list.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")

    # Execute
    with pytest.raises(ConfigError) as error:
        load_allow_list(path)

    # Assert
    assert expected in str(error.value)
