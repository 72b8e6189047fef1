"""ClientApp: an institution answers `query.soft_labels` with its teacher's soft labels on the public set.

Only soft labels on public samples and counts leave the node: never weights, gradients or samples.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import numpy as np

from client.fedavg import fedavg_train
from client.release import load_identity, sign_and_log
from client.site import Site, load_site
from client.teacher import digest_round, restore_teacher, save_teacher, train_round
from common.config import RunConfig
from common.errors import FingerprintMismatch, MessageFormatError
from common.messages import DigestInstruction, DigestReply, SoftLabelQuery, SoftLabelReply
from common.models import count_parameters
from common.training import accuracy, predict_probs

app = ClientApp()


@app.query("soft_labels")
def soft_labels(msg: Message, context: Context) -> Message:
    """Train the teacher one more round, then answer with softmax(teacher(public) / T)."""
    cfg, site = _setup(context)
    query = SoftLabelQuery.from_record(msg.content)
    check_query(query, site.fingerprint, site.private.num_classes, len(site.public))

    teacher, rounds_trained = restore_teacher(context.state, cfg, site)
    loss = train_round(teacher, cfg, site, rounds_trained)
    save_teacher(context.state, teacher, cfg, site, rounds_trained + 1)

    probs = predict_probs(teacher, site.public.images[query.sample_ids], query.temperature)
    teacher_accuracy = (
        accuracy(teacher, site.test.images, site.test.labels) if query.evaluate_teacher else -1.0
    )
    reply = SoftLabelReply(
        round=query.round, fingerprint=site.fingerprint, codec=query.codec, soft_labels=probs,
        num_examples=len(site.private), train_loss=loss, teacher_accuracy=teacher_accuracy,
        teacher_params=count_parameters(teacher), teacher_rounds=rounds_trained + 1,
        class_counts=_class_counts(site) if query.want_class_counts else None, top_k=query.top_k,
    )
    record = reply.to_record()
    identity = load_identity(cfg, context.node_config)
    if identity is not None:
        record = sign_and_log(
            identity, record, msg.content, run_id=context.run_id, round_=query.round, node_id=context.node_id,
            fingerprint=site.fingerprint, with_counts=query.want_class_counts, with_accuracy=query.evaluate_teacher,
        )
    return Message(record, reply_to=msg)


@app.train("digest")
def digest(msg: Message, context: Context) -> Message:
    """FedMD: the teacher learns toward the server's consensus on the public set, then revisits its data."""
    cfg, site = _setup(context)
    instruction = DigestInstruction.from_record(msg.content)
    check_public(instruction.fingerprint, instruction.consensus.shape[1], instruction.sample_ids,
                 site.fingerprint, site.private.num_classes, len(site.public))
    teacher, rounds_trained = restore_teacher(context.state, cfg, site)
    digest_loss, revisit_loss = digest_round(teacher, cfg, site, instruction, rounds_trained)
    save_teacher(context.state, teacher, cfg, site, rounds_trained)
    record = DigestReply(instruction.round, digest_loss, revisit_loss).to_record()
    identity = load_identity(cfg, context.node_config)
    if identity is not None:
        record = sign_and_log(identity, record, msg.content, run_id=context.run_id, round_=instruction.round,
                              node_id=context.node_id, fingerprint=site.fingerprint, digest=True)
    return Message(record, reply_to=msg)


@app.train()
def fedavg(msg: Message, context: Context) -> Message:
    """The FedAvg baseline (method = "fedavg"): train the global student weights on private data."""
    cfg, site = _setup(context)
    if cfg.method != "fedavg":
        raise MessageFormatError(f"this run's method is {cfg.method!r}: nodes send weights only when method is 'fedavg'")
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
    return Message(fedavg_train(msg.content, cfg, site, server_round), reply_to=msg)


def _setup(context: Context) -> tuple[RunConfig, Site]:
    cfg = RunConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.torch_threads)
    return cfg, load_site(cfg, context.node_config, context.state)


def _class_counts(site: Site) -> np.ndarray:
    return np.bincount(site.private.labels, minlength=site.private.num_classes).astype(np.int64)


def check_query(query: SoftLabelQuery, fingerprint: str, num_classes: int, public_size: int) -> None:
    """Refuse a query about a public set or label space this node does not hold."""
    check_public(query.fingerprint, query.num_classes, query.sample_ids, fingerprint, num_classes, public_size)


def check_public(
    server_fingerprint: str, server_classes: int, sample_ids: np.ndarray, fingerprint: str, num_classes: int, public_size: int
) -> None:
    if server_fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"public set fingerprint mismatch: server has {server_fingerprint[:12]}..., this node has "
            f"{fingerprint[:12]}...; check this node's data-dir, public-size and seed"
        )
    if server_classes != num_classes:
        raise MessageFormatError(
            f"label space mismatch: server expects {server_classes} classes, this node has {num_classes}"
        )
    if len(sample_ids) and (sample_ids.min() < 0 or sample_ids.max() >= public_size):
        raise MessageFormatError(f"sample-ids: indices must lie in [0, {public_size}) of the public set")
