"""The institution's teacher: restored, trained a little more each round, saved back.

A node with a state folder (node config `state-dir`, by default the institution's own folder:
client.release.state_folder) keeps its teacher there only: node state holds its meta, not its weights,
which a deployed SuperNode would otherwise pass into every ClientApp process and back. The file,
`teacher-<digest>.safetensors`, is written atomically after every training step and holds in its header
the settings that make the teacher valid here (model, data, seed, privacy mechanism, run); it is read
only when they match, so a restarted node continues its teacher, and otherwise trains a fresh one and
says why. A plain simulation without a state folder keeps the teacher in node state, in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict
from flwr.common.logger import log
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from client.node_state import (
    StoreRecord,
    TeacherMeta,
    keep_store_record,
    keep_teacher,
    store_record,
    teacher_meta,
    teacher_weights,
)
from client.release import state_folder
from client.site import Site
from common.audit.canonical import canonical, sha256_hex, utc_now
from common.config import RunConfig
from common.errors import PolicyViolation
from common.files import PRIVATE, atomic_path, private_folder
from common.losses import distillation_loss
from common.messages import DigestInstruction
from common.models.inputs import input_shape, inputs_to_tensor
from common.models.registry import build_model
from common.models.scattering import fixed_stage
from common.models.training import train_epochs, train_supervised
from common.node_config import NodeConfig
from common.tasks.samples import Samples

HEADER_KEY = "fedstill-teacher"


@dataclass(frozen=True)
class TeacherStore:
    """Where a node keeps its teacher on disk, and the settings a saved teacher must have been trained for."""

    folder: Path
    settings: dict[str, Any]

    @property
    def digest(self) -> str:
        return sha256_hex(canonical(self.settings))

    @property
    def path(self) -> Path:
        return self.folder / f"teacher-{self.digest[:16]}.safetensors"


def teacher_store(cfg: RunConfig, site: Site, node: NodeConfig, run_id: int) -> TeacherStore | None:
    """The node's store: node config `state-dir`, else the institution's folder; None keeps the teacher in memory."""
    folder = state_folder(cfg, node)
    return None if folder is None else TeacherStore(folder, teacher_settings(cfg, site, run_id))


def teacher_settings(cfg: RunConfig, site: Site, run_id: int) -> dict[str, Any]:
    """What makes a saved teacher this node's teacher for this run. The run is its run-name (kept by a resumed
    run), or Flower's run id when unnamed; the privacy mechanism, because a DP teacher must only ever have
    been trained under DP."""
    return {
        "model": cfg.teacher_model_for(site.partition_id), "dataset": cfg.dataset, "seed": cfg.seed,
        "partition_id": site.partition_id, "num_classes": site.private.num_classes,
        "image_size": list(input_shape(site.private.inputs)), "private_data_sha256": _data_sha256(site.private),
        "public_fingerprint": site.fingerprint, "privacy": cfg.privacy, "run": cfg.run_name or f"run-id {run_id}",
    }


def attach_store(state: RecordDict, store: TeacherStore | None) -> None:
    """Tie node state to the on-disk teacher; a node whose state knows no teacher of this store (it restarted) says
    which one it continues."""
    if store is None:
        return
    keep_store_record(state, StoreRecord(str(store.path), store.digest, json.dumps(store.settings)))
    meta = teacher_meta(state)
    if meta is not None and meta.digest == store.digest:
        return
    header = saved_header(store.path) if store.path.is_file() else None
    if header is None or header.get("digest") != store.digest:
        return  # restore_teacher trains a fresh teacher, and says why
    keep_teacher(state, None, TeacherMeta(header["model"], int(header["rounds_trained"]), store.digest))
    log(INFO, "teacher restored from %s: %s, %d round(s) trained", store.path, header["model"], header["rounds_trained"])


def restore_teacher(state: RecordDict, cfg: RunConfig, site: Site) -> tuple[nn.Module, int]:
    """The node's teacher and the number of rounds it has trained; a fresh one on first use. With a store, the
    teacher saved there (the file is the truth: node state holds its meta only)."""
    name = cfg.teacher_model_for(site.partition_id)
    model = build_model(name, site.private.num_classes, input_shape(site.private.inputs), seed=cfg.seed + site.partition_id,
                        public=site.public.inputs)
    meta, store = teacher_meta(state), store_record(state)
    if store is not None:
        saved = _read(store, expected=meta)
        if saved is None or saved[1]["model"] != name:
            return model, 0
        model.load_state_dict(saved[0])
        return model, int(saved[1]["rounds_trained"])
    if meta is not None and meta.model == name and meta.digest is None:
        model.load_state_dict(teacher_weights(state))
        return model, meta.rounds_trained
    return model, 0


def train_round(model: nn.Module, cfg: RunConfig, site: Site, rounds_trained: int) -> float:
    """One round of local training on the private partition (`local-epochs`, more when `local-min-steps` asks for
    more steps than that); returns the last epoch's mean loss."""
    return train_supervised(
        model, site.private.inputs, site.private.labels,
        epochs=cfg.local_epochs_for(len(site.private)), lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
        seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds_trained,
    )


def save_teacher(state: RecordDict, model: nn.Module, cfg: RunConfig, site: Site, rounds_trained: int) -> None:
    """Keep the teacher so the next round continues training it: on disk when the node has a store (the file is
    replaced atomically: a crash leaves the previous teacher or this one) with its meta in node state, else in
    node state."""
    name, store = cfg.teacher_model_for(site.partition_id), store_record(state)
    if store is None:
        keep_teacher(state, model.state_dict(), TeacherMeta(name, rounds_trained))
        return
    header = {"format": 1, "model": name, "rounds_trained": rounds_trained, "digest": store.digest,
              "settings": json.loads(store.settings), "saved": utc_now()}
    _write_atomically(Path(store.path), model, header)
    keep_teacher(state, None, TeacherMeta(name, rounds_trained, store.digest))


def saved_header(path: Path) -> dict[str, Any] | None:
    """A saved teacher's header: model, rounds trained, settings digest and settings (None when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(HEADER_KEY, "null") or "null")
    except (SafetensorError, OSError, ValueError):
        return None


def digest_round(model: nn.Module, cfg: RunConfig, site: Site, digest: DigestInstruction, rounds_trained: int) -> tuple[float, float]:
    """FedMD (Li & Wang, 2019): learn toward the consensus on the public samples, then revisit the
    private data. Returns the last epoch's loss of each step (nan when a step has 0 epochs).

    Under privacy the revisit is refused here too (the site policy refuses it first): it would train on
    the private data outside the accounted mechanism, while the teacher's later releases claim DP."""
    if cfg.privacy != "none" and digest.revisit_epochs > 0:
        raise PolicyViolation(f"site-policy: max-revisit-epochs = 0 (always, under privacy \"{cfg.privacy}\") refuses "
                              f"revisit-epochs {digest.revisit_epochs}; send revisit-epochs 0")
    trained, x = fixed_stage(model, inputs_to_tensor(site.public.inputs[digest.sample_ids]))
    targets = torch.from_numpy(digest.consensus)
    optimizer = torch.optim.Adam(trained.parameters(), lr=cfg.teacher_lr)
    digest_loss = train_epochs(
        trained, optimizer, len(targets),
        lambda idx: distillation_loss(trained(x[idx]), targets[idx], digest.temperature),
        epochs=digest.digest_epochs, batch_size=cfg.teacher_batch_size,
        seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds_trained + 500_000,
    )
    revisit_loss = train_supervised(
        model, site.private.inputs, site.private.labels,
        epochs=digest.revisit_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
        seed=cfg.seed * 1_000_003 + site.partition_id * 1_009 + rounds_trained + 700_000,
    )
    return digest_loss, revisit_loss


def _read(store: StoreRecord, expected: TeacherMeta | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The saved teacher of `store`'s settings, or None (and a log line saying why a fresh one is trained, unless
    it is the first: no file yet, and none of other settings). `expected`: what node state knows of it."""
    path, folder = Path(store.path), Path(store.path).parent
    if path.is_file():
        header = saved_header(path)
        if header is not None and header.get("digest") == store.digest:
            try:
                return load_file(str(path)), header
            except (SafetensorError, OSError):
                pass
        log(WARNING, "teacher file %s is unreadable or does not match this node's settings: training a fresh teacher",
            path)
        return None
    if expected is not None and expected.digest == store.digest and expected.rounds_trained > 0:
        log(WARNING, "teacher file %s, trained %d round(s), is gone: training a fresh teacher", path,
            expected.rounds_trained)
        return None
    others = sorted(folder.glob("teacher-*.safetensors"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if others and isinstance(latest := saved_header(others[-1]), dict):
        saved_settings = latest.get("settings")
        settings = saved_settings if isinstance(saved_settings, dict) else {}
        wanted = json.loads(store.settings)
        differing = sorted(k for k in wanted if settings.get(k) != wanted[k])
        log(WARNING, "the teacher saved in %s was trained for other settings (%s differ): training a fresh teacher",
            others[-1], ", ".join(differing) or "format")
    return None


def _write_atomically(path: Path, model: nn.Module, header: dict[str, Any]) -> None:
    private_folder(path.parent)
    with atomic_path(path, mode=PRIVATE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={HEADER_KEY: json.dumps(header)})


def _data_sha256(data: Samples) -> str:
    """The private data's identity: its model inputs and labels, in order (never leaves the node)."""
    inputs = data.inputs
    digest = hashlib.sha256(f"{inputs.shape}|{inputs.dtype}|".encode())
    digest.update(inputs.tobytes())
    digest.update(data.labels.astype("int64").tobytes())
    return digest.hexdigest()
