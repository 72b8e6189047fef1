"""What an institution computes for one soft-label query: train its teacher(s) a round, then label the public samples.

Without privacy: the teacher trains one more round on the private data and answers softmax(logits/T).
With `privacy = "dp-sgd"`: the same, with the round's training done by DP-SGD within the budget.
With `privacy = "pate"`: sub-teachers on disjoint shards vote, and the noisy votes are the answer.
Under privacy the budget is the tighter of the node's and its site policy's, and the loss on private
batches leaves only when the site policy allows it (else NaN). The counts a reply carries (num-examples,
class counts when asked) are what the site policy releases: exact, rounded, withheld, or noised once per
run and accounted in the same budget (the mechanism's noise is calibrated to leave room for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context

from client.enforce import within_policy
from client.node_state import pate_rounds
from client.site import Site
from client.teacher import restore_teacher, save_teacher, train_round
from common.config import RunConfig
from common.messages import SoftLabelQuery
from common.models.registry import count_parameters
from common.models.training import accuracy, predict_probs
from common.node_config import NodeConfig
from common.site_policy import SitePolicy
from common.timing import PhaseClock

# client.privacy (and with it dp-accounting and SciPy) is imported only where a run spends privacy: a deployed
# node starts a process per message, and importing them cost it seconds every time.
if TYPE_CHECKING:
    from client.privacy import Policy


@dataclass(frozen=True)
class Answer:
    probs: np.ndarray  # (m, C) float32, rows on the simplex
    figures: dict[str, Any]  # train_loss, teacher_accuracy, teacher_params, teacher_rounds
    privacy: dict[str, Any] | None  # the attestation's privacy statement; None without a mechanism
    num_examples: int = 0  # as released (client.answer._counts)
    class_counts: np.ndarray | None = None  # (C,) int64 as released, only when the query asked


def answer_query(context: Context, cfg: RunConfig, node: NodeConfig, site: Site, query: SoftLabelQuery,
                 site_policy: SitePolicy | None = None, clock: PhaseClock | None = None) -> Answer:
    """Train, then answer `query`; the caller has admitted it (client.enforce). `clock` times the phases
    (load, train, label: common.messages.timings)."""
    site_policy = site_policy or SitePolicy()
    clock = clock or PhaseClock()
    budget = _budget(cfg, node, site_policy)
    noised = site_policy.count_mode(cfg.privacy) == "noised"
    also = _count_events(site_policy.count_noise) if noised and budget is not None else ()
    count, class_counts, counts_before = _counts(context, cfg, site, query, site_policy, budget)
    if budget is not None and cfg.privacy == "pate":
        with clock.phase("train"):  # the sub-teachers train and vote in one step
            answer = _pate_answer(context, cfg, site, query, budget, also)
    else:
        answer = _teacher_answer(context, cfg, site, query, budget, also, clock)
    privacy = answer.privacy
    if privacy is not None and counts_before is not None:  # this release also spent the noised counts
        privacy = {**privacy, "epsilon": max(0.0, privacy["epsilon_total"] - counts_before)}
    if privacy is not None and noised:
        privacy = {**privacy, "parameters": {**privacy["parameters"], "count_noise": site_policy.count_noise}}
    figures = dict(answer.figures)
    if not site_policy.sends_training_loss(cfg.privacy):
        figures["train_loss"] = float("nan")
    if not site_policy.sends_teacher_accuracy(cfg.privacy):
        figures["teacher_accuracy"] = -1.0
    return Answer(answer.probs, figures, privacy, count, class_counts)


def _teacher_answer(context: Context, cfg: RunConfig, site: Site, query: SoftLabelQuery, budget: Policy | None,
                    also: tuple[dict[str, Any], ...], clock: PhaseClock) -> Answer:
    with clock.phase("load"):
        teacher, rounds_trained = restore_teacher(context.state, cfg, site)
    # A resumed run asks again for the round the server stopped in, after this teacher had trained for it:
    # answer with the teacher as it is, and train (under DP: spend) no second time for the same round.
    again = cfg.resume and rounds_trained >= query.round
    privacy: dict[str, Any] | None = None
    with clock.phase("train"):
        if budget is not None:
            from client.privacy import dpsgd_round

            loss, privacy = dpsgd_round(teacher, cfg, site, budget, context.run_id, query.round, rounds_trained,
                                        again=again, also=also)
        else:
            loss = float("nan") if again else train_round(teacher, cfg, site, rounds_trained)
    rounds = rounds_trained if again else rounds_trained + 1
    with clock.phase("load"):  # the teacher's state goes back where it came from
        save_teacher(context.state, teacher, cfg, site, rounds)
    with clock.phase("label"):
        probs = predict_probs(teacher, site.public.inputs[query.sample_ids], query.temperature)
    teacher_accuracy = accuracy(teacher, site.test.inputs, site.test.labels) if query.evaluate_teacher else -1.0
    return Answer(probs, _figures(loss, teacher_accuracy, count_parameters(teacher), rounds), privacy)


def _pate_answer(context: Context, cfg: RunConfig, site: Site, query: SoftLabelQuery, budget: Policy,
                 also: tuple[dict[str, Any], ...]) -> Answer:
    from client.privacy import pate_round

    probs, loss, teacher_accuracy, params, privacy = pate_round(
        context.state, cfg, site, budget, query.sample_ids, context.run_id, query.round, also)
    rounds = pate_rounds(context.state)
    return Answer(probs, _figures(loss, teacher_accuracy if query.evaluate_teacher else -1.0, params, rounds), privacy)


def _counts(context: Context, cfg: RunConfig, site: Site, query: SoftLabelQuery, site_policy: SitePolicy,
            budget: Policy | None) -> tuple[int, np.ndarray | None, float | None]:
    """(num-examples, class counts or None, epsilon before a noised release made now) as the policy releases
    them; with class counts, num-examples is their sum."""
    histogram = np.bincount(site.private.labels, minlength=site.private.num_classes).astype(np.int64)
    if site_policy.count_mode(cfg.privacy) == "noised":
        from client.privacy import noised_counts

        counts, before = noised_counts(context.state, context.run_id, query.round, histogram, site_policy.count_noise,
                                       budget)
        return int(counts.sum()), counts if query.want_class_counts else None, before
    if query.want_class_counts:
        return int(histogram.sum()), histogram, None
    return site_policy.released_count(len(site.private), cfg.privacy), None, None


def _budget(cfg: RunConfig, node: NodeConfig, site_policy: SitePolicy) -> Policy | None:
    """The budget this release may spend: the tighter of the node's and its site policy's; None without privacy."""
    if cfg.privacy == "none":
        return None
    from client.privacy import load_policy

    return within_policy(load_policy(cfg, node), site_policy)


def _count_events(count_noise: float) -> tuple[dict[str, Any], ...]:
    from client.privacy import count_event

    return (count_event(count_noise),)


def _figures(loss: float, teacher_accuracy: float, params: int, rounds: int) -> dict[str, Any]:
    return {"train_loss": loss, "teacher_accuracy": teacher_accuracy, "teacher_params": params, "teacher_rounds": rounds}
