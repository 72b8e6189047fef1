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
from common.messages import (
    MaskedReply,
    SecAggBundles,
    SecAggComplaints,
    SecAggConsistency,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
    SecAggShares,
    SecAggSignature,
    SecAggUnmask,
)
from common.secagg.protocol import ClientSecrets, Roster, RosterEntry
from common.secagg.shamir import PRIME

FINGERPRINT = "ab" * 32
LENGTH = 13  # 4 samples x 3 classes + the weight
NODES = [7, 2**63 + 5, 2**64 - 1]  # Flower node ids are uint64: past int64 too


def new_roster(nodes: list[int] = NODES) -> Roster:
    keys = [ClientSecrets.generate().public_keys() for _ in nodes]
    return {node: RosterEntry(i, *pair, f"institution-{i}", "c2lnbmF0dXJl" * i)
            for i, (node, pair) in enumerate(zip(sorted(nodes), keys, strict=True), start=1)}


ROSTER = new_roster()


def over_the_wire(record: RecordDict) -> RecordDict:
    """The record as the other side gets it: through Flower's protobuf serialisation."""
    return recorddict_from_proto(recorddict_to_proto(record))


def masked_reply(masked: np.ndarray | None = None) -> MaskedReply:
    masked = np.random.default_rng(0).integers(0, 2**64, size=LENGTH, dtype=np.uint64) if masked is None else masked
    return MaskedReply(round=3, fingerprint=FINGERPRINT, masked=masked, train_loss=0.4, teacher_accuracy=-1.0,
                       teacher_params=1000, teacher_rounds=3)


# --- round trips -----------------------------------------------------------------------------------------------

SIGNATURES = {node: f"sig-{i}" for i, node in enumerate(NODES)}
ROUND_TRIPS: dict[str, tuple[Any, Callable[[RecordDict], Any]]] = {
    "setup": (SecAggSetup(3), SecAggSetup.from_record),
    "keys": (SecAggKeys(3, *ClientSecrets.generate().public_keys(), "hospital-a", "c2lnbmF0dXJl"),
             lambda r: SecAggKeys.from_record(r, 3)),
    "roster-mean": (SecAggRoster(3, 2, False, ROSTER), SecAggRoster.from_record),
    "roster-weighted": (SecAggRoster(3, 3, True, ROSTER), SecAggRoster.from_record),
    "bundles": (SecAggBundles(3, {node: bytes([i]) * 160 for i, node in enumerate(NODES)}, SIGNATURES, b"\x09" * 32),
                lambda r: SecAggBundles.from_record(r, 3, ROSTER)),
    "inbox": (SecAggInbox(3, {node: bytes([i]) * 160 for i, node in enumerate(NODES)}, SIGNATURES), SecAggInbox.from_record),
    "complaints": (SecAggComplaints(3, [2**64 - 1, 7]), lambda r: SecAggComplaints.from_record(r, 3, NODES)),
    "complaints-none": (SecAggComplaints(3, []), lambda r: SecAggComplaints.from_record(r, 3, NODES)),
    "consistency": (SecAggConsistency(3, [7, 2**64 - 1]), SecAggConsistency.from_record),
    "signature": (SecAggSignature(3, "c2lnbmF0dXJl"), lambda r: SecAggSignature.from_record(r, 3)),
    "unmask": (SecAggUnmask(3, [7, 2**64 - 1], {7: "a", 2**64 - 1: "b"}), SecAggUnmask.from_record),
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
    assert parsed == message if name != "complaints" else parsed.accused == sorted(message.accused)


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
    names = data.draw(st.lists(st.text(max_size=20), min_size=len(nodes), max_size=len(nodes)))
    roster = {node: RosterEntry(i, keys[2 * i - 2], keys[2 * i - 1], names[i - 1], names[-i])
              for i, node in enumerate(sorted(nodes), start=1)}
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
        ({"signature": None}, "secagg-keys: missing key 'signature'"),
        ({"institution": b"hospital-a"}, "secagg-keys: key 'institution' must be str, got bytes"),
    ],
    ids=["wrong-round", "short-mask-key", "long-share-key", "key-as-text", "missing-share-key", "unsigned",
         "institution-as-bytes"],
)
def test_bad_keys_are_rejected(changes: dict[str, Any], message: str) -> None:
    # Prepare
    keys = SecAggKeys(1, *ClientSecrets.generate().public_keys(), "hospital-a", "c2lnbmF0dXJl")
    record = edit_config(keys.to_record(), "secagg-keys", **changes)

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
        ({"indices": np.array([0, 1, 2], dtype=np.int64)}, {}, "distinct positive Shamir points"),  # point 0: the secret
        ({"indices": None}, {}, "secagg-roster: unreadable"),
        ({}, {"threshold": 1}, r"threshold in \[2, 3\], got 1"),
        ({}, {"threshold": 4}, r"threshold in \[2, 3\], got 4"),
        ({}, {"weighted": 1}, "secagg: key 'weighted' must be bool, got int"),
        ({}, {"round": None}, "secagg: missing key 'round'"),
        ({}, {"signatures": ["a", "b"]}, "secagg: 'signatures' must list one string per roster node"),
        ({}, {"institutions": None}, "secagg: 'institutions' must list one string per roster node"),
    ],
    ids=["short-keys", "too-few-keys", "keys-not-uint8", "too-few-indices", "repeated-index", "point-zero", "no-indices",
         "threshold-1", "threshold-above-n", "weighted-not-bool", "no-round", "too-few-signatures", "no-institutions"],
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


def bundles_record(bundles: dict[str, Any], round_: int = 1, signatures: dict[str, Any] | None = None,
                   commitment: bytes = b"\x09" * 32) -> RecordDict:
    signatures = {node: "c2ln" for node in bundles} if signatures is None else signatures
    return RecordDict({"secagg-bundles": ConfigRecord({"round": round_, "commitment": commitment}),
                       "bundles": ConfigRecord(bundles), "bundle-signatures": ConfigRecord(signatures)})


FULL_BUNDLES = {str(node): b"\x05" * 160 for node in NODES}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (bundles_record(FULL_BUNDLES, round_=2), "secagg-bundles: expected round 1"),
        (bundles_record({k: v for k, v in FULL_BUNDLES.items() if k != str(NODES[1])}),
         "bundles: expected one share bundle for every node of the roster"),
        (bundles_record({**FULL_BUNDLES, "99": b"\x05" * 160}), "expected one share bundle for every node"),
        (bundles_record({**FULL_BUNDLES, str(NODES[0]): "05" * 160}), "bundles: key '7' must be bytes, got str"),
        (RecordDict({"secagg-bundles": ConfigRecord({"round": 1, "commitment": b"\x09" * 32})}), "missing record 'bundles'"),
        (bundles_record(FULL_BUNDLES, signatures={str(NODES[0]): "c2ln"}), "each with its signature"),
        (bundles_record(FULL_BUNDLES, commitment=b"\x09" * 31), "the commitment must be 32 bytes"),
    ],
    ids=["wrong-round", "member-missing", "stranger-added", "bundle-as-text", "no-bundles", "unsigned", "short-commitment"],
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
    record = SecAggUnmask(1, [7, 8, 9], {7: "c2ln"}).to_record()
    return edit_config(record, "secagg-unmask", **config)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (unmask_record(survivors=["7", "eight"]), "secagg-unmask: 'survivors' must be a list of distinct node ids"),
        (unmask_record(survivors=["7", "7"]), "'survivors' must be a list of distinct node ids"),
        (unmask_record(survivors=["1.5"]), "'survivors' must be a list of distinct node ids"),
        (unmask_record(survivors="123"), "'survivors' must be a list of node ids, got str"),
        (unmask_record(round=None), "secagg-unmask: missing key 'round'"),
        (edit_config(unmask_record(), "signatures", **{"7": b"sig"}), "signatures: key '7' must be str, got bytes"),
        (edit_config(unmask_record(), "signatures", **{"seven": "sig"}), "signatures: keys must be node ids"),
    ],
    ids=["survivor-not-a-number", "repeated-survivor", "survivor-not-an-integer", "survivors-as-one-string", "no-round",
         "signature-as-bytes", "signer-not-a-node"],
)
def test_bad_unmask_requests_are_rejected(record: RecordDict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggUnmask.from_record(record)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (SecAggComplaints(2, [7]).to_record(), "secagg-complaints: expected round 1"),
        (SecAggComplaints(1, [99]).to_record(), "a complaint may name only senders of the bundles relayed"),
        (edit_config(SecAggComplaints(1, []).to_record(), "secagg-complaints", accused="7"), "must be a list of node ids"),
    ],
    ids=["wrong-round", "names-a-stranger", "accused-as-one-string"],
)
def test_bad_complaints_are_rejected(record: RecordDict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(MessageFormatError, match=message):
        SecAggComplaints.from_record(record, 1, NODES)


def test_an_inbox_bundle_without_its_signature_and_a_signature_of_another_round_are_rejected() -> None:
    # Prepare
    inbox = SecAggInbox(1, {7: b"\x01" * 160, 8: b"\x02" * 160}, {7: "c2ln"})

    # Execute / Assert
    with pytest.raises(MessageFormatError, match="every bundle needs its sender's signature"):
        SecAggInbox.from_record(inbox.to_record())
    with pytest.raises(MessageFormatError, match="secagg-signature: expected round 2"):
        SecAggSignature.from_record(SecAggSignature(1, "c2ln").to_record(), 2)


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
