"""Scenarios: TOML files of run-config overrides, merged over the defaults, plus `--set key=value`."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import RunConfig, default_run_config
from common.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_SCENARIO = "fmnist-dirichlet-0.5"


def list_scenarios() -> list[str]:
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str | None) -> dict[str, Any]:
    """Overrides of a named scenario (simulations/scenarios/NAME.toml) or of a TOML file path."""
    name = name_or_path or DEFAULT_SCENARIO
    path = Path(name)
    if not path.suffix == ".toml":
        path = SCENARIO_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no scenario {name!r}: known scenarios are {', '.join(list_scenarios())}, or give a .toml path")
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"scenario file {path} is not valid TOML: {error}") from None
    nested = [key for key, value in values.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(f"scenario file {path}: tables are not allowed ({', '.join(nested)}); use flat key = value lines")
    return values


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as TOML (3, 0.5, true, "text"), bare words as strings."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        values[key.strip()] = value
    return values


def resolve(scenario: str | None, sets: list[str], cwd: Path) -> tuple[dict[str, Any], RunConfig]:
    """The overrides to hand to `flwr run` and the validated config they produce.

    Relative `output-dir` and `data-dir` are made absolute against `cwd`; an empty `run-name` becomes
    `<scenario>-<UTC timestamp>` so the caller knows the run folder before the run starts.
    """
    overrides = {**load_scenario(scenario), **parse_sets(sets)}
    return overrides, RunConfig.from_run_config(complete(overrides, cwd))


def complete(overrides: dict[str, Any], cwd: Path, paths: tuple[str, ...] = ("output-dir", "data-dir")) -> dict[str, Any]:
    """The defaults merged with `overrides`, the keys `paths` made absolute against `cwd` and an empty run-name
    named; what changed is written into `overrides` too (the keys handed to `flwr run`)."""
    merged = {**default_run_config(), **overrides}
    for key in paths:
        if isinstance(merged.get(key), str) and merged[key]:
            overrides[key] = merged[key] = str((cwd / Path(merged[key]).expanduser()).resolve())
    if not merged.get("run-name") and isinstance(merged.get("scenario"), str):
        overrides["run-name"] = merged["run-name"] = f"{merged['scenario']}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    return merged


def dataset_fit(scenario: str | None, overrides: dict[str, Any]) -> str | None:
    """A warning when `overrides` swap the scenario's data set for another while keeping the scenario's models,
    epochs and public-set size, chosen for the first: None when the data set is the scenario's own."""
    tuned = {**default_run_config(), **load_scenario(scenario)}.get("dataset")
    dataset = overrides.get("dataset", tuned)
    if dataset == tuned:
        return None
    fitting = [name for name in list_scenarios() if load_scenario(name).get("dataset") == dataset]
    advice = (f"start from a {dataset} scenario instead ({', '.join(fitting)})" if fitting
              else f"set its models, epochs and public-size for {dataset}, or write a scenario file for it")
    return (f"warning: dataset {dataset} replaces {tuned}, but the scenario's models, epochs and public-size were chosen "
            f"for {tuned}; {advice}")


def to_toml(values: dict[str, Any]) -> str:
    """Flat key = value TOML for scalars and lists of scalars (what run configs and site policies hold)."""
    return "\n".join(f"{key} = {_toml_value(value)}" for key, value in values.items()) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
