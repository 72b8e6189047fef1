"""Unit tests of the secure-aggregation messages (common/messages/secagg.py): round trips and rejections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import FingerprintMismatch, MessageFormatError
from common.messages import MaskedReply, SecAggBundles, SecAggKeys, SecAggRoster, SecAggSetup, SecAggShares, SecAggUnmask
from common.secagg.protocol import ClientSecrets, Roster, RosterEntry
from common.secagg.shamir import PRIME

FINGERPRINT = "ab" * 32
LENGTH = 13  # 4 samples x 3 classes + the weight
NODES = [7, 2**63 + 5, 2**64 - 1]  # Flower node ids are uint64: past int64 too


def new_roster(nodes: list[int] = NODES) -> Roster:
    keys = [ClientSecrets.generate().public_keys() for _ in nodes]
    return {node: RosterEntry(i, *pair) for i, (node, pair) in enumerate(zip(sorted(nodes), keys, strict=True), start=1)}


ROSTER = new_roster()


def over_the_wire(record: RecordDict) -> RecordDict:
    """The record as the other side gets it: through Flower's protobuf serialisation."""
    return recorddict_from_proto(recorddict_to_proto(record))


def masked_reply(masked: np.ndarray | None = None) -> MaskedReply:
    masked = np.random.default_rng(0).integers(0, 2**64, size=LENGTH, dtype=np.uint64) if masked is None else masked
    return MaskedReply(round=3, fingerprint=FINGERPRINT, masked=masked, train_loss=0.4, teacher_accuracy=-1.0,
                       teacher_params=1000, teacher_rounds=3)


# --- round trips -----------------------------------------------------------------------------------------------

ROUND_TRIPS: dict[str, tuple[Any, Callable[[RecordDict], Any]]] = {
    "setup": (SecAggSetup(3), SecAggSetup.from_record),
    "keys": (SecAggKeys(3, *ClientSecrets.generate().public_keys()), lambda r: SecAggKeys.from_record(r, 3)),
    "roster-mean": (SecAggRoster(3, 2, False, ROSTER), SecAggRoster.from_record),
    "roster-weighted": (SecAggRoster(3, 3, True, ROSTER), SecAggRoster.from_record),
    "bundles": (SecAggBundles(3, {node: bytes([i]) * 160 for i, node in enumerate(NODES)}),
                lambda r: SecAggBundles.from_record(r, 3, ROSTER)),
    "unmask": (SecAggUnmask(3, [7, 2**64 - 1], [2**63 + 5], {node: bytes([i]) * 160 for i, node in enumerate(NODES)}),
               SecAggUnmask.from_record),
    "unmask-none-dropped": (SecAggUnmask(3, sorted(NODES), [], {node: b"\x01" * 160 for node in NODES}),
                            SecAggUnmask.from_record),
    "shares": (SecAggShares(3, {7: ("b", 0), 2**63 + 5: ("c", PRIME - 1), 2**64 - 1: ("b", 12345)}),
               lambda r: SecAggShares.from_record(r, 3)),
}


@pytest.mark.parametrize("wire", [False, True], ids=["in-process", "protobuf"])
@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_every_secagg_message_round_trips(name: str, wire: bool) -> None:
    # Prepare
    message, parse = ROUND_TRIPS[name]
    record = message.to_record()

    # Execute
    parsed = parse(over_the_wire(record) if wire else record)

    # Assert
    assert parsed == message


@pytest.mark.parametrize("wire", [False, True], ids=["in-process", "protobuf"])
def test_masked_reply_round_trips_every_uint64_bit(wire: bool) -> None:
    # Prepare
    masked = np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1] + [12345] * (LENGTH - 5), dtype=np.uint64)
    reply = masked_reply(masked)
    record = reply.to_record()

    # Execute
    parsed = MaskedReply.from_record(over_the_wire(record) if wire else record, 3, FINGERPRINT, LENGTH)

    # Assert
    assert parsed.masked.dtype == np.uint64 and np.array_equal(parsed.masked, masked)
    assert (parsed.round, parsed.fingerprint, parsed.train_loss, parsed.teacher_accuracy, parsed.teacher_params,
            parsed.teacher_rounds) == (3, FINGERPRINT, 0.4, -1.0, 1000, 3)
    assert record["release"]["codec"] == "secagg"


def test_a_query_without_a_roster_is_a_plain_round() -> None:
    # Prepare
    record = RecordDict({"query": ConfigRecord({"round": 1})})

    # Execute
    roster = SecAggRoster.from_record(record)

    # Assert
    assert roster is None


@settings(max_examples=40, deadline=None)
@given(shares=st.dictionaries(st.integers(min_value=0, max_value=2**64 - 1),
                              st.tuples(st.sampled_from(["b", "c"]), st.integers(min_value=0, max_value=PRIME - 1)),
                              max_size=10),
       round_=st.integers(min_value=1, max_value=10**6))
def test_any_shares_round_trip(shares: dict[int, tuple[str, int]], round_: int) -> None:
    # Prepare
    message = SecAggShares(round_, shares)

    # Execute
    parsed = SecAggShares.from_record(over_the_wire(message.to_record()), round_)

    # Assert
    assert parsed == message


@settings(max_examples=25, deadline=None)
@given(nodes=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=2, max_size=9, unique=True),
       data=st.data())
def test_any_roster_round_trips(nodes: list[int], data: st.DataObject) -> None:
    # Prepare
    keys = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=2 * len(nodes), max_size=2 * len(nodes)))
    roster = {node: RosterEntry(i, keys[2 * i - 2], keys[2 * i - 1]) for i, node in enumerate(sorted(nodes), start=1)}
    message = SecAggRoster(1, data.draw(st.integers(min_value=2, max_value=len(nodes))), data.draw(st.booleans()), roster)

    # Execute
    parsed = SecAggRoster.from_record(over_the_wire(message.to_record()))

    # Assert
    assert parsed == message


# --- rejections ----------------------------------------------------------------------------------------------------

def edit_config(record: RecordDict, key: str, **values: Any) -> RecordDict:
    """The record with ConfigRecord `key` changed (a value None removes the field)."""
    config = dict(record[key].items())
    for name, value in values.items():
        name = name.replace("_", "-")
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    record[key] = ConfigRecord(config)
    return record


def edit_arrays(record: RecordDict, key: str, **arrays: np.ndarray | None) -> RecordDict:
    """The record with ArrayRecord `key` changed (an array None removes it)."""
    current = {name: array.numpy() for name, array in record[key].items()}
    for name, value in arrays.items():
        name = name.replace("_", "-")
        if value is None:
            current.pop(name, None)
        else:
            current[name] = value
    record[key] = ArrayRecord({name: Array(value) for name, value in current.items()})
    return record


def test_setup_rejections_name_the_record_and_key() -> None:
    # Prepare
    bool_round = edit_config(SecAggSetup(1).to_record(), "secagg-setup", round=True)
    missing = RecordDict({"other": ConfigRecord({"round": 1})})

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="secagg-setup: key 'round' must be int, got bool"):
        SecAggSetup.from_record(bool_round)
    with pytest.raises(MessageFormatError, match="missing record 'secagg-setup'"):
        SecAggSetup.from_record(missing)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"round": 2}, "secagg-keys: expected round 1 and two 32-byte keys"),
        ({"mask_key": b"\x01" * 31}, "secagg-keys: expected round 1 and two 32-byte keys"),
        ({"share_key": b"\x01" * 33}, "secagg-keys: expected round 1 and two 32-byte keys"),
        ({"mask_key": "01" * 32}, "secagg-keys: key 'mask-key' must be bytes, got str"),
        ({"share_key": None}, "secagg-keys: missing key 'share-key'"),
    ],
    ids=["wrong-round", "short-mask-key", "long-share-key", "key-as-text", "missing-share-key"],
)
def test_bad_keys_are_rejected(changes: dict[str, Any], message: str) -> None:
    # Prepare
    record = edit_config(SecAggKeys(1, *ClientSecrets.generate().public_keys()).to_record(), "secagg-keys", **changes)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggKeys.from_record(record, 1)


ROSTER_NODES = np.array(sorted(NODES), dtype=np.uint64)
KEYS = np.array([list(ROSTER[n].mask_key) for n in sorted(NODES)], dtype=np.uint8)


@pytest.mark.parametrize(
    ("arrays", "config", "message"),
    [
        ({"mask_keys": KEYS[:, :31]}, {}, r"expected nodes \(n,\) uint64, indices \(n,\) int, keys \(n, 32\) uint8"),
        ({"share_keys": KEYS[:2]}, {}, r"keys \(n, 32\) uint8"),
        ({"mask_keys": KEYS.astype(np.int64)}, {}, r"keys \(n, 32\) uint8"),
        ({"indices": np.array([1, 2], dtype=np.int64)}, {}, r"indices \(n,\)"),
        ({"indices": np.array([1, 2, 2], dtype=np.int64)}, {}, "indices must be distinct"),
        ({"indices": None}, {}, "secagg-roster: unreadable"),
        ({}, {"threshold": 1}, r"threshold in \[2, 3\], got 1"),
        ({}, {"threshold": 4}, r"threshold in \[2, 3\], got 4"),
        ({}, {"weighted": 1}, "secagg: key 'weighted' must be bool, got int"),
        ({}, {"round": None}, "secagg: missing key 'round'"),
    ],
    ids=["short-keys", "too-few-keys", "keys-not-uint8", "too-few-indices", "repeated-index", "no-indices",
         "threshold-1", "threshold-above-n", "weighted-not-bool", "no-round"],
)
def test_bad_rosters_are_rejected(arrays: dict[str, Any], config: dict[str, Any], message: str) -> None:
    # Prepare
    record = SecAggRoster(1, 2, False, ROSTER).to_record()
    record = edit_config(edit_arrays(record, "secagg-roster", **arrays), "secagg", **config)

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggRoster.from_record(record)


def test_a_roster_without_its_arrays_is_rejected() -> None:
    # Prepare
    record = SecAggRoster(1, 2, False, ROSTER).to_record()
    del record["secagg-roster"]

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="missing record 'secagg-roster'"):
        SecAggRoster.from_record(record)


def test_share_keys_of_another_dtype_are_rejected() -> None:
    # Prepare
    record = edit_arrays(SecAggRoster(1, 2, False, ROSTER).to_record(), "secagg-roster", share_keys=KEYS.astype(np.int64))

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=r"keys \(n, 32\) uint8"):
        SecAggRoster.from_record(record)


def bundles_record(bundles: dict[str, Any], round_: int = 1) -> RecordDict:
    return RecordDict({"secagg-bundles": ConfigRecord({"round": round_}), "bundles": ConfigRecord(bundles)})


FULL_BUNDLES = {str(node): b"\x05" * 160 for node in NODES}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (bundles_record(FULL_BUNDLES, round_=2), "secagg-bundles: expected round 1"),
        (bundles_record({k: v for k, v in FULL_BUNDLES.items() if k != str(NODES[1])}),
         "bundles: expected one share bundle for every node of the roster"),
        (bundles_record({**FULL_BUNDLES, "99": b"\x05" * 160}), "expected one share bundle for every node"),
        (bundles_record({**FULL_BUNDLES, str(NODES[0]): "05" * 160}), "bundles: key '7' must be bytes, got str"),
        (RecordDict({"secagg-bundles": ConfigRecord({"round": 1})}), "missing record 'bundles'"),
    ],
    ids=["wrong-round", "member-missing", "stranger-added", "bundle-as-text", "no-bundles"],
)
def test_bad_bundles_are_rejected(record: RecordDict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggBundles.from_record(record, 1, ROSTER)


BAD_VECTOR = r"masked: expected uint64 of shape \(13,\)"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: edit_config(r, "release", round=2), "release: expected round 3 with codec 'secagg'"),
        (lambda r: edit_config(r, "release", codec="float16"), "release: expected round 3 with codec 'secagg'"),
        (lambda r: edit_arrays(r, "masked", y=np.zeros(LENGTH, dtype=np.float64)), BAD_VECTOR),
        (lambda r: edit_arrays(r, "masked", y=np.zeros(LENGTH, dtype=np.int64)), BAD_VECTOR),
        (lambda r: edit_arrays(r, "masked", y=np.zeros(LENGTH - 1, dtype=np.uint64)), BAD_VECTOR),
        (lambda r: edit_arrays(r, "masked", y=np.zeros((1, LENGTH), dtype=np.uint64)), BAD_VECTOR),
        (lambda r: edit_arrays(r, "masked", y=None), BAD_VECTOR),
        (lambda r: edit_config(r, "release", round=None), "release: missing key 'round'"),
    ],
    ids=["wrong-round", "wrong-codec", "float64", "int64", "short", "two-dimensional", "no-vector", "no-round"],
)
def test_bad_masked_replies_are_rejected(edit: Callable[[RecordDict], RecordDict], message: str) -> None:
    # Prepare
    record = edit(masked_reply().to_record())

    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        MaskedReply.from_record(record, 3, FINGERPRINT, LENGTH)


def test_a_masked_reply_about_another_public_set_is_a_fingerprint_mismatch() -> None:
    # Prepare
    record = edit_config(masked_reply().to_record(), "release", fingerprint="cd" * 32)

    # Execute / Assert
    with pytest.raises(FingerprintMismatch, match="public set fingerprint mismatch"):
        MaskedReply.from_record(record, 3, FINGERPRINT, LENGTH)


def unmask_record(**config: Any) -> RecordDict:
    record = SecAggUnmask(1, [7, 8, 9], [10], {7: b"\x01" * 160}).to_record()
    return edit_config(record, "secagg-unmask", **config)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (unmask_record(survivors=["7", "eight"]), "secagg-unmask: survivors and dropped must be lists of node ids"),
        (unmask_record(dropped=["1.5"]), "survivors and dropped must be lists of node ids"),
        (unmask_record(round=None), "secagg-unmask: missing key 'round'"),
        (edit_config(unmask_record(), "bundles", **{"7": "01" * 160}), "bundles: key '7' must be bytes, got str"),
    ],
    ids=["survivor-not-a-number", "dropped-not-an-integer", "no-round", "bundle-as-text"],
)
def test_bad_unmask_requests_are_rejected(record: RecordDict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggUnmask.from_record(record)


def test_survivors_given_as_one_string_are_rejected() -> None:
    # Prepare
    record = unmask_record(survivors="123")

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="lists of node ids"):
        SecAggUnmask.from_record(record)


def shares_record(**entries: Any) -> RecordDict:
    good = SecAggShares(1, {7: ("b", 11), 8: ("c", 12)}).to_record()
    return edit_config(good, "secagg-shares", **entries)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (shares_record(round=2), "secagg-shares: expected round 1"),
        (shares_record(**{"7": b"b" + bytes(65)}), "share '7' must be a kind byte and 66 bytes"),
        (shares_record(**{"7": b"b" + bytes(67)}), "share '7' must be a kind byte and 66 bytes"),
        (shares_record(**{"7": b"x" + bytes(66)}), "share '7' must be a kind byte and 66 bytes"),
        (shares_record(**{"node-7": b"b" + bytes(66)}), "share 'node-7' must be a kind byte and 66 bytes"),
        (shares_record(**{"7": "b" + "0" * 66}), "secagg-shares: key '7' must be bytes, got str"),
        (RecordDict({"shares": ConfigRecord({"round": 1})}), "missing record 'secagg-shares'"),
    ],
    ids=["wrong-round", "short-share", "long-share", "unknown-kind", "non-numeric-node", "share-as-text", "no-record"],
)
def test_malformed_shares_are_rejected(record: RecordDict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggShares.from_record(record, 1)
