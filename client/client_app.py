"""ClientApp: an institution answers `query.soft_labels` with its teacher's soft labels on the public set.

Only soft labels on public samples and counts leave the node (masked, under secure aggregation):
never weights, gradients or samples. Every reply is signed and logged when the node has an identity.
Each message is first held against the institution's site policy (client.enforce): what it refuses is
refused before any training, and under privacy the counts and losses leave only as the policy says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.answer import answer_query
from client.enforce import admit_query, admit_run, site_policy
from client.fedavg import fedavg_train
from client.release import load_identity, released_statement, sign_and_log
from client.scrub import local_detail_kept
from client.secure import (
    admit_secure_query,
    masked_vector,
    node_credentials,
    open_inbox,
    round_keys,
    share_bundles,
    sign_survivors,
    unmask_shares,
)
from client.site import Site, load_site
from client.teacher import attach_store, digest_round, restore_teacher, save_teacher, teacher_store
from client.witness import pinned_key, witness, witness_first
from common.audit import kinds
from common.config import RunConfig
from common.errors import FingerprintMismatch, MessageFormatError
from common.messages import (
    CONSISTENCY_TYPE,
    DIGEST_TYPE,
    INBOX_TYPE,
    SETUP_TYPE,
    SHARES_TYPE,
    SOFT_LABELS_TYPE,
    UNMASK_TYPE,
    WITNESS_TYPE,
    DigestInstruction,
    DigestReply,
    MaskedReply,
    NodeTimings,
    SecAggConsistency,
    SecAggInbox,
    SecAggRoster,
    SecAggSetup,
    SecAggUnmask,
    SoftLabelQuery,
    SoftLabelReply,
    TrainInstruction,
    WitnessCall,
    attach_cosignature,
    attach_timings,
    read_witness_request,
)
from common.node_config import NodeConfig
from common.timing import PhaseClock

app = ClientApp()


@app.query("soft_labels")
@local_detail_kept
@witness_first
def soft_labels(msg: Message, context: Context) -> Message:
    """Train the teacher one more round, then answer with softmax(teacher(public) / T) (or PATE's noisy
    votes) — masked, under secure aggregation; with the answer's timings where the site policy sends them."""
    clock = PhaseClock()
    with clock.phase("load"):
        cfg, node, site = _setup(context)
    query = SoftLabelQuery.from_record(msg.content)
    check_query(query, site.fingerprint, site.private.num_classes, len(site.public))
    shared = SecAggRoster.from_record(msg.content)
    admit_secure_query(context.state, context.run_id, context.node_id, query.round, shared, cfg.secure_aggregation)
    policy = site_policy(cfg, node)
    admit_query(context.state, context.run_id, cfg, policy, query)
    answer = answer_query(context, cfg, node, site, query, policy, clock)
    probs, figures = answer.probs, answer.figures
    released = policy.releases(cfg.privacy, class_counts=query.want_class_counts, teacher_accuracy=query.evaluate_teacher)
    privacy = released_statement(answer.privacy, released)
    count = answer.num_examples
    timed = policy.sends_timings(cfg.privacy, class_counts=query.want_class_counts)
    if shared is not None:
        weight = float(count) if shared.weighted else 1.0
        masked = masked_vector(context.state, context.run_id, context.node_id, shared, probs, weight)
        record = MaskedReply(round=query.round, fingerprint=site.fingerprint, masked=masked, **figures).to_record()
        with clock.phase("sign"):
            sent = _reply(record, msg, context, cfg, node, site, query.round, kind="secagg-masked", privacy=privacy,
                          with_timings=timed)
    else:
        reply = SoftLabelReply(
            round=query.round, fingerprint=site.fingerprint, codec=query.codec, soft_labels=probs,
            num_examples=count, class_counts=answer.class_counts,
            top_k=query.top_k, **figures,
        )
        with clock.phase("sign"):
            sent = _reply(reply.to_record(), msg, context, cfg, node, site, query.round, privacy=privacy,
                          with_counts=query.want_class_counts, with_accuracy=query.evaluate_teacher, with_timings=timed)
    return _timed(sent, clock) if timed else sent


@app.query("secagg_setup")
@local_detail_kept
@witness_first
def secagg_setup(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: this round's public keys, signed."""
    cfg, node, site = _setup(context)
    setup = SecAggSetup.from_record(msg.content)
    keys = round_keys(context.state, context.run_id, context.node_id, node_credentials(cfg, node), setup.round)
    return _reply(keys.to_record(), msg, context, cfg, node, site, setup.round, kind="secagg-keys")


@app.query("secagg_shares")
@local_detail_kept
@witness_first
def secagg_shares(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 2: check and pin the roster, then sealed, signed shares of this round's secrets."""
    cfg, node, site = _setup(context)
    request = _roster(msg)
    site_policy(cfg, node).check_threshold(request.threshold, len(request.roster))  # before any share leaves
    bundles = share_bundles(context.state, context.run_id, context.node_id, node_credentials(cfg, node), request)
    return _reply(bundles.to_record(), msg, context, cfg, node, site, request.round, kind="secagg-bundles")


@app.query("secagg_inbox")
@local_detail_kept
@witness_first
def secagg_inbox(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 3: open the bundles sealed for this node; name the senders whose bundles do not open."""
    cfg, node, site = _setup(context)
    request = SecAggInbox.from_record(msg.content)
    complaints = open_inbox(context.state, context.run_id, context.node_id, node_credentials(cfg, node), request)
    return _reply(complaints.to_record(), msg, context, cfg, node, site, request.round, kind="secagg-complaints")


@app.query("secagg_consistency")
@local_detail_kept
@witness_first
def secagg_consistency(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 5: sign the survivor set, once per round."""
    cfg, node, site = _setup(context)
    request = SecAggConsistency.from_record(msg.content)
    signature = sign_survivors(context.state, context.run_id, context.node_id, node_credentials(cfg, node), request)
    return _reply(signature.to_record(), msg, context, cfg, node, site, request.round, kind="secagg-signature")


@app.query("secagg_unmask")
@local_detail_kept
@witness_first
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 6: the shares that open the sum (never both secrets of one institution), once a
    threshold of survivors signed the survivor set this node signed."""
    cfg, node, site = _setup(context)
    request = SecAggUnmask.from_record(msg.content)
    shares = unmask_shares(context.state, context.run_id, context.node_id, node_credentials(cfg, node), request)
    return _reply(shares.to_record(), msg, context, cfg, node, site, request.round, kind="secagg-shares")


def _roster(msg: Message) -> SecAggRoster:
    roster = SecAggRoster.from_record(msg.content)
    if roster is None:
        raise MessageFormatError("secure aggregation: the message carries no roster (records 'secagg', 'secagg-roster')")
    return roster


def _reply(
    record: RecordDict, msg: Message, context: Context, cfg: RunConfig, node: NodeConfig, site: Site, round_: int,
    **release: Any,
) -> Message:
    """Cosign the ledger head the query asked to witness, sign and log what leaves the node (when it has an
    identity), then send it."""
    identity = load_identity(cfg, node)
    request = read_witness_request(msg.content)
    if identity is not None:
        if request is not None:
            record = attach_cosignature(record, witness(request, identity, pinned_key(node)))
        record = sign_and_log(identity, record, msg.content, run_id=context.run_id, round_=round_,
                              node_id=context.node_id, fingerprint=site.fingerprint, **release)
    return Message(record, reply_to=msg)


def _timed(reply: Message, clock: PhaseClock) -> Message:
    """The signed reply with the answer's timings (outside the attested payload: common.messages.timings)."""
    attach_timings(reply.content, NodeTimings.of(clock.seconds, clock.elapsed()))
    return reply


@app.query("witness")
@local_detail_kept
@witness_first
def witness_head(msg: Message, context: Context) -> Message:
    """After the run's closing entry: cosign the ledger's final head (the reply carries nothing else)."""
    cfg, node, site = _setup(context)
    call = WitnessCall.from_record(msg.content)
    return _reply(RecordDict(), msg, context, cfg, node, site, call.round, kind=kinds.WITNESS_PHASE)


@app.train("digest")
@local_detail_kept
@witness_first
def digest(msg: Message, context: Context) -> Message:
    """FedMD: the teacher learns toward the server's consensus on the public set, then revisits its data."""
    cfg, node, site = _setup(context)
    instruction = DigestInstruction.from_record(msg.content)
    check_public(instruction.fingerprint, instruction.consensus.shape[1], instruction.sample_ids,
                 site.fingerprint, site.private.num_classes, len(site.public))
    site_policy(cfg, node).check_digest(cfg.privacy, instruction.digest_epochs, instruction.revisit_epochs)
    teacher, rounds_trained = restore_teacher(context.state, cfg, site)
    digest_loss, revisit_loss = digest_round(teacher, cfg, site, instruction, rounds_trained)
    save_teacher(context.state, teacher, cfg, site, rounds_trained)
    record = DigestReply(instruction.round, digest_loss, revisit_loss).to_record()
    return _reply(record, msg, context, cfg, node, site, instruction.round, digest=True)


@app.train()
@local_detail_kept
@witness_first
def fedavg(msg: Message, context: Context) -> Message:
    """The FedAvg baseline (method = "fedavg"): train the global student weights on private data; the trained
    weights leave signed and logged, like every other release."""
    clock = PhaseClock()
    with clock.phase("load"):
        cfg, node, site = _setup(context)
    if cfg.method != "fedavg":
        raise MessageFormatError(f"this run's method is {cfg.method!r}: nodes send weights only when method is 'fedavg'")
    instruction = TrainInstruction.from_record(msg.content)
    with clock.phase("train"):
        record = fedavg_train(instruction, cfg, site)
    with clock.phase("sign"):
        sent = _reply(record, msg, context, cfg, node, site, instruction.server_round, kind=kinds.FEDAVG_PAYLOAD,
                      with_timings=True)
    return _timed(sent, clock)  # FedAvg sends num-examples exactly: the timings reveal no more of the data's size


HANDLERS = {  # each message type this app answers -> its handler, as Flower dispatches them (tests drive them so)
    SOFT_LABELS_TYPE: soft_labels, SETUP_TYPE: secagg_setup, SHARES_TYPE: secagg_shares, INBOX_TYPE: secagg_inbox,
    CONSISTENCY_TYPE: secagg_consistency, UNMASK_TYPE: secagg_unmask, WITNESS_TYPE: witness_head, DIGEST_TYPE: digest,
    "train": fedavg,
}


def _setup(context: Context) -> tuple[RunConfig, NodeConfig, Site]:
    """The run's config and this node's, parsed once per message, and what the institution holds."""
    cfg = RunConfig.from_run_config(context.run_config)
    node = NodeConfig.from_node_config(context.node_config)
    admit_run(cfg, node)  # the mechanism, before any private data is read
    torch.set_num_threads(cfg.torch_threads)
    site = load_site(cfg, node, context.state)
    attach_store(context.state, teacher_store(cfg, site, node, context.run_id))  # survives a restart
    return cfg, node, site


def check_query(query: SoftLabelQuery, fingerprint: str, num_classes: int, public_size: int) -> None:
    """Refuse a query about a public set or label space this node does not hold."""
    check_public(query.fingerprint, query.num_classes, query.sample_ids, fingerprint, num_classes, public_size)


def check_public(
    server_fingerprint: str, server_classes: int, sample_ids: np.ndarray, fingerprint: str, num_classes: int, public_size: int
) -> None:
    if server_fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"public set fingerprint mismatch: server has {server_fingerprint[:12]}..., this node has "
            f"{fingerprint[:12]}...; check this node's data-dir, public-size and seed, or its node config public-dir "
            "if its copy of the public set lives elsewhere"
        )
    if server_classes != num_classes:
        raise MessageFormatError(
            f"label space mismatch: server expects {server_classes} classes, this node has {num_classes}; "
            f"the node must run the server's dataset, with labels 0..{server_classes - 1}"
        )
    if len(sample_ids) and (sample_ids.min() < 0 or sample_ids.max() >= public_size):
        raise MessageFormatError(f"sample-ids: indices must lie in [0, {public_size}) of the public set")
