"""Unit tests of common/node_config.py: an institution's node config, parsed once, every problem named with its fix."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from client.privacy import load_policy
from common.config import RunConfig
from common.errors import ConfigError
from common.node_config import BUDGET_KEYS, NodeConfig


def test_every_key_becomes_a_typed_field() -> None:
    # Prepare
    raw = {
        "data-path": "/data/a b", "public-dir": "~/public", "partition-id": 2, "num-partitions": 3,
        "institution-id": "hospital-a", "signing-key": "keys/hospital-a.key", "release-log": "/s/release-log.jsonl",
        "privacy-ledger": "/s/privacy-ledger.json", "max-epsilon": 4, "delta": 1e-6, "state-dir": "/s/state",
        "site-policy": "/s/site-policy.toml", "coordinator-key": "/s/coordinator.pub", "allow-list": "/s/allow-list.toml",
    }

    # Execute
    node = NodeConfig.from_node_config(raw)

    # Assert: one field per key, ints accepted for max-epsilon, and back again
    assert {f.name.replace("_", "-") for f in dataclasses.fields(NodeConfig)} == set(raw)
    assert node.max_epsilon == 4.0 and isinstance(node.max_epsilon, float) and node.partition_id == 2
    assert node.has_identity
    assert NodeConfig.from_node_config(node.to_node_config()) == node


def test_an_empty_node_config_sets_nothing_and_unknown_keys_are_ignored() -> None:
    node = NodeConfig.from_node_config({"flag": True, "colour": "blue"})
    assert node == NodeConfig() and node.to_node_config() == {} and not node.has_identity


@pytest.mark.parametrize(("raw", "message"), [
    ({"data-path": 3}, r"^node config data-path must be a path \(a string\), got 3; start the SuperNode with "
                       r"--node-config 'data-path=\"/abs/path/to/data\"'$"),
    ({"data-path": ""}, r"data-path must be a path \(a string\), got ''"),
    ({"public-dir": 1}, r"^node config public-dir must be a folder path \(a string\), got 1; for example"),
    ({"state-dir": 3}, r"^node config state-dir must be a folder path \(a string\), got 3; for example "
                       r"--node-config 'state-dir=\"/var/lib/fedstill/hospital-a\"'$"),
    ({"partition-id": "2"}, r"^node config partition-id must be an integer, got '2'"),
    ({"num-partitions": True}, r"^node config num-partitions must be an integer, got True"),
    ({"release-log": 5}, r"^node config release-log must be a file path \(a string\), got 5"),
    ({"max-epsilon": -1.0}, r"^max-epsilon must be a number > 0 \(or absent: no budget\), got -1.0$"),
    ({"max-epsilon": "4"}, r"max-epsilon must be a number > 0"),
    ({"delta": 2.0}, r"^delta must be a float in \(0, 1\), got 2.0$"),
    ({"delta": 0}, r"delta must be a float in \(0, 1\), got 0"),
    ({"signing-key": "k.key"}, r"^node config has signing-key but no institution-id; add institution-id=\"NAME\" "
                               r"\(the name in the coordinator's allow-list\)$"),
    ({"institution-id": "hospital-a"}, r"^node config needs both 'institution-id' and 'signing-key' \(paths as strings\)"),
    ({"institution-id": "a", "signing-key": 3}, r"needs both 'institution-id' and 'signing-key'"),
])
def test_each_bad_key_is_named_with_its_fix(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_node_config(raw)


def test_every_problem_is_named_at_once() -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        NodeConfig.from_node_config({"data-path": 3, "delta": 2.0, "signing-key": "k.key"})

    # Assert
    problems = str(caught.value).split("; ")
    assert any(p.startswith("node config data-path must be a path") for p in problems)
    assert any(p.startswith("delta must be a float") for p in problems)
    assert any(p.startswith("node config has signing-key but no institution-id") for p in problems)


def test_an_empty_log_or_ledger_path_means_the_default_place() -> None:
    node = NodeConfig.from_node_config({"release-log": "", "privacy-ledger": ""})
    assert node.release_log is None and node.privacy_ledger is None


def test_partition_needs_a_partition_id_and_defaults_num_partitions() -> None:
    assert NodeConfig(partition_id=1).partition(5) == (1, 5)
    assert NodeConfig(partition_id=1, num_partitions=3).partition(5) == (1, 3)
    with pytest.raises(ConfigError, match=r"needs a 'data-path' to this institution's data .*integer 'partition-id'"):
        NodeConfig().partition(5)


def test_site_settings_fill_only_the_budget_keys_the_node_config_leaves_unset() -> None:
    # Prepare
    node = NodeConfig(partition_id=3, max_epsilon=2.0)
    site = {"max-epsilon": 4.0, "delta": 1e-6, "privacy-ledger": "/site/ledger.json", "data-path": "/not/a/budget/key"}

    # Execute
    merged = node.with_site_settings(site)

    # Assert
    assert BUDGET_KEYS == ("max-epsilon", "delta", "privacy-ledger")
    assert merged == NodeConfig(partition_id=3, max_epsilon=2.0, delta=1e-6, privacy_ledger="/site/ledger.json")
    with pytest.raises(ConfigError, match="delta must be a float in"):
        NodeConfig().with_site_settings({"delta": 3})


def test_a_bad_budget_in_site_toml_is_refused_in_the_same_words(tmp_path: Path, run_config_mapping: dict[str, Any]) -> None:
    # Prepare
    cfg = RunConfig.from_run_config({**run_config_mapping, "sites-dir": str(tmp_path)})
    (tmp_path / "institution-0").mkdir()
    (tmp_path / "institution-0" / "site.toml").write_text("max-epsilon = -3\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^max-epsilon must be a number > 0 \(or absent: no budget\), got -3$"):
        load_policy(cfg, NodeConfig(partition_id=0))
    assert math.isinf(load_policy(cfg, NodeConfig(partition_id=0, max_epsilon=math.inf)).max_epsilon)
