"""The run config of a deployed run: the pyproject defaults < a scenario < the coordinator's run-config file <
`--set key=value`, the number of institutions read from the allow-list, and the file `flwr run` is given.

Paths (output-dir, data-dir, allow-list, coordinator-key) are made absolute against the coordinator's working
folder, as `fedstill simulate` does for its paths; the ServerApp reads them on the SuperLink's host. The file
written holds only the keys that differ from the defaults, plus num-clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.audit.keys import load_allow_list
from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from simulations.scenarios import complete, dataset_fit, load_scenario, parse_sets, to_toml

PATH_KEYS = ("output-dir", "data-dir", "allow-list", "coordinator-key")


@dataclass(frozen=True)
class DeployedConfig:
    cfg: RunConfig
    values: dict[str, Any]  # what the written run config holds
    notes: list[str] = field(default_factory=list)  # what was decided for the coordinator (printed)

    def toml(self) -> str:
        return to_toml(self.values)


def resolve_deployed(scenario: str | None, run_config: Path | None, sets: list[str], cwd: Path) -> DeployedConfig:
    """Merge, fill num-clients from the allow-list when neither the file nor --set gives it, and validate."""
    explicit = {**(load_run_config_file(run_config) if run_config else {}), **parse_sets(sets)}
    overrides = {**load_scenario(scenario), **explicit}
    merged = complete(overrides, cwd, PATH_KEYS)
    notes: list[str] = []
    if "num-clients" not in explicit and merged.get("allow-list"):
        count = _institutions(str(merged["allow-list"]))
        merged["num-clients"] = count
        notes.append(f"num-clients = {count}: the institutions in the allow-list {merged['allow-list']}")
        if "min-clients" not in explicit and isinstance(merged.get("min-clients"), int) and merged["min-clients"] > count:
            notes.append(f"min-clients = {count}: capped at num-clients (it was {merged['min-clients']})")
            merged["min-clients"] = count
    if (warning := dataset_fit(scenario, explicit)) is not None:
        notes.append(warning)
    cfg = RunConfig.from_run_config(merged)
    defaults = default_run_config()
    values = {key: value for key, value in cfg.to_dict().items()
              if key == "num-clients" or key not in defaults or value != defaults[key]}
    return DeployedConfig(cfg, values, notes)


def load_run_config_file(path: Path) -> dict[str, Any]:
    """A TOML file of flat run-config keys (the coordinator's own settings for the federation)."""
    if path.suffix != ".toml":
        raise ConfigError(f"--run-config {path}: give a .toml file of flat key = value lines")
    if not path.is_file():
        raise ConfigError(f"--run-config {path} not found; give the TOML file of run-config keys")
    return load_scenario(str(path))


def _institutions(allow_list: str) -> int:
    try:
        return len(load_allow_list(allow_list))
    except ConfigError as error:
        raise ConfigError(f"{error} (num-clients is read from it; or give --set num-clients=N)") from None
