"""The node enforces its institution's site policy (common.site_policy): whatever a query asks, it is refused
before any training when the policy refuses it, and a reply carries only what the policy releases.

The policy file is node config `site-policy`, else `site-policy.toml` in the institution's own folder
(client.release.site_home: the release log's folder in deployment, `sites-dir/institution-<i>/` in
simulation); a node without one keeps the defaults. Errors name the node config key, never the path:
they travel to the coordinator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import RecordDict

from client.node_state import keep_queries_taken, queries_taken
from client.release import site_home, with_site_toml
from common.config import RunConfig
from common.errors import ConfigError
from common.messages import SoftLabelQuery
from common.node_config import NodeConfig
from common.site_policy import POLICY_FILE, SitePolicy

if TYPE_CHECKING:
    from client.privacy import Policy


def site_policy(cfg: RunConfig, node: NodeConfig) -> SitePolicy:
    """The institution's site policy, read from its file (the defaults when it has none)."""
    home = site_home(cfg, node)
    path = Path(node.site_policy).expanduser() if node.site_policy else (home / POLICY_FILE if home else None)
    if path is None or not path.is_file():
        if node.site_policy:
            raise ConfigError("node config site-policy names no readable file on this node; fix the path, or drop "
                              "the key to use site-policy.toml in the institution's folder")
        return SitePolicy()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError("site-policy: this node cannot read its policy file; check its permissions") from None
    return SitePolicy.from_toml(text)


def admit_run(cfg: RunConfig, node: NodeConfig) -> SitePolicy:
    """Refuse a run whose mechanism the policy does not allow, or a run without one on a node with a budget."""
    policy = site_policy(cfg, node)
    policy.check_mechanism(cfg.privacy, budget(cfg, node, policy))
    return policy


def admit_query(state: RecordDict, run_id: int, cfg: RunConfig, policy: SitePolicy, query: SoftLabelQuery) -> None:
    """Refuse a soft-label query outside the policy (samples, queries this round, class counts); an admitted query
    counts toward this round's queries. Under secure aggregation the threshold was held against the policy when
    the node gave its shares, and pinned (client.secure)."""
    taken = queries_taken(state, run_id, query.round)
    policy.check_query(len(query.sample_ids), taken, query.want_class_counts, cfg.privacy)
    keep_queries_taken(state, run_id, query.round, taken + 1)


def budget(cfg: RunConfig, node: NodeConfig, policy: SitePolicy) -> float | None:
    """The node's budget: the smaller of the policy's max-epsilon and the node config's (in simulation, its
    site.toml's); None when neither sets one."""
    node_epsilon = with_site_toml(cfg, node).max_epsilon
    given = [e for e in (policy.max_epsilon, node_epsilon) if e is not None]
    return min(given) if given else None


def within_policy(privacy: Policy, policy: SitePolicy) -> Policy:
    """The mechanism's budget, tightened to the site policy's max-epsilon and delta where they are smaller."""
    changes: dict[str, Any] = {}
    if policy.max_epsilon is not None and policy.max_epsilon < privacy.max_epsilon:
        changes["max_epsilon"] = policy.max_epsilon
    if policy.delta is not None and policy.delta < privacy.delta:
        changes["delta"] = policy.delta
    return dataclasses.replace(privacy, **changes) if changes else privacy
