"""Institution and coordinator identities: Ed25519 key pairs on disk, and the coordinator's allow-list.

Private keys are PKCS#8 PEM files written with mode 0600, optionally encrypted with a passphrase
(read from an environment variable, never from the command line). Public keys travel as
`ed25519:<base64 of the 32 raw bytes>`; a key's id is the first 16 hex digits of their sha256.

The allow-list is a TOML file the coordinator keeps:

    [institutions]
    hospital-a = "ed25519:1L1R...="
    bank-b = "ed25519:Qm9v...="
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.audit.canonical import sha256_hex
from common.errors import AuditError, ConfigError
from common.files import PRIVATE, atomic_write_text, private_descriptor, private_folder

PASSPHRASE_ENV = "FEDSTILL_KEY_PASSPHRASE"
KEY_PREFIX = "ed25519:"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def encode_public(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def decode_public(text: str, where: str = "public key") -> Ed25519PublicKey:
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise AuditError(f"{where}: expected 'ed25519:<base64>', got {str(text)[:40]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except Exception as error:
        raise AuditError(f"{where}: not a valid Ed25519 public key ({error})") from None


def key_id(public: str) -> str:
    """Short, stable id of an encoded public key."""
    return sha256_hex(public.encode("ascii"))[:16]


def verify_signature(public: str, signature: str, data: bytes, where: str) -> None:
    """Raise AuditError unless `signature` (base64) is `public`'s Ed25519 signature of `data`."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except Exception:
        raise AuditError(f"{where}: signature is not base64") from None
    if base64.b64encode(raw).decode("ascii") != signature:
        raise AuditError(f"{where}: signature is not in canonical base64 (altered padding bits)")
    try:
        decode_public(public, where).verify(raw, data)
    except InvalidSignature:
        raise AuditError(f"{where}: bad signature (key {key_id(public)})") from None


@dataclass(frozen=True)
class Signer:
    """An identity that signs: a name (institution id or 'coordinator') and its private key."""

    name: str
    private: Ed25519PrivateKey

    @property
    def public(self) -> str:
        return encode_public(self.private.public_key())

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.private.sign(data)).decode("ascii")

    @classmethod
    def generate(cls, name: str) -> Signer:
        return cls(check_name(name), Ed25519PrivateKey.generate())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(
            f"identity name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def private_key_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.key"


def public_key_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.pub"


def write_key_pair(signer: Signer, folder: Path, passphrase: bytes | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.key` (PKCS#8 PEM, encrypted when a passphrase is given) and `<name>.pub`, both mode 0600, into
    `folder` (made 0700 when missing)."""
    folder = private_folder(folder)
    private_path, public_path = private_key_path(folder, signer.name), public_key_path(folder, signer.name)
    if private_path.exists() and not overwrite:
        raise ConfigError(f"{private_path} exists; refusing to overwrite a key (delete it first, or choose another --out)")
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    pem = signer.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    with os.fdopen(private_descriptor(private_path, os.O_WRONLY | os.O_TRUNC), "wb") as handle:  # 0600, also when it
        handle.write(pem)  # existed with looser permissions
    atomic_write_text(public_path, signer.public + "\n", mode=PRIVATE, encoding="ascii")
    return private_path, public_path


def load_signer(path: Path | str, name: str, passphrase: bytes | None = None) -> Signer:
    """Read a private key written by `write_key_pair`; the passphrase defaults to $FEDSTILL_KEY_PASSPHRASE."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"signing key {path} not found; create one with `fedstill keygen {name} --out {path.parent}`")
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode("utf-8")
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        raise ConfigError(
            f"signing key {path} is encrypted: set {PASSPHRASE_ENV} to its passphrase"
            if passphrase is None else f"signing key {path} is not encrypted: unset {PASSPHRASE_ENV}"
        ) from None
    except ValueError:
        raise ConfigError(f"signing key {path}: wrong passphrase, or not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is a {type(key).__name__}, expected an Ed25519 key from `fedstill keygen`")
    return Signer(check_name(name), key)


def load_allow_list(path: Path | str) -> dict[str, str]:
    """Institution id -> encoded public key, from the coordinator's allow-list TOML."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"allow-list {path} not found; set allow-list to the coordinator's TOML file of institution keys")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"allow-list {path} is not valid TOML: {error}") from None
    institutions = data.get("institutions")
    if not isinstance(institutions, dict) or not institutions:
        raise ConfigError(f"allow-list {path}: needs an [institutions] table of name = \"ed25519:...\" entries")
    for name, public in institutions.items():
        check_name(name)
        try:
            decode_public(public, f"allow-list {path}, institution {name!r}")
        except AuditError as error:
            raise ConfigError(str(error)) from None
    seen: dict[str, str] = {}
    for name, public in institutions.items():
        if public in seen:
            raise ConfigError(f"allow-list {path}: institutions {seen[public]!r} and {name!r} share one key; each needs its own")
        seen[public] = name
    return dict(institutions)


def write_allow_list(path: Path | str, institutions: dict[str, str]) -> None:
    lines = ["# fedstill allow-list: institutions whose signed releases the coordinator accepts", "[institutions]"]
    lines += [f'"{name}" = "{public}"' for name, public in sorted(institutions.items())]
    atomic_write_text(path, "\n".join(lines) + "\n", mode=PRIVATE)
