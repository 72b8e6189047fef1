"""An institution's own folder: its signing and node key pairs, data and state folders, and its node config.

`fedstill institution-init NAME --out DIR` lays it out; the institution sends only the two public keys
and receives ca.crt, allow-list.toml and coordinator.pub into DIR:

    DIR/keys/NAME.key, NAME.pub            Ed25519 signing key pair (signs every release; the allow-list entry)
    DIR/keys/NAME-node.key, NAME-node.pub  EC P-384 node key pair, OpenSSH (authenticates the SuperNode)
    DIR/data/   DIR/state/                 its private data, its teacher's state
    DIR/node-config.toml                   flat TOML, absolute paths, for `fedstill supernode --node-config`

Folders are created mode 0700 and private keys 0600.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.audit.keys import Signer, check_name, write_key_pair
from common.errors import ConfigError
from simulations.deploy.certs import make_node_key, refuse_existing, write_atomic, write_node_key

NODE_SUFFIX = "-node"
NODE_CONFIG = "node-config.toml"


@dataclass(frozen=True)
class InstitutionFolder:
    """Where everything of institution `name` lives, under the absolute folder `root`."""

    name: str
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def signing_key(self) -> Path:
        return self.keys / f"{self.name}.key"

    @property
    def signing_public(self) -> Path:
        return self.keys / f"{self.name}.pub"

    @property
    def node_key(self) -> Path:
        return self.keys / f"{self.name}{NODE_SUFFIX}.key"

    @property
    def node_public(self) -> Path:
        return self.keys / f"{self.name}{NODE_SUFFIX}.pub"

    @property
    def folders(self) -> list[Path]:
        return [self.root, self.keys, self.root / "data", self.root / "state"]

    @property
    def node_config_path(self) -> Path:
        return self.root / NODE_CONFIG

    def node_config(self) -> dict[str, str]:
        """The node config's keys and absolute paths, in the order the file lists them."""
        return {
            "institution-id": self.name,
            "signing-key": str(self.signing_key),
            "release-log": str(self.root / "release-log.jsonl"),
            "privacy-ledger": str(self.root / "privacy-ledger.json"),
            "state-dir": str(self.root / "state"),
            "data-path": str(self.root / "data"),
            "allow-list": str(self.root / "allow-list.toml"),  # the consortium's allow-list, a copy from the coordinator
            "coordinator-key": str(self.root / "coordinator.pub"),  # the coordinator's public key: pins the ledger's signer
        }


def node_config_toml(config: dict[str, str]) -> str:
    """Flat TOML of string values (a JSON string is a valid TOML basic string)."""
    lines = ["# fedstill node config: `fedstill supernode --node-config` this file (absolute paths)"]
    return "\n".join(lines + [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in config.items()]) + "\n"


def init_institution(name: str, out: Path, overwrite: bool = False) -> InstitutionFolder:
    """Lay out institution `name`'s folder under `out` (made absolute); refuse existing files unless `overwrite`."""
    if len(check_name(name)) > 64 - len(NODE_SUFFIX):
        raise ConfigError(f"institution name {name!r} is {len(name)} characters long; give at most {64 - len(NODE_SUFFIX)} "
                          f"(its node key is named NAME{NODE_SUFFIX}, 64 at most)")
    folder = InstitutionFolder(name, out.expanduser().resolve())
    files = [folder.signing_key, folder.signing_public, folder.node_key, folder.node_public, folder.node_config_path]
    refuse_existing(files, overwrite)
    for path in folder.folders:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file; {name}'s folder needs a folder there: move the file or choose another --out")
        if not path.exists():
            path.mkdir(mode=0o700, parents=True)
            path.chmod(0o700)  # whatever the umask
    folder.keys.chmod(0o700)  # also when it was there before
    write_key_pair(Signer.generate(name), folder.keys, overwrite=overwrite)
    write_node_key(make_node_key(), folder.keys, name + NODE_SUFFIX, overwrite=overwrite)
    write_atomic(folder.node_config_path, node_config_toml(folder.node_config()).encode("utf-8"), overwrite=overwrite)
    return folder
