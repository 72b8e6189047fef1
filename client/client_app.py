"""ClientApp: an institution answers `query.soft_labels` with its teacher's soft labels on the public set.

Only soft labels on public samples and counts leave the node: never weights, gradients or samples.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.site import load_site
from client.teacher import restore_teacher, save_teacher, train_round
from common.config import RunConfig
from common.errors import FingerprintMismatch, MessageFormatError
from common.messages import SoftLabelQuery, SoftLabelReply
from common.models import count_parameters
from common.training import accuracy, predict_probs

app = ClientApp()


@app.query("soft_labels")
def soft_labels(msg: Message, context: Context) -> Message:
    """Train the teacher one more round, then answer with softmax(teacher(public) / T)."""
    cfg = RunConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.torch_threads)
    query = SoftLabelQuery.from_record(msg.content)
    site = load_site(cfg, context.node_config, context.state)
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
    )
    return Message(reply.to_record(), reply_to=msg)


def check_query(query: SoftLabelQuery, fingerprint: str, num_classes: int, public_size: int) -> None:
    """Refuse a query about a public set or label space this node does not hold."""
    if query.fingerprint != fingerprint:
        raise FingerprintMismatch(
            f"public set fingerprint mismatch: server has {query.fingerprint[:12]}..., this node has "
            f"{fingerprint[:12]}...; check this node's data-dir, public-size and seed"
        )
    if query.num_classes != num_classes:
        raise MessageFormatError(
            f"label space mismatch: server expects {query.num_classes} classes, this node has {num_classes}"
        )
    if len(query.sample_ids) and (query.sample_ids.min() < 0 or query.sample_ids.max() >= public_size):
        raise MessageFormatError(f"sample-ids: indices must lie in [0, {public_size}) of the public set")
