"""The institution's teacher: restored from node state, trained a little more each round, saved back."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from client.site import Site
from common.config import RunConfig
from common.losses import distillation_loss
from common.messages import DigestInstruction
from common.models import build_model, images_to_tensor
from common.training import train_epochs, train_supervised

TEACHER_KEY = "teacher"
TEACHER_META_KEY = "teacher-meta"


def restore_teacher(state: RecordDict, cfg: RunConfig, site: Site) -> tuple[nn.Module, int]:
    """The node's teacher and the number of rounds it has trained; a fresh one on first use."""
    name = cfg.teacher_model_for(site.partition_id)
    image_size = tuple(site.private.images.shape[1:])
    model = build_model(name, site.private.num_classes, image_size, seed=cfg.seed + site.partition_id)
    meta = state.get(TEACHER_META_KEY)
    if isinstance(meta, ConfigRecord) and meta.get("model") == name and TEACHER_KEY in state:
        model.load_state_dict(state[TEACHER_KEY].to_torch_state_dict())
        return model, int(meta["rounds-trained"])
    return model, 0


def train_round(model: nn.Module, cfg: RunConfig, site: Site, rounds_trained: int) -> float:
    """One round of local training on the private partition; returns the last epoch's mean loss."""
    return train_supervised(
        model, site.private.images, site.private.labels,
        epochs=cfg.local_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
        seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds_trained,
    )


def save_teacher(state: RecordDict, model: nn.Module, cfg: RunConfig, site: Site, rounds_trained: int) -> None:
    """Keep the teacher in node state so the next round continues training it."""
    state[TEACHER_KEY] = ArrayRecord(model.state_dict())
    state[TEACHER_META_KEY] = ConfigRecord({
        "model": cfg.teacher_model_for(site.partition_id), "rounds-trained": rounds_trained,
    })


def digest_round(model: nn.Module, cfg: RunConfig, site: Site, digest: DigestInstruction, rounds_trained: int) -> tuple[float, float]:
    """FedMD (Li & Wang, 2019): learn toward the consensus on the public samples, then revisit the
    private data. Returns the last epoch's loss of each step (nan when a step has 0 epochs)."""
    x = images_to_tensor(site.public.images[digest.sample_ids])
    targets = torch.from_numpy(digest.consensus)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.teacher_lr)
    digest_loss = train_epochs(
        model, optimizer, len(targets),
        lambda idx: distillation_loss(model(x[idx]), targets[idx], digest.temperature),
        epochs=digest.digest_epochs, batch_size=cfg.teacher_batch_size,
        seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds_trained + 500_000,
    )
    revisit_loss = train_supervised(
        model, site.private.images, site.private.labels,
        epochs=digest.revisit_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
        seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds_trained + 700_000,
    )
    return digest_loss, revisit_loss
