"""The institution's privacy: its own budget and ledger, and the two mechanisms that spend it.

The budget (`max-epsilon` at `delta`) is the institution's, from its node config (simulation: its
site folder's `site.toml`); the server never sets it. Before anything that spends privacy, the
institution computes what the spend would bring its total to and refuses (PrivacyBudgetExceeded,
an error reply the server records) when that exceeds its budget. Check, release and record run as one
step under the ledger's exclusive lock (`PrivacyLedger.reserve`), so two runs on one node cannot
overspend. Noise is drawn from the operating system's entropy, never from the run's public seed, so no
other party can reproduce it. Errors name epsilons and counts, never the ledger's path: that is logged
on the node only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common.logger import log
from torch import nn

from client.node_state import (
    keep_noised_counts,
    keep_pate_rounds,
    keep_pate_teacher,
    pate_rounds,
    pate_teacher_weights,
    released_noised_counts,
)
from client.release import simulated_institution, with_site_toml
from client.site import Site
from common.config import RunConfig
from common.errors import ConfigError, FedstillError
from common.models.inputs import input_shape
from common.models.registry import build_model, count_parameters
from common.models.training import predict_logits, train_supervised
from common.node_config import NodeConfig
from common.privacy.accounting import ACCOUNTANT, calibrate_dpsgd, calibrate_gnmax
from common.privacy.budget import PrivacyLedger
from common.privacy.dpsgd import planned_event, train_dpsgd
from common.privacy.pate import gnmax_event, gnmax_soft_labels, os_entropy_rng, shard_indices, vote_histograms

LEDGER_FILE = "privacy-ledger.json"
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class Policy:
    """An institution's privacy budget and where its privacy ledger lives."""

    max_epsilon: float
    delta: float
    ledger_path: Path

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self.ledger_path, self.max_epsilon, self.delta)


def load_policy(cfg: RunConfig, node: NodeConfig) -> Policy:
    """The node's budget: node config `max-epsilon`, `delta`, `privacy-ledger`; in simulation, its site.toml
    fills what the node config leaves unset."""
    node = with_site_toml(cfg, node)
    folder = Path(cfg.sites_dir) / simulated_institution(node.partition_id) if cfg.sites_dir and node.partition_id is not None else None
    ledger = node.privacy_ledger or (folder / LEDGER_FILE if folder else None)
    if ledger is None:
        raise ConfigError("privacy needs the institution's own privacy ledger: set node config "
                          "privacy-ledger=\"/path/privacy-ledger.json\" (fedstill simulate sets one per site)")
    max_epsilon = math.inf if node.max_epsilon is None else node.max_epsilon
    delta = DEFAULT_DELTA if node.delta is None else node.delta
    return Policy(max_epsilon, delta, Path(str(ledger)).expanduser())


def statement(mechanism: str, parameters: dict[str, Any], before: float, after: float, delta: float) -> dict[str, Any]:
    """The `privacy` part of a release's attestation."""
    return {"mechanism": mechanism, "parameters": parameters, "epsilon": max(0.0, after - before),
            "epsilon_total": after, "delta": delta, "accountant": f"dp-accounting {ACCOUNTANT}"}


def count_event(noise: float) -> dict[str, Any]:
    """The privacy event of one release of noised counts (the class histogram; L2 sensitivity 1)."""
    return {"mechanism": "gaussian", "noise_multiplier": float(noise), "releases": 1}


def noised_counts(state: RecordDict, run_id: int, round_: int, histogram: np.ndarray, noise: float,
                  policy: Policy | None) -> tuple[np.ndarray, float | None]:
    """The class counts as site policy `counts = "noised"` releases them: the histogram plus N(0, noise^2) per
    class (OS entropy), rounded and clipped at 0 (post-processing), released once per run and then reused.
    Under a mechanism (`policy` given) the release is checked, made and recorded under the ledger's lock;
    without one (privacy "none") it is noised but not accounted. Returns the counts and, when this call
    released them under a mechanism, the epsilon spent before (else None)."""
    kept = released_noised_counts(state, run_id)
    if kept is not None and kept.shape == histogram.shape:
        return kept, None
    before = None
    if policy is None:
        counts = _noised(histogram, noise)
    else:
        what = f"round {round_}: class counts with Gaussian noise (std {noise:g})"
        with _ledger_path_logged(policy), policy.ledger().reserve([count_event(noise)], what, str(run_id), round_) as spend:
            counts = _noised(histogram, noise)
        before = spend.before
    keep_noised_counts(state, run_id, counts)
    return counts, before


def _noised(histogram: np.ndarray, noise: float) -> np.ndarray:
    noisy = histogram + os_entropy_rng().normal(0.0, noise, size=histogram.shape)
    counts = np.maximum(np.rint(noisy), 0).astype(np.int64)
    if counts.sum() == 0:  # num-examples must be >= 1: the likeliest class gets one (post-processing)
        counts[int(np.argmax(noisy))] = 1
    return counts


def dpsgd_round(teacher: nn.Module, cfg: RunConfig, site: Site, policy: Policy, run_id: int, round_: int,
                rounds_trained: int, again: bool = False, also: tuple[dict[str, Any], ...] = ()) -> tuple[float, dict[str, Any]]:
    """Mechanism 1: one round of DP-SGD on the private data, within the budget; returns (loss, statement).

    The noise multiplier is `dp-noise-multiplier`, or (when 0) the one that spends exactly the budget
    over the run's planned rounds and the run's other releases `also` (noised counts). When the budget
    cannot pay for another round the teacher stops training: what it releases after that is
    post-processing of DP weights and costs nothing. With
    `again` (a resumed run asks for a round this teacher already trained for) nothing is trained or
    spent either: the statement says `reused`.
    """
    n = len(site.private)
    epochs = cfg.local_epochs_for(n)  # the same epochs planned (and accounted) as trained
    per_round = planned_event(n, cfg.teacher_batch_size, epochs, 1.0)
    z = cfg.dp_noise_multiplier or _calibrated_z(policy, per_round, cfg.num_server_rounds, also)
    event = {**per_round, "noise_multiplier": z}
    parameters = {"noise_multiplier": z, "max_grad_norm": cfg.dp_max_grad_norm, "sample_rate": event["sample_rate"],
                  "steps_per_round": event["steps"], "budget": _budget(policy)}
    with _ledger_path_logged(policy):
        ledger = policy.ledger()
        if again:
            before = ledger.spent()
            return float("nan"), statement("dp-sgd", {**parameters, "reused": True}, before, before, policy.delta)
        # check -> train -> record under the ledger's lock; nothing trained yet: refuse, else freeze the teacher
        with ledger.reserve([event], f"round {round_}: DP-SGD training", str(run_id), round_,
                            refuse=rounds_trained == 0) as spend:
            if not spend.granted:
                frozen = {**parameters, "frozen": True}
                return float("nan"), statement("dp-sgd", frozen, spend.before, spend.before, policy.delta)
            loss, done = train_dpsgd(teacher, site.private.inputs, site.private.labels, epochs=epochs,
                                     lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size, noise_multiplier=z,
                                     max_grad_norm=cfg.dp_max_grad_norm)  # no seed: noise from OS entropy
            spend.events = [done]
    return loss, statement("dp-sgd", parameters, spend.before, spend.after, policy.delta)


@contextmanager
def _ledger_path_logged(policy: Policy) -> Iterator[None]:
    """Errors on the privacy path go to the server without the ledger's path; log it here, on the node."""
    try:
        yield
    except FedstillError as error:
        log(WARNING, "privacy ledger %s: %s: %s", policy.ledger_path, type(error).__name__, error)
        raise


def _budget(policy: Policy) -> float | None:
    """The budget as an attestation states it: None for an institution without one."""
    return None if math.isinf(policy.max_epsilon) else policy.max_epsilon


def _calibrated_z(policy: Policy, per_round: dict[str, Any], rounds: int, also: tuple[dict[str, Any], ...]) -> float:
    if math.isinf(policy.max_epsilon):
        raise ConfigError("dp-noise-multiplier = 0 asks to calibrate the noise to this institution's budget, "
                          "but it has none: set max-epsilon in its node config, or set dp-noise-multiplier")
    return calibrate_dpsgd(policy.max_epsilon, policy.delta, per_round["sample_rate"], per_round["steps"] * rounds,
                           also=also)


def pate_round(state: RecordDict, cfg: RunConfig, site: Site, policy: Policy, sample_ids: np.ndarray,
               run_id: int, round_: int, also: tuple[dict[str, Any], ...] = ()) -> tuple[np.ndarray, float, float, int, dict[str, Any]]:
    """Mechanism 2: PATE inside the institution. Sub-teachers on disjoint shards train a round, vote on
    the queried public samples, and the institution releases GNMax-noised vote histograms as soft labels.
    Returns (soft labels, loss, ensemble test accuracy, parameters of all sub-teachers, statement)."""
    sigma = cfg.pate_sigma or _calibrated_sigma(policy, len(sample_ids), cfg.num_server_rounds, also)
    event = gnmax_event(sigma, len(sample_ids))
    what = f"round {round_}: {len(sample_ids)} PATE answers"
    with _ledger_path_logged(policy), policy.ledger().reserve([event], what, str(run_id), round_) as spend:
        teachers, losses = _pate_teachers(state, cfg, site)  # refused above before any work
        votes = vote_histograms(_predictions(teachers, site.public.inputs[sample_ids]), site.private.num_classes)
        probs = gnmax_soft_labels(votes, sigma, os_entropy_rng())
    before, after = spend.before, spend.after
    test_votes = vote_histograms(_predictions(teachers, site.test.inputs), site.private.num_classes)
    accuracy = float((test_votes.argmax(axis=1) == site.test.labels).mean())
    parameters = {"teachers": len(teachers), "sigma": sigma, "l2_sensitivity": event["l2_sensitivity"],
                  "queries": len(sample_ids), "budget": _budget(policy)}
    return probs, float(np.mean(losses)), accuracy, sum(count_parameters(t) for t in teachers), \
        statement("pate-gnmax", parameters, before, after, policy.delta)


def _calibrated_sigma(policy: Policy, queries: int, rounds: int, also: tuple[dict[str, Any], ...]) -> float:
    if math.isinf(policy.max_epsilon):
        raise ConfigError("pate-sigma = 0 asks to calibrate the noise to this institution's budget, but it has "
                          "none: set max-epsilon in its node config, or set pate-sigma")
    return calibrate_gnmax(policy.max_epsilon, policy.delta, queries * rounds, also=also)


def _pate_teachers(state: RecordDict, cfg: RunConfig, site: Site) -> tuple[list[nn.Module], list[float]]:
    """Restore the sub-teachers from node state, train each one more round on its own shard, save them."""
    name, size = cfg.teacher_model_for(site.partition_id), input_shape(site.private.inputs)
    shards = shard_indices(len(site.private), cfg.pate_teachers, cfg.seed + site.partition_id)
    rounds = pate_rounds(state, name)
    teachers, losses = [], []
    for k, shard in enumerate(shards):
        model = build_model(name, site.private.num_classes, size, seed=cfg.seed + 97 * site.partition_id + k,
                            public=site.public.inputs)
        weights = pate_teacher_weights(state, k) if rounds else None
        if weights is not None:
            model.load_state_dict(weights)
        losses.append(train_supervised(model, site.private.inputs[shard], site.private.labels[shard],
                                       epochs=cfg.local_epochs_for(len(shard)), lr=cfg.teacher_lr,
                                       batch_size=cfg.teacher_batch_size,
                                       seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds * 31 + k))
        keep_pate_teacher(state, k, model.state_dict())
        teachers.append(model)
    keep_pate_rounds(state, name, rounds + 1)
    return teachers, losses


def _predictions(teachers: list[nn.Module], images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.stack([predict_logits(t, images).argmax(dim=1).numpy() for t in teachers])  # (k, m)
