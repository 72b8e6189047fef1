"""The FedAvg baseline's client step: train the shared student architecture on private data.

Unlike distillation, this sends model weights back to the server: it exists only to compare against.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from client.site import Site
from common.config import RunConfig
from common.errors import MessageFormatError
from common.messages import TrainInstruction, TrainReply
from common.models.inputs import input_shape
from common.models.registry import build_model
from common.models.training import train_supervised


def fedavg_train(instruction: TrainInstruction, cfg: RunConfig, site: Site) -> RecordDict:
    """Load the global weights, train `fedavg-local-epochs` (at least `local-min-steps` steps) at `fedavg-lr` in
    batches of `fedavg-batch-size`, return weights and counts."""
    server_round = instruction.server_round
    model = build_model(cfg.student_model, site.private.num_classes, input_shape(site.private.inputs))
    try:
        model.load_state_dict(instruction.weights.to_torch_state_dict())
    except (RuntimeError, TypeError, ValueError) as error:
        raise MessageFormatError(f"fedavg: global weights do not fit {cfg.student_model}: {error}") from None
    loss = train_supervised(
        model, site.private.inputs, site.private.labels, epochs=cfg.fedavg_epochs_for(len(site.private)), lr=cfg.fedavg_lr,
        batch_size=cfg.fedavg_batch_size, seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + server_round,
    )
    return TrainReply(weights=ArrayRecord(model.state_dict()), num_examples=len(site.private), train_loss=float(loss)).to_record()
