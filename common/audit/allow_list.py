"""The coordinator's allow-list, one institution at a time: read a signing public key file, add it, list the entries.

The file's format is common.audit.keys' (`[institutions]` name = "ed25519:..."); this module keeps the
roles apart: the allow-list takes an institution's Ed25519 signing key (keys/NAME.pub), never its node
key (the OpenSSH line `fedstill register` takes) nor any private key.
"""

from __future__ import annotations

from pathlib import Path

from common.audit.keys import KEY_PREFIX, check_name, decode_public, key_id, load_allow_list, write_allow_list
from common.errors import AuditError, ConfigError

OPENSSH_PUBLIC_PREFIXES = ("ecdsa-sha2-", "ssh-", "sk-")


def read_signing_public(path: Path, name: str) -> str:
    """The "ed25519:..." line of `path`, institution `name`'s signing public key, or ConfigError naming what it holds."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; give the keys/{name}.pub the institution sent") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} cannot be read as text ({error}); give the keys/{name}.pub the institution sent") from None
    first = lines[0] if lines else ""
    if first.startswith(OPENSSH_PUBLIC_PREFIXES):
        raise ConfigError(f"{path}: that is {name}'s node key: register it with `fedstill register`; the allow-list takes the "
                          f"signing key keys/{name}.pub")
    if "PRIVATE KEY" in first:
        raise ConfigError(f"{path} is a private key: it must not leave the institution; the allow-list takes the "
                          f"signing public key keys/{name}.pub")
    if len(lines) != 1 or not first.startswith(KEY_PREFIX):
        raise ConfigError(f"{path} is not a signing public key (one line \"{KEY_PREFIX}...\"); give the keys/{name}.pub "
                          "`fedstill institution-init` wrote")
    try:
        decode_public(first, str(path))
    except AuditError as error:
        raise ConfigError(f"{error}; give the keys/{name}.pub `fedstill institution-init` wrote") from None
    return first


def add_institution(path: Path, name: str, public: str) -> bool:
    """Add `name` = `public` to the allow-list `path` (created if absent); False when that very entry is there already."""
    check_name(name)
    entries = load_allow_list(path) if path.exists() else {}
    if entries.get(name) == public:
        return False
    if name in entries:
        raise ConfigError(f"{path} already lists {name!r} with another key ({key_id(entries[name])}, the new one is "
                          f"{key_id(public)}); remove its line first if {name} really has a new key")
    other = next((listed for listed, key in entries.items() if key == public), None)
    if other is not None:
        raise ConfigError(f"that key ({key_id(public)}) is already listed in {path} as {other!r}; each institution signs "
                          f"with its own key: ask {name} for its keys/{name}.pub")
    write_allow_list(path, {**entries, name: public})
    return True


def listed(path: Path) -> list[tuple[str, str]]:
    """(name, key id) of each institution in the allow-list `path`, by name."""
    if not path.is_file():
        raise ConfigError(f"allow-list {path} not found; add the first institution with "
                          f"`fedstill allow-list add NAME NAME.pub --allow-list {path}`")
    return [(name, key_id(public)) for name, public in sorted(load_allow_list(path).items())]
