"""Unit tests of the node's enforcement (client/enforce.py): where the policy file is, the budget it tightens,
and the statement a reply signs (client/release.py `released_statement`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from client.enforce import budget, site_policy, within_policy
from client.privacy import Policy
from client.release import released_statement
from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from common.node_config import NodeConfig
from common.site_policy import SitePolicy


def config(**changes: Any) -> RunConfig:
    return RunConfig.from_run_config({**default_run_config(), **changes})


def test_the_policy_is_the_node_configs_file_else_the_institutions_folder_else_the_defaults(tmp_path: Path) -> None:
    # Prepare
    own = tmp_path / "sites" / "institution-1"
    own.mkdir(parents=True)
    (own / "site-policy.toml").write_text("max-queries-per-round = 1\n")
    (tmp_path / "elsewhere.toml").write_text("max-queries-per-round = 2\n")
    cfg = config(**{"sites-dir": str(tmp_path / "sites")})

    # Execute / Assert
    assert site_policy(cfg, NodeConfig(partition_id=1)).max_queries_per_round == 1
    named = NodeConfig(partition_id=1, site_policy=str(tmp_path / "elsewhere.toml"))
    assert site_policy(cfg, named).max_queries_per_round == 2
    assert site_policy(cfg, NodeConfig(partition_id=2)) == SitePolicy()
    assert site_policy(config(), NodeConfig(partition_id=1)) == SitePolicy()


def test_a_named_policy_file_that_is_missing_is_refused_without_its_path(tmp_path: Path) -> None:
    # Prepare
    node = NodeConfig(partition_id=1, site_policy=str(tmp_path / "gone.toml"))

    # Execute / Assert: a missing policy must not silently mean "no limits"
    with pytest.raises(ConfigError, match="node config site-policy names no readable file") as caught:
        site_policy(config(), node)
    assert str(tmp_path) not in str(caught.value)


def test_the_budget_is_the_smaller_of_the_policy_and_the_node_config(tmp_path: Path) -> None:
    # Prepare
    site = tmp_path / "institution-0"
    site.mkdir()
    (site / "site.toml").write_text("max-epsilon = 6.0\n")
    cfg = config(**{"sites-dir": str(tmp_path)})
    ledger = Policy(8.0, 1e-5, tmp_path / "ledger.json")

    # Execute / Assert
    assert budget(cfg, NodeConfig(partition_id=0), SitePolicy(max_epsilon=4.0)) == 4.0
    assert budget(cfg, NodeConfig(partition_id=0), SitePolicy()) == 6.0
    assert budget(config(), NodeConfig(partition_id=0), SitePolicy()) is None
    tightened = within_policy(ledger, SitePolicy(max_epsilon=4.0, delta=1e-6))
    assert (tightened.max_epsilon, tightened.delta) == (4.0, 1e-6)
    assert within_policy(ledger, SitePolicy(max_epsilon=9.0, delta=1e-3)) == ledger  # a policy never loosens


def test_the_signed_statement_lists_the_releases_and_keeps_count_revealing_parameters_home() -> None:
    # Prepare
    privacy = {"mechanism": "dp-sgd", "parameters": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps_per_round": 20},
               "epsilon": 0.5, "epsilon_total": 0.5, "delta": 1e-5}
    rounded = SitePolicy().releases("dp-sgd", class_counts=False, teacher_accuracy=False)
    exact = SitePolicy(counts="exact").releases("dp-sgd", class_counts=False, teacher_accuracy=False)

    # Execute
    stated, stated_exact = released_statement(privacy, rounded), released_statement(privacy, exact)

    # Assert
    assert stated is not None and stated_exact is not None
    assert stated["parameters"] == {"noise_multiplier": 1.1} and stated["released"] == rounded
    assert stated_exact["parameters"] == privacy["parameters"]
    assert released_statement(None, rounded) is None  # without a mechanism the attestation says "none"
