"""Typed, validated view of an institution's node config (`flower-supernode --node-config`), parsed once.

The ClientApp builds a `NodeConfig` from `context.node_config` once per message and hands it down;
`fedstill supernode` builds the same one before it starts the node, so both refuse a malformed node
config with the same words. Keys fedstill does not read are ignored, as Flower passes them through.
Path values stay as the institution wrote them (`~` is expanded where a path is used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError

UserConfigValue = bool | int | float | str  # a node-config value, as flwr.common.typing.UserConfigValue
BUDGET_KEYS = ("max-epsilon", "delta", "privacy-ledger")  # what a simulated institution's site.toml may set
EXAMPLE_NODE_CONFIG = "--node-config 'institution-id=\"hospital-a\" signing-key=\"keys/hospital-a.key\"'"


@dataclass(frozen=True)
class NodeConfig:
    """Every node-config key fedstill reads; field `foo_bar` is key `foo-bar`, None when the key is absent."""

    data_path: str | None = None  # the institution's own private data (common.tasks.institution_files)
    public_dir: str | None = None  # its copy of the public set, when not at the run's data-dir
    partition_id: int | None = None  # simulation: its partition of the shared pool; picks its teacher model
    num_partitions: int | None = None
    institution_id: str | None = None  # its audit identity (client.release)
    signing_key: str | None = None
    release_log: str | None = None
    privacy_ledger: str | None = None  # its privacy budget and ledger (client.privacy)
    max_epsilon: float | None = None
    delta: float | None = None
    state_dir: str | None = None  # where its teacher is kept across restarts (client.teacher)
    site_policy: str | None = None  # its site policy file (common.site_policy); default: site-policy.toml in its folder
    coordinator_key: str | None = None  # the coordinator's public key (coordinator.pub, or its "ed25519:..." text) it
    #                                     pins for the heads it witnesses (client.witness); default: the first it sees
    allow_list: str | None = None  # its own copy of the consortium's allow-list (secure aggregation checks its peers'
    #                                signed keys against it); default: allow-list.toml in its folder

    @classmethod
    def from_node_config(cls, raw: Mapping[str, UserConfigValue]) -> NodeConfig:
        """Build from Flower's `context.node_config` (kebab-case keys); one ConfigError names every problem."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key, parse in _PARSERS.items():
            if key not in raw:
                continue
            value, problem = parse(key, raw[key])
            if problem:
                problems.append(problem)
            values[key.replace("-", "_")] = value
        problems += _identity_problems(raw)
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**values)

    def to_node_config(self) -> dict[str, UserConfigValue]:
        """The keys this config sets, kebab-case, as a node config holds them."""
        return {f.name.replace("_", "-"): value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) is not None}

    def with_site_settings(self, settings: Mapping[str, Any]) -> NodeConfig:
        """This config, with a simulated institution's site.toml filling the budget keys it leaves unset."""
        defaults = {key: settings[key] for key in BUDGET_KEYS if key in settings}
        return NodeConfig.from_node_config({**defaults, **self.to_node_config()})

    @property
    def has_identity(self) -> bool:
        """Whether the node config names an audit identity (then both institution-id and signing-key)."""
        return self.signing_key is not None

    def partition(self, default_partitions: int) -> tuple[int, int]:
        """(partition-id, num-partitions) of a node without its own data; num-partitions defaults to num-clients."""
        num_partitions = default_partitions if self.num_partitions is None else self.num_partitions
        if self.partition_id is None:
            raise ConfigError(
                "node config needs a 'data-path' to this institution's data (or, to use a partition of the shared pool, "
                "integer 'partition-id' and 'num-partitions'); start the SuperNode with "
                "--node-config 'data-path=\"/abs/path/to/data\"'"
            )
        return self.partition_id, num_partitions


Parser = Callable[[str, Any], tuple[Any, str | None]]


def _folder(example: str, what: str = "a folder path") -> Parser:
    """A path that must be a non-empty string."""
    def parse(key: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, str) and value:
            return value, None
        return None, f"node config {key} must be {what} (a string), got {value!r}; {example}"
    return parse


def _file(example: str) -> Parser:
    """A file path; an empty string means the default place."""
    def parse(key: str, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, str):
            return value or None, None
        return None, (f"node config {key} must be a file path (a string), got {value!r}; for example "
                      f"--node-config '{key}=\"/data/state/{example}\"'")
    return parse


def _identity_part(key: str, value: Any) -> tuple[Any, str | None]:
    """institution-id or signing-key: checked as a pair by `_identity_problems`."""
    return (value, None) if isinstance(value, str) else (None, None)


def _integer(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    return None, (f"node config {key} must be an integer, got {value!r}; for example "
                  "--node-config 'partition-id=0 num-partitions=3'")


def _max_epsilon(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value), None
    return None, f"max-epsilon must be a number > 0 (or absent: no budget), got {value!r}"


def _delta(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, float) and 0 < value < 1:
        return value, None
    return None, f"delta must be a float in (0, 1), got {value!r}"


def _identity_problems(raw: Mapping[str, UserConfigValue]) -> list[str]:
    """An audit identity needs both its name and its signing key."""
    if "signing-key" not in raw and "institution-id" not in raw:
        return []
    name, key = raw.get("institution-id"), raw.get("signing-key")
    if isinstance(name, str) and isinstance(key, str):
        return []
    if isinstance(key, str) and "institution-id" not in raw:
        return ["node config has signing-key but no institution-id; add institution-id=\"NAME\" "
                "(the name in the coordinator's allow-list)"]
    return ["node config needs both 'institution-id' and 'signing-key' (paths as strings), "
            f"for example {EXAMPLE_NODE_CONFIG}"]


_PARSERS: dict[str, Parser] = {
    "data-path": _folder("start the SuperNode with --node-config 'data-path=\"/abs/path/to/data\"'", "a path"),
    "public-dir": _folder("for example --node-config 'public-dir=\"/data/fashion-mnist\"'"),
    "partition-id": _integer,
    "num-partitions": _integer,
    "institution-id": _identity_part,
    "signing-key": _identity_part,
    "release-log": _file("release-log.jsonl"),
    "privacy-ledger": _file("privacy-ledger.json"),
    "max-epsilon": _max_epsilon,
    "delta": _delta,
    "state-dir": _folder("for example --node-config 'state-dir=\"/var/lib/fedstill/hospital-a\"'"),
    "site-policy": _file("site-policy.toml"),
    "coordinator-key": _file("coordinator.pub"),
    "allow-list": _file("allow-list.toml"),
}
