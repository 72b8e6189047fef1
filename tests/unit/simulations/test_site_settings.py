"""`--site` settings of simulated institutions: parsing, provisioning into site.toml and site-policy.toml,
and the preflight refusal of a rule that needs class counts the institutions' policies withhold."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from common.config import RunConfig
from common.errors import ConfigError
from common.site_policy import POLICY_FILE, SitePolicy
from simulations.cli.run_commands import preflight_sites
from simulations.provision import SITES, parse_site, provision_sites


def read_toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def dp_run(mapping: dict[str, Any], tmp_path: Path, **changes: Any) -> RunConfig:
    return RunConfig.from_run_config({**mapping, "privacy": "dp-sgd", "aggregation": "balanced-expertise",
                                      "num-clients": 3, "min-clients": 2, "output-dir": str(tmp_path), **changes})


def test_policy_keys_parse_to_their_toml_types() -> None:
    # Execute
    settings = parse_site(["class-counts=true", "counts=exact", "count-multiple=50", "mechanisms=dp-sgd,pate",
                           "training-loss=false", 'institution-2.counts="withheld"', "institution-2.max-epsilon=1"])

    # Assert
    assert settings == {"class-counts": True, "counts": "exact", "count-multiple": 50, "mechanisms": ["dp-sgd", "pate"],
                        "training-loss": False,
                        "institutions": {"institution-2": {"counts": "withheld", "max-epsilon": 1.0}}}


@pytest.mark.parametrize(("item", "message"), [
    ("class-counts=yes", r"--site 'class-counts=yes': class-counts must be true or false, got 'yes'; fix the value"),
    ("counts=approx", r"counts must be one of \['exact', 'rounded', 'noised', 'withheld'\], got 'approx'"),
    ("count-multiple=0", r"count-multiple must be an integer >= 1, got 0"),
    ("mechanisms=dp-sgd,magic", r"mechanisms must be a non-empty list"),
    ("class_counts=true", r"known institution settings are mechanisms, max-epsilon, delta, counts"),
])
def test_a_bad_policy_key_or_value_is_one_config_error_naming_it(item: str, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message) as caught:
        parse_site([item])
    assert "\n" not in str(caught.value)


def test_the_sweep_refuses_budget_keys_it_sets_itself() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="use --epsilons and --delta"):
        parse_site(["max-epsilon=4"], budget=False)
    assert parse_site(["class-counts=true"], budget=False) == {"class-counts": True}


def test_provision_writes_the_budget_to_site_toml_and_the_policy_to_site_policy_toml(tmp_path: Path) -> None:
    # Prepare
    site = parse_site(["max-epsilon=4", "delta=1e-6", "class-counts=true", "mechanisms=dp-sgd",
                       "institution-1.counts=withheld", "institution-1.count-multiple=10"])

    # Execute
    provision_sites(tmp_path, 2, site)

    # Assert
    zero, one = tmp_path / SITES / "institution-0", tmp_path / SITES / "institution-1"
    assert read_toml(zero / "site.toml") == {"max-epsilon": 4.0, "delta": 1e-6}
    assert read_toml(zero / POLICY_FILE) == {"class-counts": True, "mechanisms": ["dp-sgd"]}
    assert read_toml(one / POLICY_FILE) == {"class-counts": True, "mechanisms": ["dp-sgd"], "counts": "withheld",
                                            "count-multiple": 10}
    policy = SitePolicy.from_toml((one / POLICY_FILE).read_text(encoding="utf-8"))
    assert policy.allows_class_counts("dp-sgd") and policy.released_count(95, "dp-sgd") == 1


def test_provision_writes_no_policy_file_without_policy_keys(tmp_path: Path) -> None:
    # Execute
    provision_sites(tmp_path, 1, parse_site(["max-epsilon=2"]))

    # Assert
    assert (tmp_path / SITES / "institution-0" / "site.toml").is_file()
    assert not (tmp_path / SITES / "institution-0" / POLICY_FILE).exists()


def test_provision_writes_nothing_for_an_unknown_institution(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="no institution 'institution-5'"):
        provision_sites(tmp_path, 2, {"institutions": {"institution-5": {"class-counts": True}}})
    assert not (tmp_path / SITES).exists()


def test_a_dp_run_needing_class_counts_the_policies_withhold_fails_before_it_starts(
        run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = dp_run(run_config_mapping, tmp_path)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r'aggregation "balanced-expertise" needs per-class counts, which the site '
                                          r"policy of institution-0, institution-1, institution-2 refuses under privacy "
                                          r'"dp-sgd" .*add --site counts=noised .*or --site class-counts=true'):
        preflight_sites(cfg, parse_site(["max-epsilon=4"]))
    preflight_sites(cfg, parse_site(["max-epsilon=4", "counts=noised"]))  # noised and accounted: allowed


def test_class_counts_pass_when_enough_institutions_release_them(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare: institution-2 withholds them, but min-clients = 2 others release them
    cfg = dp_run(run_config_mapping, tmp_path)
    site = parse_site(["class-counts=true", "institution-2.class-counts=false"])

    # Execute / Assert: no error
    preflight_sites(cfg, site)
    preflight_sites(dp_run(run_config_mapping, tmp_path, aggregation="mean"), None)
    preflight_sites(dp_run(run_config_mapping, tmp_path, privacy="none"), None)
    with pytest.raises(ConfigError, match="institution-1, institution-2 refuses"):
        preflight_sites(cfg, parse_site(["institution-0.class-counts=true"]))


def test_a_sweep_checks_its_mechanism_not_the_base_privacy(run_config_mapping: dict, tmp_path: Path) -> None:
    # Prepare
    cfg = dp_run(run_config_mapping, tmp_path, privacy="none")

    # Execute / Assert
    with pytest.raises(ConfigError, match='under privacy "pate"'):
        preflight_sites(cfg, None, privacy="pate")
