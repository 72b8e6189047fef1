"""What an institution computes for one soft-label query: train its teacher(s) a round, then label the public samples.

Without privacy: the teacher trains one more round on the private data and answers softmax(logits/T).
With `privacy = "dp-sgd"`: the same, with the round's training done by DP-SGD within the budget.
With `privacy = "pate"`: sub-teachers on disjoint shards vote, and the noisy votes are the answer.
Under privacy the budget is the tighter of the node's and its site policy's, and the loss on private
batches leaves only when the site policy allows it (else NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context

from client.enforce import within_policy
from client.node_state import pate_rounds
from client.privacy import dpsgd_round, load_policy, pate_round
from client.site import Site
from client.teacher import restore_teacher, save_teacher, train_round
from common.config import RunConfig
from common.messages import SoftLabelQuery
from common.models.registry import count_parameters
from common.models.training import accuracy, predict_probs
from common.node_config import NodeConfig
from common.site_policy import SitePolicy


@dataclass(frozen=True)
class Answer:
    probs: np.ndarray  # (m, C) float32, rows on the simplex
    figures: dict[str, Any]  # train_loss, teacher_accuracy, teacher_params, teacher_rounds
    privacy: dict[str, Any] | None  # the attestation's privacy statement; None without a mechanism


def answer_query(context: Context, cfg: RunConfig, node: NodeConfig, site: Site, query: SoftLabelQuery,
                 site_policy: SitePolicy | None = None) -> Answer:
    """Train, then answer `query`; the caller has admitted it (client.enforce)."""
    site_policy = site_policy or SitePolicy()
    if cfg.privacy == "pate":
        return _released(_pate_answer(context, cfg, node, site, query, site_policy), cfg, site_policy)
    teacher, rounds_trained = restore_teacher(context.state, cfg, site)
    # A resumed run asks again for the round the server stopped in, after this teacher had trained for it:
    # answer with the teacher as it is, and train (under DP: spend) no second time for the same round.
    again = cfg.resume and rounds_trained >= query.round
    privacy: dict[str, Any] | None = None
    if cfg.privacy == "dp-sgd":
        policy = within_policy(load_policy(cfg, node), site_policy)
        loss, privacy = dpsgd_round(teacher, cfg, site, policy, context.run_id, query.round, rounds_trained, again=again)
    else:
        loss = float("nan") if again else train_round(teacher, cfg, site, rounds_trained)
    rounds = rounds_trained if again else rounds_trained + 1
    save_teacher(context.state, teacher, cfg, site, rounds)
    probs = predict_probs(teacher, site.public.inputs[query.sample_ids], query.temperature)
    teacher_accuracy = accuracy(teacher, site.test.inputs, site.test.labels) if query.evaluate_teacher else -1.0
    return _released(Answer(probs, _figures(loss, teacher_accuracy, count_parameters(teacher), rounds), privacy),
                     cfg, site_policy)


def _pate_answer(context: Context, cfg: RunConfig, node: NodeConfig, site: Site, query: SoftLabelQuery,
                 site_policy: SitePolicy) -> Answer:
    policy = within_policy(load_policy(cfg, node), site_policy)
    probs, loss, teacher_accuracy, params, privacy = pate_round(
        context.state, cfg, site, policy, query.sample_ids, context.run_id, query.round)
    rounds = pate_rounds(context.state)
    return Answer(probs, _figures(loss, teacher_accuracy if query.evaluate_teacher else -1.0, params, rounds), privacy)


def _released(answer: Answer, cfg: RunConfig, site_policy: SitePolicy) -> Answer:
    """The answer as it may leave: the training loss withheld (NaN) unless the site policy sends it."""
    if site_policy.sends_training_loss(cfg.privacy):
        return answer
    return Answer(answer.probs, {**answer.figures, "train_loss": float("nan")}, answer.privacy)


def _figures(loss: float, teacher_accuracy: float, params: int, rounds: int) -> dict[str, Any]:
    return {"train_loss": loss, "teacher_accuracy": teacher_accuracy, "teacher_params": params, "teacher_rounds": rounds}
