"""The typed schema of what a run records: results.json's round rows, final figures, audit and privacy sections,
and student.json, each a frozen dataclass with a validating `to_json()` / `from_json()`.

Distillation and FedAvg write the same records with the same keys: a figure only one method has (the
temperature, the teachers', the digest's) is `None` for the other and written as `null`, never left out.
Reading is strict about what is there (a wrong type or an unknown key is a `DataError` that names it) and
lenient only where older run folders are: a key added since is read as `None` (or empty).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from numbers import Integral, Real
from typing import Any, ClassVar, TypeVar, cast

from common.errors import DataError

Check = Callable[[Any], bool]
R = TypeVar("R", bound="Record")


def _integer(minimum: int) -> Check:
    return lambda v: isinstance(v, Integral) and not isinstance(v, bool) and int(v) >= minimum


def _number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _share(v: Any) -> bool:
    """An accuracy: in [0, 1], or NaN where it is undefined (an empty test set)."""
    return _number(v) and (math.isnan(v) or 0.0 <= v <= 1.0)


def _seconds(v: Any) -> bool:
    return _number(v) and v >= 0


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _by_name(check: Check) -> Check:
    """A JSON object of string keys (node ids, institution or metric names) whose values pass `check`."""
    return lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and check(x) for k, x in v.items())


def _items(check: Check) -> Check:
    return lambda v: isinstance(v, (list, tuple)) and all(check(x) for x in v)


def _anything(v: Any) -> bool:
    return True


_counts, _texts, _numbers = _by_name(_integer(0)), _by_name(_text), _by_name(_number)
_objects = _items(lambda v: isinstance(v, Mapping))


def _field(check: Check, expected: str, *, default: Any = MISSING, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field: `check` validates its value, `expected` says what it must be (for the error message)."""
    metadata = {"check": check, "expected": expected}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _plain(value: Any) -> Any:
    """`value` as plain JSON types: a nested record as its JSON, mappings and sequences copied, numpy scalars as
    Python numbers."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Record:
    """What every schema record shares: validation on construction, and the JSON form (`WHERE` names the record)."""

    WHERE: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        problems = [f"{f.name} must be {f.metadata['expected']}, got {_show(getattr(self, f.name))}"
                    for f in fields(cast(Any, self)) if not f.metadata["check"](getattr(self, f.name))]
        if problems:
            raise DataError(f"{self.WHERE}: {'; '.join(problems)}")

    def to_json(self) -> dict[str, Any]:
        """Every field, in the schema's order (None as null), as plain JSON values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(cast(Any, self))}

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        """The record `data` holds; DataError naming every missing, unknown or ill-typed key at once."""
        if not isinstance(data, Mapping):
            raise DataError(f"{cls.WHERE}: expected a JSON object, got {type(data).__name__}")
        schema = fields(cast(Any, cls))
        required = [f.name for f in schema if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        unknown = sorted(set(data) - {f.name for f in schema})
        if missing or unknown:
            found = "; ".join(part for part in (f"missing keys {missing}" if missing else "",
                                                 f"unknown keys {unknown}" if unknown else "") if part)
            raise DataError(f"{cls.WHERE}: {found}; the file was not written by this fedstill version or was edited")
        return cast(Any, cls)(**data)


_opt_seconds = _optional(_seconds)


@dataclass(frozen=True, kw_only=True)
class RoundPhases(Record):
    """A round row's `phases`: where the round's time went, in seconds (server/profile.py), null where a phase
    does not apply (FedAvg has no label nor distil) or was not measured.

    On the nodes (from the timings their accepted replies carry; common.messages.timings): each of `load`, `train`,
    `label`, `sign` is the largest over those nodes, and `node_total` the slowest node's whole answer, so the node
    phases need not add up to `node_total`; they run inside the server's `wait`. `node_busy` is the nodes' totals
    summed: over `round_s`, how many nodes computed at once on average. `nodes_timed` counts the replies that
    carried timings (a site policy that does not release num-examples exactly sends none).
    On the server, each phase exclusive of the others: `wait` from sending the query to the last reply or the
    deadline; `validate` judging the replies (attestation, schema); `aggregate` (the rule, with any agreed weight
    caps); `distil`; `evaluate` (the student on the test set); `checkpoint` (student file and run checkpoint);
    `ledger` every audit-trail write of the round, wherever it happened. Under secure aggregation `wait` is the
    whole masked protocol (its exchanges, their checks and the opening of the sum), and validate and aggregate are
    null. `round_s` is the round from its query to the end of its checkpoint: the time the server phases share
    (the row's `wall_s` stops before the checkpoint). The row gets its phases after its checkpoint, so the
    checkpoint itself holds the row without them: a resumed run's last round before the stop has none.
    """

    WHERE: ClassVar[str] = "results.json round phases"

    load: float | None = _field(_opt_seconds, "seconds or null", default=None)
    train: float | None = _field(_opt_seconds, "seconds or null", default=None)
    label: float | None = _field(_opt_seconds, "seconds or null", default=None)
    sign: float | None = _field(_opt_seconds, "seconds or null", default=None)
    node_total: float | None = _field(_opt_seconds, "seconds or null", default=None)
    node_busy: float | None = _field(_opt_seconds, "seconds or null", default=None)
    nodes_timed: int = _field(_integer(0), "an integer >= 0", default=0)
    wait: float | None = _field(_opt_seconds, "seconds or null", default=None)
    validate: float | None = _field(_opt_seconds, "seconds or null", default=None)
    aggregate: float | None = _field(_opt_seconds, "seconds or null", default=None)
    distil: float | None = _field(_opt_seconds, "seconds or null", default=None)
    evaluate: float | None = _field(_opt_seconds, "seconds or null", default=None)
    checkpoint: float | None = _field(_opt_seconds, "seconds or null", default=None)
    ledger: float | None = _field(_opt_seconds, "seconds or null", default=None)
    round_s: float = _field(_seconds, "a number >= 0")


NODE_PHASES = ("load", "train", "label", "sign", "node_total", "node_busy")  # RoundPhases' node phases, in order
SERVER_PHASES = ("wait", "validate", "aggregate", "distil", "evaluate", "checkpoint", "ledger")  # exclusive, in order


@dataclass(frozen=True, kw_only=True)
class RoundRow(Record):
    """One row of results.json's `rounds`: one round of distillation or of FedAvg."""

    WHERE: ClassVar[str] = "results.json round row"

    round: int = _field(_integer(1), "an integer >= 1")
    temperature: float | None = _field(_optional(_number), "a number or null", default=None)  # distillation only
    student_accuracy: float = _field(_share, "a number in [0, 1]")  # test set
    ensemble_accuracy: float | None = _field(_optional(_share), "a number in [0, 1] or null")  # public set; FedAvg: None
    clients_replied: int = _field(_integer(0), "an integer >= 0")
    clients_rejected: dict[str, str] = _field(_texts, "an object of node id -> reason")
    uplink_bytes: int = _field(_integer(0), "an integer >= 0")
    uplink_bytes_per_client: dict[str, int] = _field(_counts, "an object of node id -> bytes")
    downlink_bytes: int = _field(_integer(0), "an integer >= 0")  # the digest's included
    teacher_rounds: dict[str, int] | None = _field(_optional(_counts), "an object of node id -> rounds, or null", default=None)
    teacher_accuracy: dict[str, float] | None = _field(_optional(_numbers), "an object of node id -> accuracy, or null",
                                                       default=None)  # the teachers evaluated on the test set
    teacher_params: dict[str, int] | None = _field(_optional(_counts), "an object of node id -> parameters, or null",
                                                   default=None)
    student_loss: float | None = _field(_optional(_number), "a number or null", default=None)  # last distillation epoch
    distilled_samples: int | None = _field(_optional(_integer(0)), "an integer >= 0 or null", default=None)
    student_metrics: dict[str, float] | None = _field(_optional(_numbers), "an object of metric -> value, or null",
                                                      default=None)  # balanced_accuracy, macro_f1, auroc (common.metrics)
    digest_failed: dict[str, str] | None = _field(_optional(_texts), "an object of node id -> reason, or null",
                                                  default=None)  # FedMD digest rounds only
    wall_s: float = _field(_seconds, "a number >= 0")
    # Which institution each node id of this row is (null in rows written before): `institutions` as its signature,
    # checked against the allow-list, names it; `institutions_claimed` where only the node's word does (a rejected
    # reply's attestation, a refusal's own text, any reply when the run checks no signatures).
    institutions: dict[str, str] | None = _field(_optional(_texts), "an object of node id -> institution id, or null",
                                                 default=None)
    institutions_claimed: dict[str, str] | None = _field(_optional(_texts), "an object of node id -> institution id, "
                                                         "or null", default=None)
    phases: RoundPhases | None = _field(_optional(lambda v: isinstance(v, RoundPhases)), "an object of phase -> seconds, "
                                        "or null", default=None)  # null in rows written before (RoundPhases)

    @classmethod
    def from_json(cls, data: Any) -> RoundRow:
        if isinstance(data, Mapping) and isinstance(data.get("phases"), Mapping):
            data = {**data, "phases": RoundPhases.from_json(data["phases"])}
        return super().from_json(data)


GUARANTEE_NONE = "none"  # PrivacySummary.guarantee of a run without a privacy mechanism
STUDENT_METRICS = ("balanced_accuracy", "macro_f1", "auroc")  # a row's student_metrics, as final's student_<name>


@dataclass(frozen=True, kw_only=True)
class FinalFigures(Record):
    """results.json's `final`: the headline figures of a completed run (teachers' figures None for FedAvg)."""

    WHERE: ClassVar[str] = "results.json final figures"

    student_accuracy: float = _field(_share, "a number in [0, 1]")
    student_balanced_accuracy: float | None = _field(_optional(_number), "a number or null", default=None)
    student_macro_f1: float | None = _field(_optional(_number), "a number or null", default=None)
    student_auroc: float | None = _field(_optional(_number), "a number or null", default=None)
    student_params: int = _field(_integer(0), "an integer >= 0")
    teacher_accuracy_mean: float | None = _field(_optional(_number), "a number or null", default=None)
    teacher_accuracy_min: float | None = _field(_optional(_number), "a number or null", default=None)
    teacher_accuracy_max: float | None = _field(_optional(_number), "a number or null", default=None)
    teacher_params: dict[str, int] | None = _field(_optional(_counts), "an object of node id -> parameters, or null",
                                                   default=None)
    largest_teacher_params: int | None = _field(_optional(_integer(0)), "an integer >= 0 or null", default=None)
    uplink_bytes_total: int = _field(_integer(0), "an integer >= 0")
    downlink_bytes_total: int = _field(_integer(0), "an integer >= 0")
    wall_s: float = _field(_seconds, "a number >= 0")  # the rounds' wall time, summed
    title: str = _field(_text, "a string")
    # the ServerApp process's peak resident memory (getrusage ru_maxrss; in simulation the process also drives
    # the simulation engine); null in runs written before it was recorded
    server_peak_rss_bytes: int | None = _field(_optional(_integer(0)), "an integer >= 0 or null", default=None)


@dataclass(frozen=True, kw_only=True)
class AuditSummary(Record):
    """results.json's `audit`: the ledger's size and head (checked by `fedstill audit verify`) and who signed."""

    WHERE: ClassVar[str] = "results.json audit section"

    ledger: str = _field(_text, "a file name")
    ledger_entries: int = _field(_integer(1), "an integer >= 1")
    ledger_head: str = _field(_text, "a hash")
    coordinator_key: str = _field(_text, "a public key")
    signatures_checked: bool = _field(_flag, "true or false")
    institutions: dict[str, str] = _field(_texts, "an object of node id -> institution id")
    rejections: int = _field(_integer(0), "an integer >= 0")


@dataclass(frozen=True, kw_only=True)
class PrivacySummary(Record):
    """results.json's `privacy`: the mechanism and the epsilon each institution attested (server/results/privacy.py)."""

    WHERE: ClassVar[str] = "results.json privacy section"

    mechanism: str = _field(_text, "a string")
    # "none" (GUARANTEE_NONE: no mechanism, so no epsilon is claimed, never epsilon 0) or "differential privacy";
    # null in runs written before it was recorded
    guarantee: str | None = _field(_optional(_text), "a string or null", default=None)
    secure_aggregation: bool = _field(_flag, "true or false")
    run_parameters: dict[str, Any] = _field(_by_name(_anything), "an object")
    delta: list[float] = _field(_items(_number), "a list of numbers")
    institution_parameters: dict[str, Any] = _field(_by_name(_optional(lambda v: isinstance(v, Mapping))),
                                                    "an object of institution -> parameters")
    epsilon_per_round: list[dict[str, Any]] = _field(_objects, "a list of objects")
    epsilon_final: dict[str, float | None] = _field(_by_name(_optional(_number)), "an object of institution -> epsilon")
    epsilon_max: float | None = _field(_optional(_number), "a number or null")
    refusals: list[dict[str, Any]] = _field(_objects, "a list of objects")
    abandoned_releases: list[dict[str, Any]] = _field(_objects, "a list of objects", factory=list)


def _shape(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_integer(1)(d) for d in v)


@dataclass(frozen=True, kw_only=True)
class StudentMeta(Record):
    """student.json (and the student.safetensors header): what rebuilds the student around its weights.

    `input_shape` is one sample's shape: (height, width) of an image, (features,) of a table row, (tokens,)
    of a text. Run folders written before it was named so call it `image_size`; `from_json` reads both.
    """

    WHERE: ClassVar[str] = "student.json"

    model: str = _field(_text, "a model name")
    num_classes: int = _field(_integer(1), "an integer >= 1")
    input_shape: tuple[int, ...] = _field(_shape, "a non-empty list of integers >= 1")
    temperature: float | None = _field(_optional(_number), "a number or null", default=None)  # distillation only
    round: int = _field(_integer(1), "an integer >= 1")  # the round that made these weights
    method: str | None = _field(_optional(_text), "a string or null", default=None)  # absent in older distillation runs
    dataset: str = _field(_text, "a string")
    scenario: str = _field(_text, "a string")

    @classmethod
    def from_json(cls, data: Any) -> StudentMeta:
        if isinstance(data, Mapping):
            data = {("input_shape" if key == "image_size" and "input_shape" not in data else key): value
                    for key, value in data.items()}
            if isinstance(data.get("input_shape"), list):
                data["input_shape"] = tuple(data["input_shape"])
        return super().from_json(data)

    def header(self) -> dict[str, str]:
        """The safetensors header's metadata: every field that is set, as text."""
        return {key: str(value) for key, value in self.to_json().items() if value is not None}


def _table(v: Any) -> bool:
    """engine -> batch size (as text) -> figure -> number: `fedstill bench`'s timings."""
    return _by_name(_by_name(_numbers))(v)


@dataclass(frozen=True, kw_only=True)
class ServingSummary(Record):
    """results.json's `serving` (and export/bench.json): `fedstill bench`'s timings (simulations/student/bench.py).

    `engines` holds every engine's figures per batch size ("teacher, PyTorch", "student, ORT INT8", ...), each row's
    `throughput_x_teacher` against the teacher in PyTorch as before; `per_engine` sets the student against the
    teacher in the same engine; `int8` is the INT8-or-FP32 recommendation from this run's timings. Sections written
    before the teacher was timed in onnxruntime have only the student's ONNX rows and read the newer keys as null.
    """

    WHERE: ClassVar[str] = "results.json serving section"

    run_dir: str = _field(_text, "a string")
    threads: int = _field(_integer(1), "an integer >= 1")
    batches: list[int] = _field(_items(_integer(1)), "a list of integers >= 1")
    iterations: int = _field(_integer(1), "an integer >= 1")
    rounds: int = _field(_integer(1), "an integer >= 1")
    warmup: int = _field(_integer(0), "an integer >= 0")
    teacher: dict[str, Any] = _field(_by_name(_anything), "an object")
    student: dict[str, Any] = _field(_by_name(_anything), "an object")
    machine: dict[str, Any] = _field(_by_name(_anything), "an object")
    engines: dict[str, dict[str, dict[str, float]]] = _field(_table, "an object of engine -> batch -> figures")
    per_engine: dict[str, dict[str, dict[str, float]]] | None = _field(
        _optional(_table), "an object of engine -> batch -> student/teacher figures, or null", default=None)
    int8: dict[str, Any] | None = _field(_optional(_by_name(_anything)), "an object or null", default=None)
    teacher_int8_x_fp32: dict[str, float] | None = _field(_optional(_numbers), "an object of batch -> ratio, or null",
                                                          default=None)
