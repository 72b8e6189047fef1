"""A reply's compute timings: the seconds a node spent per phase answering one message, for the run's profile.

They ride in the reply's own config record `timings`, attached after the reply is signed (signing is one of the
phases timed), so they lie outside the attested payload: `record_digest` leaves them out, as it leaves out the
attestation. The attestation names them among the data categories it releases; the values themselves are
unsigned and read only for the profile, never for aggregation. A node sends none where its site policy keeps
them (they scale with the private data's size: client.answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from common.errors import MessageFormatError
from common.messages.records import TIMINGS, get_record

NODE_PHASES = ("load", "train", "label", "sign")  # in order; `total` is the whole answer


@dataclass(frozen=True)
class NodeTimings:
    """Seconds per phase of one answer on the node; a phase the answer did not have is None.

    load: the site's data and the teacher, from node state or disk, and the teacher saved back; train: the round
    of local training (under PATE, the sub-teachers' training and votes); label: inference on the queried public
    samples; sign: the attestation, the release log and any cosignature; total: the handler from its start to its
    reply, which also holds what no phase names (the query's checks, the counts, a teacher evaluation, encoding).
    """

    total: float
    load: float | None = None
    train: float | None = None
    label: float | None = None
    sign: float | None = None

    def __post_init__(self) -> None:
        bad = [f.name for f in fields(self) if (value := getattr(self, f.name)) is not None
               and not (isinstance(value, float) and math.isfinite(value) and value >= 0)]
        if bad:
            raise MessageFormatError(f"timings: {', '.join(bad)} must be finite seconds >= 0")

    @classmethod
    def of(cls, seconds: dict[str, float], total: float) -> NodeTimings:
        """From a clock's seconds per phase (common.timing.PhaseClock); phases it never entered are None."""
        return cls(total=round(total, 4), **{name: round(seconds[name], 4) for name in NODE_PHASES if name in seconds})

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None})

    @classmethod
    def from_record(cls, record: RecordDict) -> NodeTimings | None:
        """The reply's timings, None when it carries none; a malformed record is a MessageFormatError."""
        if TIMINGS not in record.keys():
            return None
        config = get_record(record, TIMINGS, ConfigRecord)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config.keys()) - known)
        if unknown or "total" not in config:
            raise MessageFormatError(f"timings: expected 'total' and any of {list(NODE_PHASES)}, got {sorted(config.keys())}")
        values: dict[str, Any] = {key: float(value) if isinstance(value, int) and not isinstance(value, bool) else value
                  for key, value in config.items()}
        return cls(**values)


def attach_timings(record: RecordDict, timings: NodeTimings) -> RecordDict:
    """`record` (already signed) with `timings` added as its config record `timings`."""
    record[TIMINGS] = timings.to_record()
    return record
