"""Every key this node keeps in Flower's `context.state`, with typed accessors: no other module indexes it.

Node state lives as long as the SuperNode (in simulation, the run) and carries what one message leaves
to the next: the teacher's progress, a secure-aggregation round's secrets, the site policy's counts. A
deployed SuperNode passes all of it into every ClientApp process and back, so it holds no private data:
the institution's own images are cached in its state folder (client.site_cache) and a node with a state
folder keeps its teacher's weights there (client.teacher), node state only their meta.

    key               record        what
    partition         ArrayRecord   rows of the shared pool this node's partition holds ("rows"; simulation)
    partition-meta    ConfigRecord  the settings those rows were drawn for ("key")
    teacher           ArrayRecord   the teacher's weights, for a node without a state folder only
    teacher-meta      ConfigRecord  its model, rounds trained and settings digest ("model", "rounds-trained", "digest":
                                    set when the weights are on disk, in the store of that digest)
    teacher-store     ConfigRecord  where the teacher is kept on disk ("path", "digest", "settings" as JSON)
    pate-teachers-<k> ArrayRecord   PATE sub-teacher k's weights
    pate-meta         ConfigRecord  the sub-teachers' model and rounds trained ("model", "rounds")
    secagg            ConfigRecord  this round's private keys and self seed ("round", "mask-private",
                                    "share-private", "self-seed"), and what the node pinned: the roster
                                    ("roster-*", "threshold", "weighted"), the shares it opened ("opened-*"),
                                    the set it masked with ("shared") and the survivors it signed ("survivors");
                                    never leaves the node
    secagg-answered   ConfigRecord  the last round this node sent masked soft labels in ("run", "round")
    policy-queries    ConfigRecord  soft-label queries taken this round, for the site policy ("run", "round", "count")
    noised-counts     ConfigRecord  the class counts this run released noised (site policy counts = "noised"):
                                    released once per run, then reused ("run", "counts")
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.secagg.protocol import SHARE_BYTES, Roster, RosterEntry

PARTITION_KEY = "partition"
PARTITION_META_KEY = "partition-meta"
TEACHER_KEY = "teacher"
TEACHER_META_KEY = "teacher-meta"
STORE_KEY = "teacher-store"
PATE_KEY = "pate-teachers"  # one record per sub-teacher: f"{PATE_KEY}-{k}"
PATE_META_KEY = "pate-meta"
SECAGG_KEY = "secagg"
ANSWERED_KEY = "secagg-answered"
QUERIES_KEY = "policy-queries"
NOISED_COUNTS_KEY = "noised-counts"

Weights = dict[str, torch.Tensor] | OrderedDict[str, torch.Tensor]  # a torch state dict


# --- a simulated node's partition of the shared pool -------------------------------------------------------


def cached_partition(state: RecordDict, key: str) -> np.ndarray | None:
    """The rows of the partition drawn for settings `key`, or None when the state holds other ones (or none)."""
    record = _array_record(state, PARTITION_KEY)
    if _config_record(state, PARTITION_META_KEY, "key") != key or record is None:
        return None
    return record["rows"].numpy()


def keep_partition(state: RecordDict, key: str, rows: np.ndarray) -> None:
    state[PARTITION_KEY] = ArrayRecord({"rows": Array(rows)})
    state[PARTITION_META_KEY] = ConfigRecord({"key": key})



def forget_cached_data(state: RecordDict) -> None:
    """Drop the private images an earlier version kept in node state ("own-data", "own-data-meta"): a SuperNode that
    ran it still passes them into every ClientApp process otherwise."""
    for key in ("own-data", "own-data-meta"):
        if key in state:
            del state[key]


# --- the teacher -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherMeta:
    """The node's teacher: its model, the rounds it trained, and the store digest its weights are saved under."""

    model: str
    rounds_trained: int
    digest: str | None = None  # None: its weights are in node state (a node without a store)


@dataclass(frozen=True)
class StoreRecord:
    """Where this node keeps its teacher on disk (client.teacher.TeacherStore, as node state holds it)."""

    path: str
    digest: str
    settings: str  # JSON


def teacher_meta(state: RecordDict) -> TeacherMeta | None:
    """The meta of the node's teacher; None when node state knows of none (weights in state, or a store's digest)."""
    meta = state.get(TEACHER_META_KEY)
    if not isinstance(meta, ConfigRecord):
        return None
    model, rounds, digest = meta.get("model"), meta.get("rounds-trained"), meta.get("digest")
    if not isinstance(model, str) or not isinstance(rounds, int):
        return None
    if not isinstance(digest, str) and _array_record(state, TEACHER_KEY) is None:
        return None
    return TeacherMeta(model, rounds, digest if isinstance(digest, str) else None)


def teacher_weights(state: RecordDict) -> dict[str, torch.Tensor]:
    """The weights of the teacher node state holds (check `teacher_meta` first)."""
    record = _array_record(state, TEACHER_KEY)
    if record is None:
        raise KeyError(f"node state holds no {TEACHER_KEY!r}")
    return dict(record.to_torch_state_dict())


def keep_teacher(state: RecordDict, weights: Weights | None, meta: TeacherMeta) -> None:
    """Keep the teacher's meta, and its weights when given (None: they are on disk, in the store of `meta.digest`)."""
    if weights is not None:
        state[TEACHER_KEY] = ArrayRecord(weights)
    elif TEACHER_KEY in state:
        del state[TEACHER_KEY]
    record = ConfigRecord({"model": meta.model, "rounds-trained": meta.rounds_trained})
    if meta.digest is not None:
        record["digest"] = meta.digest
    state[TEACHER_META_KEY] = record


def store_record(state: RecordDict) -> StoreRecord | None:
    record = state.get(STORE_KEY)
    if not isinstance(record, ConfigRecord):
        return None
    return StoreRecord(str(record["path"]), str(record["digest"]), str(record["settings"]))


def keep_store_record(state: RecordDict, store: StoreRecord) -> None:
    state[STORE_KEY] = ConfigRecord({"path": store.path, "digest": store.digest, "settings": store.settings})


# --- PATE sub-teachers -------------------------------------------------------------------------------------


def pate_rounds(state: RecordDict, model: str | None = None) -> int:
    """Rounds the PATE sub-teachers trained (those of `model`, when given); 0 when node state holds none."""
    meta = state.get(PATE_META_KEY)
    if not isinstance(meta, ConfigRecord) or (model is not None and meta.get("model") != model):
        return 0
    rounds = meta.get("rounds")
    return rounds if isinstance(rounds, int) else 0


def pate_teacher_weights(state: RecordDict, k: int) -> dict[str, torch.Tensor] | None:
    record = _array_record(state, f"{PATE_KEY}-{k}")
    return None if record is None else dict(record.to_torch_state_dict())


def keep_pate_teacher(state: RecordDict, k: int, weights: Weights) -> None:
    state[f"{PATE_KEY}-{k}"] = ArrayRecord(weights)


def keep_pate_rounds(state: RecordDict, model: str, rounds: int) -> None:
    state[PATE_META_KEY] = ConfigRecord({"model": model, "rounds": rounds})


# --- a secure-aggregation round: secrets and what the node pinned ------------------------------------------


@dataclass(frozen=True)
class SecAggRound:
    """This node's secure-aggregation round as it stands: its private keys, then what it drew or pinned at each
    step, so that a later message cannot change what an earlier one fixed (client/secure.py)."""

    round: int
    mask_private: bytes
    share_private: bytes
    self_seed: bytes | None = None  # step 2
    roster: Roster | None = None  # step 2: the signed roster it gave shares to, with the threshold and weighting
    threshold: int = 0
    weighted: bool = False
    opened: dict[int, tuple[int, int]] | None = None  # step 3: source -> (b-share, c-share) of the bundles that opened
    shared: tuple[int, ...] | None = None  # step 4: the set U it masked with
    survivors: tuple[int, ...] | None = None  # step 5: the survivor set S it signed


def secagg_round(state: RecordDict) -> SecAggRound | None:
    record = state.get(SECAGG_KEY)
    if not isinstance(record, ConfigRecord):
        return None
    round_, mask, share, seed = (record.get(k) for k in ("round", "mask-private", "share-private", "self-seed"))
    if not isinstance(round_, int) or not isinstance(mask, bytes) or not isinstance(share, bytes):
        return None
    roster = None
    if "roster-nodes" in record:
        columns = [_list(record, f"roster-{k}") for k in ("nodes", "mask-keys", "share-keys", "institutions", "signatures")]
        roster = {int(node): RosterEntry(i, m, s, name, signature)
                  for i, (node, m, s, name, signature) in enumerate(zip(*columns, strict=True), start=1)}
    opened = None
    if "opened-sources" in record:
        columns = [_list(record, f"opened-{k}") for k in ("sources", "b", "c")]
        opened = {int(source): (int.from_bytes(b, "big"), int.from_bytes(c, "big")) for source, b, c in zip(*columns, strict=True)}
    threshold, weighted = record.get("threshold", 0), record.get("weighted", False)
    return SecAggRound(round_, mask, share, seed if isinstance(seed, bytes) else None, roster,
                       threshold if isinstance(threshold, int) else 0, weighted is True, opened,
                       _nodes(record, "shared"), _nodes(record, "survivors"))


def keep_secagg_round(state: RecordDict, kept: SecAggRound) -> None:
    record = ConfigRecord({"round": kept.round, "mask-private": kept.mask_private, "share-private": kept.share_private,
                           "threshold": kept.threshold, "weighted": kept.weighted})
    if kept.self_seed is not None:
        record["self-seed"] = kept.self_seed
    if kept.roster is not None:
        nodes = sorted(kept.roster)
        record["roster-nodes"] = [str(n) for n in nodes]
        record["roster-mask-keys"] = [kept.roster[n].mask_key for n in nodes]
        record["roster-share-keys"] = [kept.roster[n].share_key for n in nodes]
        record["roster-institutions"] = [kept.roster[n].institution for n in nodes]
        record["roster-signatures"] = [kept.roster[n].signature for n in nodes]
    if kept.opened is not None:
        sources = sorted(kept.opened)
        record["opened-sources"] = [str(n) for n in sources]
        record["opened-b"] = [kept.opened[n][0].to_bytes(SHARE_BYTES, "big") for n in sources]
        record["opened-c"] = [kept.opened[n][1].to_bytes(SHARE_BYTES, "big") for n in sources]
    for key, members in (("shared", kept.shared), ("survivors", kept.survivors)):
        if members is not None:
            record[key] = [str(n) for n in members]
    state[SECAGG_KEY] = record


def forget_secagg(state: RecordDict) -> None:
    """Delete the round's secrets and shares (once its shares were given); `secagg_answered` stays."""
    if SECAGG_KEY in state:
        del state[SECAGG_KEY]


def secagg_answered(state: RecordDict, run_id: int) -> int:
    """The last round of run `run_id` in which this node sent masked soft labels (0: none)."""
    record = state.get(ANSWERED_KEY)
    if not isinstance(record, ConfigRecord) or record.get("run") != str(run_id):
        return 0
    round_ = record.get("round")
    return round_ if isinstance(round_, int) else 0


def keep_secagg_answered(state: RecordDict, run_id: int, round_: int) -> None:
    state[ANSWERED_KEY] = ConfigRecord({"run": str(run_id), "round": round_})


def _list(record: ConfigRecord, key: str) -> list:
    value = record.get(key)
    return value if isinstance(value, list) else []


def _nodes(record: ConfigRecord, key: str) -> tuple[int, ...] | None:
    return tuple(int(n) for n in _list(record, key)) if key in record else None


# --- the site policy's count of queries ------------------------------------------------------------------


def queries_taken(state: RecordDict, run_id: int, round_: int) -> int:
    """Soft-label queries this node took in round `round_` of run `run_id` (0 for another run or round)."""
    record = state.get(QUERIES_KEY)
    if not isinstance(record, ConfigRecord) or record.get("run") != str(run_id) or record.get("round") != round_:
        return 0
    count = record.get("count")
    return count if isinstance(count, int) else 0


def keep_queries_taken(state: RecordDict, run_id: int, round_: int, count: int) -> None:
    state[QUERIES_KEY] = ConfigRecord({"run": str(run_id), "round": round_, "count": count})


def released_noised_counts(state: RecordDict, run_id: int) -> np.ndarray | None:
    """The noised class counts this node released in run `run_id`, or None when it released none yet."""
    record = state.get(NOISED_COUNTS_KEY)
    if not isinstance(record, ConfigRecord) or record.get("run") != str(run_id):
        return None
    counts = record.get("counts")
    return np.asarray(counts, dtype=np.int64) if isinstance(counts, list) else None


def keep_noised_counts(state: RecordDict, run_id: int, counts: np.ndarray) -> None:
    state[NOISED_COUNTS_KEY] = ConfigRecord({"run": str(run_id), "counts": [int(c) for c in counts]})


# --- helpers -----------------------------------------------------------------------------------------------


def _array_record(state: RecordDict, key: str) -> ArrayRecord | None:
    record = state.get(key)
    return record if isinstance(record, ArrayRecord) else None


def _config_record(state: RecordDict, key: str, field: str) -> object:
    """Field `field` of the ConfigRecord at `key`; None when there is none."""
    record = state.get(key)
    return record.get(field) if isinstance(record, ConfigRecord) else None
