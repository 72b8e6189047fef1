"""The institution's teacher: restored from node state, trained a little more each round, saved back."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from client.site import Site
from common.config import RunConfig
from common.models import build_model
from common.training import train_supervised

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
