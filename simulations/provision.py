"""Identities and settings for a simulated federation: what each institution and the coordinator would set up themselves.

In a real federation each institution runs `fedstill keygen` and sends its public key to the
coordinator, who lists it in the allow-list. A simulation does the same on one machine: one key pair
per simulated institution in `<run folder>/sites/institution-<i>/`, with the institution's own
`site.toml` (its privacy budget: max-epsilon, delta), `site-policy.toml` (every other site-policy
key: what its node releases) and `allow-list.toml` (its own copy of the consortium's keys, against which
it checks its peers under secure aggregation), and `<run folder>/allow-list.toml` (the coordinator's).

`site` (from `--site`) is {key: value, "institutions": {name: {key: value}}}: settings of every
institution, and of one by name; one institution's own value wins.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.release import PEERS_FILE, SITE_CONFIG, simulated_institution, site_folder
from common.aggregation import NEEDS_CLASS_COUNTS
from common.audit.keys import Signer, write_allow_list, write_key_pair
from common.errors import ConfigError
from common.files import PRIVATE, atomic_write_text
from common.site_policy import POLICY_FILE, POLICY_KEYS, SitePolicy, value_problem
from simulations.scenarios import to_toml

if TYPE_CHECKING:
    from common.config import RunConfig

SITES = "sites"
ALLOW_LIST = "allow-list.toml"
BUDGET = ("max-epsilon", "delta")  # into site.toml; every other key goes into site-policy.toml


def provision_sites(run_dir: Path, num_clients: int, site: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make keys and the allow-list for `num_clients` simulated institutions, and write each one's own
    settings (`site`) into its `site.toml` and `site-policy.toml`; return the run-config overrides.
    Every institution's settings are checked before anything is written."""
    settings = site_settings(site, num_clients)
    sites = Path(run_dir) / SITES
    institutions = {}
    for partition_id in range(num_clients):
        signer = Signer.generate(simulated_institution(partition_id))
        folder = site_folder(sites, partition_id)
        write_key_pair(signer, folder, overwrite=True)
        own = settings[signer.name]
        for name, keys in ((SITE_CONFIG, [k for k in own if k in BUDGET]), (POLICY_FILE, [k for k in own if k not in BUDGET])):
            (folder / name).unlink(missing_ok=True)  # a rerun into the same folder keeps no stale settings
            if keys:
                atomic_write_text(folder / name, to_toml({k: own[k] for k in keys}), mode=PRIVATE)
        institutions[signer.name] = signer.public
    allow_list = Path(run_dir) / ALLOW_LIST
    write_allow_list(allow_list, institutions)
    for partition_id in range(num_clients):  # each institution keeps its own copy, to check its peers' keys
        write_allow_list(site_folder(sites, partition_id) / PEERS_FILE, institutions)
    return {"allow-list": str(allow_list), "sites-dir": str(sites)}


def parse_site(items: list[str], *, budget: bool = True) -> dict[str, Any] | None:
    """`--site key=value` settings of every simulated institution, or of one: `--site institution-2.class-counts=true`.
    Keys are the budget (max-epsilon, delta; only with `budget`) and every site-policy key; values are TOML
    (`true`, `100`, `"exact"`), a bare word is a string, and `mechanisms` takes `dp-sgd,pate`.
    Returns {key: value, "institutions": {name: {key: value}}}; a bad key or value raises a ConfigError naming it."""
    settings: dict[str, Any] = {}
    for item in items:
        target, sep, text = item.partition("=")
        name, _, key = target.strip().rpartition(".")
        if not sep or key not in POLICY_KEYS:
            raise ConfigError(f"--site {item!r}: known institution settings are {', '.join(POLICY_KEYS)} (key=value), "
                              "optionally for one institution: institution-<i>.class-counts=true")
        if key in BUDGET and not budget:
            raise ConfigError(f"--site {item!r}: a privacy sweep sets each run's {key} itself; use --epsilons and --delta")
        value = _site_value(key, text.strip())
        problem = value_problem(key, value)
        if problem:
            raise ConfigError(f"--site {item!r}: {key} {problem}; fix the value")
        (settings.setdefault("institutions", {}).setdefault(name, {}) if name else settings)[key] = value
    return settings or None


def _site_value(key: str, text: str) -> Any:
    if key in BUDGET:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--site {key}={text}: {key} must be a number") from None
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: counts=exact
    if key == "mechanisms" and isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    return value


def merged_site(every: dict[str, Any] | None, own: dict[str, Any] | None) -> dict[str, Any] | None:
    """`--site` settings (`every`) with one method's own (`site.KEY=VALUE` in `--method`) on top: its keys replace
    those of every institution, its institutions' keys those of the same institution; as with `--site`, an
    institution's own value wins over a value for every institution."""
    if not own:
        return every
    if not every:
        return own
    merged = {**every, **{key: value for key, value in own.items() if key != "institutions"}}
    institutions = {name: dict(values) for name, values in every.get("institutions", {}).items()}
    for name, values in own.get("institutions", {}).items():
        institutions.setdefault(name, {}).update(values)
    if institutions:
        merged["institutions"] = institutions
    return merged


def provisioned_settings(run_dir: Path, num_clients: int) -> dict[str, dict[str, Any]]:
    """What each simulated institution of the run in `run_dir` was provisioned with, by name, as `site_settings`
    gives them: its site.toml and site-policy.toml (nothing from a file that is not there; an unreadable one gives
    {"unreadable": its path}, which matches no settings)."""
    found = {}
    for partition_id in range(num_clients):
        folder, own = site_folder(Path(run_dir) / SITES, partition_id), {}
        for path in (folder / SITE_CONFIG, folder / POLICY_FILE):
            try:
                own.update(tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                own = {"unreadable": str(path)}
                break
        found[simulated_institution(partition_id)] = own
    return found


def site_settings(site: dict[str, Any] | None, num_clients: int) -> dict[str, dict[str, Any]]:
    """Every simulated institution's settings by name, checked (see institution_settings)."""
    return {name: institution_settings(site, name, num_clients) for name in _names(num_clients)}


def institution_settings(site: dict[str, Any] | None, name: str, num_clients: int) -> dict[str, Any]:
    """One institution's settings: every institution's, then its own; a ConfigError names a bad key or an
    institution this run does not have."""
    unknown = sorted(set((site or {}).get("institutions", {})) - set(_names(num_clients)))
    if unknown:
        raise ConfigError(f"--site {unknown[0]}.…: this run has no institution {unknown[0]!r} (it has institution-0 to "
                          f"institution-{num_clients - 1}); fix the name or num-clients")
    own = {k: v for k, v in (site or {}).items() if k != "institutions"}
    own.update((site or {}).get("institutions", {}).get(name, {}))
    try:
        SitePolicy.from_mapping(own)
    except ConfigError as error:
        raise ConfigError(f"--site for {name}: {str(error).removeprefix('site-policy: ').removesuffix('; fix site-policy.toml')}"
                          "; fix --site") from None
    return own


def check_class_counts(cfg: RunConfig, site: dict[str, Any] | None, *, privacy: str | None = None,
                       sites_dir: Path | None = None) -> None:
    """Refuse, before the run starts, a rule that needs per-class counts under a privacy mechanism when fewer
    than min-clients simulated institutions' policies release them (the run would end in a QuorumError).
    `privacy`: the run's mechanism when it is not cfg's (a privacy sweep); `sites_dir`: the institutions'
    folders when they exist already (cfg's sites-dir, or a resumed run's), else `site` says what will be written."""
    privacy = privacy or cfg.privacy
    if cfg.method == "fedavg" or cfg.aggregation not in NEEDS_CLASS_COUNTS or privacy == "none":
        return
    policies = {name: _policy(cfg, site, name, sites_dir) for name in _names(cfg.num_clients)}
    refusing = [name for name, policy in policies.items() if not policy.allows_class_counts(privacy)]
    if len(policies) - len(refusing) >= cfg.min_clients:
        return
    raise ConfigError(
        f"aggregation {json.dumps(cfg.aggregation)} needs per-class counts, which the site policy of "
        f"{', '.join(refusing)} refuses under privacy {json.dumps(privacy)} (class-counts = false under privacy, "
        "unless the policy says otherwise): add --site counts=noised (the counts then leave with Gaussian noise, once "
        "per run, accounted in each institution's budget), or --site class-counts=true (they leave exact, outside "
        "the accounted mechanism, and each signed privacy statement lists them as released), or use aggregation "
        "\"mean\" or \"weighted\"")


def _policy(cfg: RunConfig, site: dict[str, Any] | None, name: str, sites_dir: Path | None) -> SitePolicy:
    """The policy this institution's node will read: its file in the sites folder, or the one `site` provisions."""
    folder = Path(cfg.sites_dir) if cfg.sites_dir else sites_dir
    if folder is not None:
        path = folder / name / POLICY_FILE
        return SitePolicy.from_toml(path.read_text(encoding="utf-8")) if path.is_file() else SitePolicy()
    own = institution_settings(site, name, cfg.num_clients)
    return SitePolicy.from_mapping({k: v for k, v in own.items() if k not in BUDGET})


def _names(num_clients: int) -> list[str]:
    return [simulated_institution(i) for i in range(num_clients)]
