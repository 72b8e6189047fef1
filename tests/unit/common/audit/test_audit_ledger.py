"""The hash-chained, signed JSONL log: chaining, reopening, torn-tail recovery, one signer, shared writers."""

from __future__ import annotations

import json
import tempfile
import threading
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.audit.canonical import canonical, sha256_hex
from common.audit.keys import Signer, verify_signature
from common.audit.ledger import GENESIS_PREV, OPENED, RECOVERED, Ledger, entry_hash, make_entry
from common.audit.verify import read_chain
from common.errors import AuditError

SAFE = 2**53 - 1  # RFC 8785 numbers are IEEE doubles: integers beyond this are refused by design
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-SAFE, SAFE) | st.floats(-SAFE, SAFE, allow_nan=False)
                | st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8,
)
BODIES = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=4)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate("coordinator")


def write_entries(path: Path, signer: Signer, count: int) -> Ledger:
    ledger = Ledger.open(path, signer, {"run_name": "test"})
    for number in range(count):
        ledger.append("note", {"number": number})
    return ledger


def assert_valid_chain(path: Path, key: str) -> list[dict]:
    chain = read_chain(path, key)
    assert chain.problems == []
    return [entry for _, entry in chain.entries]


def test_a_new_ledger_starts_with_a_signed_genesis_entry(tmp_path: Path, signer: Signer) -> None:
    # Execute
    ledger = Ledger.open(tmp_path / "ledger.jsonl", signer, {"run_name": "r1"})

    # Assert
    [genesis] = ledger.entries()
    assert (genesis["seq"], genesis["kind"], genesis["prev"]) == (0, OPENED, GENESIS_PREV)
    assert genesis["body"] == {"signer": "coordinator", "key": signer.public, "run_name": "r1"}
    assert genesis["hash"] == entry_hash(genesis) and genesis["key"] == signer.public
    verify_signature(signer.public, genesis["sig"], genesis["hash"].encode("ascii"), "genesis")
    assert ledger.path.read_bytes() == canonical(genesis) + b"\n"


def test_appends_link_each_entry_to_the_last(tmp_path: Path, signer: Signer) -> None:
    # Execute
    ledger = write_entries(tmp_path / "ledger.jsonl", signer, 4)

    # Assert
    entries = assert_valid_chain(ledger.path, signer.public)
    assert [entry["seq"] for entry in entries] == [0, 1, 2, 3, 4]
    assert len({entry["ledger"] for entry in entries}) == 1
    assert all(later["prev"] == earlier["hash"] for earlier, later in pairwise(entries))


@settings(max_examples=25, deadline=None)
@given(bodies=st.lists(BODIES, max_size=4))
def test_any_json_bodies_make_a_valid_chain_that_reads_back(bodies: list[dict]) -> None:
    # Prepare
    signer = Signer.generate("hospital-a")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "release-log.jsonl"

        # Execute
        ledger = Ledger.open(path, signer)
        appended = [ledger.append("release", body) for body in bodies]

        # Assert
        entries = assert_valid_chain(path, signer.public)
        assert entries[1:] == appended
        assert [json.loads(json.dumps(entry["body"])) for entry in entries[1:]] == [json.loads(json.dumps(b)) for b in bodies]


def test_reopening_continues_the_same_chain(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_entries(path, signer, 2)
    before = path.read_bytes()

    # Execute
    again = Ledger.open(path, signer, {"run_name": "ignored on reopen"})
    again.append("note", {"number": 2})

    # Assert
    entries = assert_valid_chain(path, signer.public)
    assert path.read_bytes().startswith(before)
    assert [entry["kind"] for entry in entries].count(OPENED) == 1
    assert len({entry["ledger"] for entry in entries}) == 1 and entries[-1]["seq"] == 3


@settings(max_examples=15, deadline=None)
@given(cut=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_torn_last_line_is_set_aside_and_recorded(cut: float) -> None:
    # Prepare
    signer = Signer.generate("coordinator")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.jsonl"
        ledger = write_entries(path, signer, 2)
        whole = path.read_bytes()
        last = ledger.entries()[-1]
        next_line = canonical(make_entry(signer, last["seq"] + 1, last["ledger"], "note", {"n": 9}, last["hash"])) + b"\n"
        torn = next_line[: max(1, int(cut * len(next_line)))]  # a crash mid-write: at most all but the newline
        with path.open("ab") as handle:
            handle.write(torn)

        # Execute
        Ledger.open(path, signer)

        # Assert
        entries = assert_valid_chain(path, signer.public)
        assert path.read_bytes().startswith(whole)
        recovered = entries[-1]
        assert recovered["kind"] == RECOVERED and recovered["prev"] == last["hash"] and recovered["seq"] == 3
        assert recovered["body"]["torn_bytes"] == len(torn)
        assert recovered["body"]["torn_sha256"] == sha256_hex(torn)
        aside = path.with_name(recovered["body"]["set_aside"])
        assert aside.name.startswith("ledger.jsonl.torn-") and aside.read_bytes() == torn


def test_an_append_after_a_crash_recovers_the_tail_first(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    ledger = write_entries(path, signer, 1)
    with path.open("ab") as handle:
        handle.write(b'{"body":{"numb')

    # Execute
    appended = ledger.append("note", {"number": 1})

    # Assert
    entries = assert_valid_chain(path, signer.public)
    assert [entry["kind"] for entry in entries] == [OPENED, "note", RECOVERED, "note"]
    assert entries[-1] == appended


def test_a_torn_first_entry_starts_the_log_afresh(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"body":{"key":"ed25519:')

    # Execute
    Ledger.open(path, signer)

    # Assert
    [genesis] = assert_valid_chain(path, signer.public)
    assert genesis["kind"] == OPENED
    [aside] = tmp_path.glob("ledger.jsonl.torn-*")
    assert aside.read_bytes() == b'{"body":{"key":"ed25519:'


def test_a_log_signed_by_another_key_is_refused(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_entries(path, signer, 1)
    before = path.read_bytes()
    intruder = Signer.generate("intruder")

    # Execute
    with pytest.raises(AuditError) as error:
        Ledger.open(path, intruder)

    # Assert
    assert "signed by 'coordinator'" in str(error.value) and "not by 'intruder'" in str(error.value)
    assert path.read_bytes() == before


def test_a_torn_log_signed_by_another_key_is_refused_and_left_untouched(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_entries(path, signer, 1)
    with path.open("ab") as handle:
        handle.write(b'{"body":{"numb')
    before = path.read_bytes()

    # Execute
    with pytest.raises(AuditError):
        Ledger.open(path, Signer.generate("intruder"))

    # Assert
    assert path.read_bytes() == before


def test_a_last_line_that_is_not_an_entry_is_refused(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_entries(path, signer, 1)
    with path.open("ab") as handle:
        handle.write(b'{"seq": 2}\n')

    # Execute
    with pytest.raises(AuditError) as error:
        Ledger.open(path, signer)

    # Assert
    assert "not a whole ledger entry" in str(error.value) and "fedstill audit verify" in str(error.value)


def test_appending_to_an_unopened_empty_file_is_refused(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    ledger = Ledger(tmp_path / "ledger.jsonl", signer)

    # Execute
    with pytest.raises(AuditError) as error:
        ledger.append("note", {})

    # Assert
    assert "open it with Ledger.open first" in str(error.value)


def test_two_ledger_objects_on_one_file_keep_one_chain(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "release-log.jsonl"
    first, second = Ledger.open(path, signer), Ledger.open(path, signer)

    # Execute
    for number in range(3):
        first.append("note", {"by": "first", "number": number})
        second.append("note", {"by": "second", "number": number})

    # Assert
    entries = assert_valid_chain(path, signer.public)
    assert [entry["seq"] for entry in entries] == list(range(7))
    assert [entry["body"].get("by") for entry in entries[1:]] == ["first", "second"] * 3


def test_concurrent_writers_keep_one_chain(tmp_path: Path, signer: Signer) -> None:
    # Prepare
    path = tmp_path / "release-log.jsonl"
    Ledger.open(path, signer)

    def write(name: str) -> None:
        ledger = Ledger.open(path, signer)
        for number in range(8):
            ledger.append("note", {"by": name, "number": number})

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a", "b")]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Assert
    entries = assert_valid_chain(path, signer.public)
    assert len(entries) == 17
    for name in ("a", "b"):
        assert [entry["body"]["number"] for entry in entries if entry["body"].get("by") == name] == list(range(8))
