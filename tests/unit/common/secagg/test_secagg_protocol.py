"""Unit tests of the secure-aggregation protocol as pure functions: common/secagg/{shamir,masking,protocol}.py.
(Property tests of what shares and masked vectors reveal are in test_secagg_properties.py.)

Every test runs the real cryptography (X25519, HKDF, AES-GCM, ChaCha20, Shamir over GF(2^521 - 1)) for
a handful of in-process clients; only the network is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import AuditError, ConfigError
from common.secagg import protocol
from common.secagg.masking import MAX_ABS, SCALE_BITS, dequantise, derive_seed, pairwise_mask, prg, public_key_problem, quantise
from common.secagg.protocol import (
    ClientSecrets,
    Roster,
    client_masked_input,
    client_open_bundles,
    client_share_bundles,
    client_unmask,
    make_roster,
    seed_commitment,
    server_sum,
)
from common.secagg.shamir import MAX_SECRET_BYTES, PRIME, reconstruct, reconstruct_verified, split

CONTEXT = b"fedstill/7/1"  # client.secure.context_bytes(7, 1)
STEP = 2.0 ** -(SCALE_BITS + 1)  # the rounding error of one quantised entry
NODE_IDS = st.integers(min_value=1, max_value=2**64 - 1)  # Flower node ids are uint64


@dataclass
class Shared:
    """The clients after steps 1-3: their secrets, the roster, their self seeds (and the server's commitments to
    them), the bundles addressed to each and the shares each opened from them."""

    secrets: dict[int, ClientSecrets]
    roster: Roster
    threshold: int
    seeds: dict[int, bytes]
    commitments: dict[int, bytes]
    inbox: dict[int, dict[int, bytes]]  # destination node -> source node -> bundle
    opened: dict[int, dict[int, tuple[int, int]]]  # destination node -> source node -> (b-share, c-share)


def share(nodes: list[int], threshold: int, context: bytes = CONTEXT) -> Shared:
    """Steps 1 to 3 for `nodes`: keys, roster, every client's sealed share bundles, relayed and opened."""
    secrets = {node: ClientSecrets.generate() for node in nodes}
    roster = make_roster({node: s.public_keys() for node, s in secrets.items()})
    seeds, outboxes = {}, {}
    for node in nodes:
        seeds[node], outboxes[node] = client_share_bundles(node, secrets[node], roster, threshold, context)
    inbox = {dst: {src: outboxes[src][dst] for src in nodes} for dst in nodes}
    opened = {dst: client_open_bundles(dst, secrets[dst], roster, inbox[dst], context)[0] for dst in nodes}
    commitments = {node: seed_commitment(seed, context) for node, seed in seeds.items()}
    return Shared(secrets, roster, threshold, seeds, commitments, inbox, opened)


def mask(shared: Shared, inputs: dict[int, np.ndarray], context: bytes = CONTEXT) -> dict[int, np.ndarray]:
    """Step 3 for the clients in `inputs` (the others dropped after sharing)."""
    return {node: client_masked_input(node, shared.secrets[node], shared.roster, shared.seeds[node], x, context)
            for node, x in inputs.items()}


def unmask(shared: Shared, responders: set[int], survivors: set[int]) -> dict:
    """Step 6 for `responders` (survivors that still answer)."""
    return {node: client_unmask(node, shared.opened[node], set(shared.roster), survivors, shared.threshold)
            for node in responders}


def open_sum(shared: Shared, masked: dict[int, np.ndarray], answers: dict, context: bytes = CONTEXT) -> np.ndarray:
    """The server's step 6: the opened sum (uint64)."""
    return server_sum(masked, answers, shared.roster, shared.threshold, context, shared.commitments).total


def plain_sum(inputs: dict[int, np.ndarray]) -> np.ndarray:
    """The sum the server must open: the quantised inputs added mod 2^64."""
    total = np.zeros(len(next(iter(inputs.values()))), dtype=np.uint64)
    for x in inputs.values():
        total += quantise(x)
    return total


def vectors(nodes: list[int], length: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {node: rng.normal(scale=10.0, size=length) for node in nodes}


# --- the sum ---------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_server_opens_exactly_the_survivors_sum_whoever_drops(data: st.DataObject) -> None:
    # Prepare
    n = data.draw(st.integers(min_value=3, max_value=8), label="n")
    threshold = data.draw(st.integers(min_value=2, max_value=n), label="threshold")
    nodes = data.draw(st.lists(NODE_IDS, min_size=n, max_size=n, unique=True), label="nodes")
    dropped = data.draw(st.sets(st.sampled_from(nodes), max_size=n - threshold), label="dropped after sharing")
    survivors = set(nodes) - dropped
    silent = data.draw(st.sets(st.sampled_from(sorted(survivors)), max_size=len(survivors) - threshold),
                       label="survivors silent in unmask")
    seed = data.draw(st.integers(min_value=0, max_value=2**32 - 1), label="seed")
    inputs = {node: x for node, x in vectors(nodes, 17, seed).items() if node in survivors}
    shared = share(nodes, threshold)

    # Execute
    answers = unmask(shared, survivors - silent, survivors)
    total = open_sum(shared, mask(shared, inputs), answers)

    # Assert
    assert total.dtype == np.uint64
    assert np.array_equal(total, plain_sum(inputs))
    error = np.abs(dequantise(total) - np.sum(list(inputs.values()), axis=0))
    assert error.max() <= len(inputs) * STEP + 1e-12


@pytest.mark.parametrize("n", range(3, 9))
def test_float32_soft_labels_sum_within_the_stated_quantisation_error(n: int) -> None:
    # Prepare
    nodes = [1000 + i for i in range(n)]
    rng = np.random.default_rng(n)
    probs = {node: rng.dirichlet(np.ones(10), size=20).astype(np.float32).reshape(-1) for node in nodes}
    shared = share(nodes, n // 2 + 1)

    # Execute
    answers = unmask(shared, set(nodes), set(nodes))
    total = open_sum(shared, mask(shared, probs), answers)

    # Assert
    exact = np.sum([p.astype(np.float64) for p in probs.values()], axis=0)  # float32 inputs are exact in float64
    assert np.abs(dequantise(total) - exact).max() <= n * STEP


def test_clients_dropping_after_sharing_leave_the_exact_sum_of_the_survivors() -> None:
    # Prepare
    nodes = [11, 12, 13, 14, 15, 16]
    shared = share(nodes, threshold=3)
    survivors = {11, 13, 15, 16}  # 12 and 14 shared, then sent no masked vector
    inputs = {node: x for node, x in vectors(nodes, 50, seed=1).items() if node in survivors}

    # Execute
    total = open_sum(shared, mask(shared, inputs), unmask(shared, survivors, survivors))

    # Assert
    assert np.array_equal(total, plain_sum(inputs))


def test_survivors_silent_during_unmask_do_not_stop_the_sum_while_threshold_answer() -> None:
    # Prepare
    nodes = [11, 12, 13, 14, 15, 16]
    shared = share(nodes, threshold=4)
    survivors = {11, 12, 13, 14, 16}  # 15 dropped after sharing
    inputs = {node: x for node, x in vectors(nodes, 50, seed=2).items() if node in survivors}

    # Execute
    answers = unmask(shared, {11, 13, 14, 16}, survivors)  # 12 sent its masked vector, then went silent
    total = open_sum(shared, mask(shared, inputs), answers)

    # Assert
    assert np.array_equal(total, plain_sum(inputs))  # 12's input is in the sum, its self mask rebuilt by the others


@pytest.mark.parametrize("dropped", [set(), {15}], ids=["no-dropout", "one-dropped"])
def test_fewer_than_threshold_answers_is_an_audit_error(dropped: set[int]) -> None:
    # Prepare
    nodes = [11, 12, 13, 14, 15]
    shared = share(nodes, threshold=3)
    survivors = set(nodes) - dropped
    inputs = {node: x for node, x in vectors(nodes, 8, seed=3).items() if node in survivors}
    masked = mask(shared, inputs)
    answers = unmask(shared, {11, 12}, survivors)

    # Execute / Assert
    with pytest.raises(AuditError, match="2 shares, 3 are needed"):
        open_sum(shared, masked, answers)


# --- what one masked vector reveals ---------------------------------------------------------------------------

def uniformity(y: np.ndarray, x: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean of y / 2^64, its correlation with x, and the fraction of entries with each of the 64 bits set."""
    unit = y.astype(np.float64) / 2.0**64
    bits = ((y[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
    return float(unit.mean()), float(np.corrcoef(unit, x)[0, 1]), bits


def test_each_masked_vector_alone_looks_uniform_and_unrelated_to_its_input() -> None:
    # Prepare
    nodes = [21, 22, 23, 24]
    length = 4096
    ramp = np.linspace(0.0, 1.0, length)
    probs = np.random.default_rng(4).dirichlet(np.ones(8), 512).reshape(-1)
    inputs = {21: ramp, 22: np.zeros(length), 23: ramp, 24: probs}
    shared = share(nodes, threshold=3)

    # Execute
    masked = mask(shared, inputs)

    # Assert
    for node, y in masked.items():
        mean, correlation, bits = uniformity(y, inputs[node] + ramp)  # ramp: x may be constant
        assert abs(mean - 0.5) < 0.03, node
        assert abs(correlation) < 0.1, node
        assert np.all(np.abs(bits - 0.5) < 0.05), node
        assert not np.any(y == quantise(inputs[node])), node
    assert not np.any(masked[21] == masked[23])  # equal inputs, unrelated masked vectors


def test_removing_a_survivors_self_mask_still_leaves_its_pairwise_masks() -> None:
    # Prepare: the server rebuilds every survivor's self seed b in step 4; that alone must not open y_i
    nodes = [21, 22, 23]
    length = 4096
    x = np.linspace(0.0, 1.0, length)
    shared = share(nodes, threshold=2)
    y = mask(shared, {node: x for node in nodes})[21]

    # Execute
    without_self_mask = y - prg(shared.seeds[21], length)

    # Assert
    mean, correlation, _ = uniformity(without_self_mask, x)
    assert abs(mean - 0.5) < 0.03 and abs(correlation) < 0.1
    assert not np.any(without_self_mask == quantise(x))


# --- step 6 refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("survivors", "message"),
    [
        ({11, 12}, "2 survivors, the threshold is 3"),
        ({12, 13, 14}, "this node among them"),  # asked while it is itself not surviving
        ({11, 12, 13, 99}, "must be members of the set this node masked with"),  # 99 is no member
    ],
    ids=["below-threshold", "asker-not-a-survivor", "outside-the-set"],
)
def test_a_client_refuses_an_unmask_request_that_could_open_one_input(survivors: set[int], message: str) -> None:
    # Prepare
    shared = share([11, 12, 13, 14, 15], threshold=3)

    # Execute / Assert
    with pytest.raises(AuditError, match=message):
        client_unmask(11, shared.opened[11], set(shared.roster), survivors, 3)


SHARED_FIVE = share([31, 32, 33, 34, 35], threshold=3)  # made once for the property test below


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_a_valid_unmask_answer_gives_b_for_survivors_c_for_dropped_never_both(data: st.DataObject) -> None:
    # Prepare
    nodes = [31, 32, 33, 34, 35]
    shared = SHARED_FIVE
    dropped = data.draw(st.sets(st.sampled_from(nodes[1:]), max_size=2))
    survivors = set(nodes) - dropped

    # Execute
    answer = client_unmask(31, shared.opened[31], set(nodes), survivors, 3)

    # Assert
    kinds = {node: kind for node, (kind, _) in answer.items()}
    assert kinds == {node: "b" if node in survivors else "c" for node in nodes}
    assert all(0 <= value < PRIME for _, value in answer.values())


def test_a_missing_bundle_stops_the_unmask_answer_naming_its_source() -> None:
    # Prepare
    shared = share([11, 12, 13], threshold=2)
    opened = {src: pair for src, pair in shared.opened[11].items() if src != 13}

    # Execute / Assert
    with pytest.raises(AuditError, match=r"no opened share bundle from nodes \[13\]"):
        client_unmask(11, opened, {11, 12, 13}, {11, 12, 13}, 2)


# --- the bundles ---------------------------------------------------------------------------------------------------

def opened_by_11(shared: Shared, inbox: dict[int, bytes], context: bytes = CONTEXT) -> tuple[list[int], list[int]]:
    opened, failed = client_open_bundles(11, shared.secrets[11], shared.roster, inbox, context)
    return sorted(opened), failed


@pytest.mark.parametrize("position", [0, 11, 12, 80, -1], ids=["nonce", "nonce-end", "ciphertext", "middle", "tag"])
def test_a_tampered_bundle_does_not_open_and_names_its_source(position: int) -> None:
    # Prepare
    shared = share([11, 12, 13], threshold=2)
    bundle = bytearray(shared.inbox[11][12])
    bundle[position] ^= 0x01

    # Execute
    opened, failed = opened_by_11(shared, {**shared.inbox[11], 12: bytes(bundle)})

    # Assert
    assert (opened, failed) == ([11, 13], [12])


@pytest.mark.parametrize("bundle", [b"", b"\x00" * 11, b"\x00" * 40], ids=["empty", "short-nonce", "short"])
def test_a_truncated_bundle_does_not_open_and_does_not_crash(bundle: bytes) -> None:
    # Prepare
    shared = share([11, 12, 13], threshold=2)

    # Execute / Assert
    assert opened_by_11(shared, {**shared.inbox[11], 13: bundle}) == ([11, 12], [13])


def test_bundles_are_bound_to_their_round_and_run() -> None:
    # Prepare: the same keys and roster, bundles sealed in round 1, opened as if in round 2 or another run
    shared = share([11, 12, 13], threshold=2, context=b"fedstill/7/1")

    # Execute / Assert
    for context in (b"fedstill/7/2", b"fedstill/8/1"):
        assert opened_by_11(shared, shared.inbox[11], context) == ([], [11, 12, 13])


def test_a_bundle_opens_only_for_its_destination_and_from_its_source() -> None:
    # Prepare
    shared = share([11, 12, 13], threshold=2)
    meant_for_12 = {**shared.inbox[11], 13: shared.inbox[12][13]}
    relabelled = {**shared.inbox[11], 12: shared.inbox[11][13], 13: shared.inbox[11][12]}

    # Execute / Assert
    assert opened_by_11(shared, meant_for_12) == ([11, 12], [13])
    assert opened_by_11(shared, relabelled) == ([11], [12, 13])


def test_a_bundle_that_opens_to_no_valid_share_is_refused() -> None:
    # Prepare: sealed with the right key, but its shares lie outside GF(2^521 - 1)
    shared = share([11, 12, 13], threshold=2)
    entry12, entry11 = shared.roster[12], shared.roster[11]
    garbage = protocol._seal(shared.secrets[12], entry12, entry11, CONTEXT, PRIME, PRIME + 1)

    # Execute / Assert
    assert opened_by_11(shared, {**shared.inbox[11], 12: garbage}) == ([11, 13], [12])


def test_masks_made_under_another_context_do_not_cancel() -> None:
    # Prepare
    nodes = [11, 12, 13]
    shared = share(nodes, threshold=2)
    inputs = vectors(nodes, 16, seed=5)
    masked = mask(shared, inputs)
    masked[13] = mask(shared, {13: inputs[13]}, context=b"fedstill/7/2")[13]

    # Execute
    total = open_sum(shared, masked, unmask(shared, set(nodes), set(nodes)))

    # Assert
    assert not np.any(total == plain_sum(inputs))


# --- altered shares at unmasking -------------------------------------------------------------------------------

def test_altered_shares_are_skipped_and_their_responder_named_while_threshold_honest_ones_remain() -> None:
    # Prepare: five clients, threshold 3; one survivor (12) returns altered shares for every source, another (14)
    # dropped after sharing, so its mask key is rebuilt too
    nodes = [11, 12, 13, 14, 15]
    shared = share(nodes, threshold=3)
    survivors = {11, 12, 13, 15}
    inputs = {node: x for node, x in vectors(nodes, 9, seed=6).items() if node in survivors}
    answers = unmask(shared, survivors, survivors)
    answers[12] = {source: (kind, (value + 1) % PRIME) for source, (kind, value) in answers[12].items()}

    # Execute
    opened = server_sum(mask(shared, inputs), answers, shared.roster, 3, CONTEXT, shared.commitments)

    # Assert
    assert np.array_equal(opened.total, plain_sum(inputs))
    assert opened.altered == {12: sorted(nodes)}


def test_a_self_seed_without_its_commitment_is_not_accepted() -> None:
    # Prepare: the server holds no (or a wrong) commitment to one survivor's seed: no subset is accepted
    nodes = [11, 12, 13]
    shared = share(nodes, threshold=2)
    inputs = vectors(nodes, 4, seed=7)
    answers = unmask(shared, set(nodes), set(nodes))

    # Execute / Assert
    with pytest.raises(AuditError, match="node 12's self seed: .*no 2 of the 3 shares give the committed secret"):
        server_sum(mask(shared, inputs), answers, shared.roster, 2, CONTEXT, {**shared.commitments, 12: bytes(32)})


# --- roster and steps 2-3 preconditions ---------------------------------------------------------------------------

def test_the_roster_indexes_clients_by_sorted_node_id() -> None:
    # Prepare
    keys = {node: ClientSecrets.generate().public_keys() for node in (2**64 - 1, 5, 300)}

    # Execute
    roster = make_roster(keys)

    # Assert
    assert {node: entry.index for node, entry in roster.items()} == {5: 1, 300: 2, 2**64 - 1: 3}
    assert all((entry.mask_key, entry.share_key) == keys[node] for node, entry in roster.items())


@pytest.mark.parametrize("bad", [bytes(32), (1).to_bytes(32, "little"), (2**255 - 19).to_bytes(32, "little"),
                                 (2**255 - 18).to_bytes(32, "little"), b"\xff" * 32],
                         ids=["zero", "one", "p", "p-plus-one", "high-bit"])
def test_the_roster_refuses_duplicated_short_small_order_or_non_canonical_keys(bad: bytes) -> None:
    # Prepare
    a, b = ClientSecrets.generate().public_keys(), ClientSecrets.generate().public_keys()

    # Execute / Assert
    with pytest.raises(AuditError, match="distinct valid X25519 keys") as caught:
        make_roster({1: a, 2: a})  # one client echoes another's keys
    assert caught.value.check == "secagg-key"
    with pytest.raises(AuditError, match="distinct valid X25519 keys"):
        make_roster({1: (a[0], a[0]), 2: b})  # one key used for both purposes
    with pytest.raises(AuditError, match="distinct valid X25519 keys"):
        make_roster({1: a, 2: (b[0][:31], b[1])})
    with pytest.raises(AuditError, match="distinct valid X25519 keys"):
        make_roster({1: a, 2: (bad, b[1])})
    assert public_key_problem(bad) != "" and public_key_problem(a[0]) == ""


@pytest.mark.parametrize("threshold", [1, 4])
def test_shares_need_a_threshold_between_two_and_the_roster_size(threshold: int) -> None:
    # Prepare
    shared = share([11, 12, 13], threshold=2)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"threshold must be in \[2, 3 clients\]"):
        client_share_bundles(11, shared.secrets[11], shared.roster, threshold, CONTEXT)


def test_a_node_outside_the_roster_takes_no_step() -> None:
    # Prepare
    shared = share([11, 12, 13], threshold=2)
    stranger = ClientSecrets.generate()

    # Execute / Assert
    with pytest.raises(AuditError, match="node 99 is not in this round's roster"):
        client_share_bundles(99, stranger, shared.roster, 2, CONTEXT)
    with pytest.raises(AuditError, match="node 99 is not in this round's roster"):
        client_masked_input(99, stranger, shared.roster, b"\x00" * 32, np.zeros(3), CONTEXT)


# --- masking primitives -------------------------------------------------------------------------------------------

def test_pairwise_masks_cancel_and_seeds_agree_from_both_sides() -> None:
    # Prepare
    a, b = ClientSecrets.generate(), ClientSecrets.generate()
    key_a, key_b = (X25519PrivateKey.from_private_bytes(s.mask_private) for s in (a, b))

    # Execute
    seed_ab = derive_seed(key_a, b.public_keys()[0], b"info")
    seed_ba = derive_seed(key_b, a.public_keys()[0], b"info")

    # Assert
    assert seed_ab == seed_ba and len(seed_ab) == 32
    assert derive_seed(key_a, b.public_keys()[0], b"other info") != seed_ab
    assert np.array_equal(pairwise_mask(1, 2, seed_ab, 100) + pairwise_mask(2, 1, seed_ab, 100), np.zeros(100, np.uint64))
    assert np.array_equal(prg(seed_ab, 10), prg(seed_ab, 100)[:10])
    assert not np.array_equal(prg(seed_ab, 10), prg(bytes(32), 10))


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_prg_seeds_are_32_bytes(length: int) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"PRG seeds are 32 bytes, got {length}"):
        prg(bytes(length), 4)


@pytest.mark.parametrize(
    "value", [np.nan, np.inf, -np.inf, np.nextafter(MAX_ABS, np.inf), -2 * MAX_ABS, 1e300],
    ids=["nan", "inf", "-inf", "just-above-bound", "negative-huge", "1e300"],
)
def test_quantise_refuses_non_finite_and_out_of_range_values(value: float) -> None:
    # Prepare
    values = np.array([0.25, value, 0.5])

    # Execute / Assert
    with pytest.raises(ConfigError, match="finite and within"):
        quantise(values)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(min_value=-MAX_ABS, max_value=MAX_ABS), min_size=1, max_size=20))
def test_quantise_round_trips_within_half_a_step(values: list[float]) -> None:
    # Prepare
    x = np.array(values)

    # Execute
    q = quantise(x)

    # Assert
    assert q.dtype == np.uint64
    assert np.all(np.abs(dequantise(q) - x) <= STEP)


def test_negative_values_wrap_mod_two_to_the_64() -> None:
    # Execute
    q = quantise(np.array([-1.0, 1.0, -MAX_ABS]))

    # Assert
    assert int(q[0]) == 2**64 - 2**SCALE_BITS and int(q[1]) == 2**SCALE_BITS
    assert (int(q[0]) + int(q[1])) % 2**64 == 0
    assert dequantise(q).tolist() == [-1.0, 1.0, -MAX_ABS]


# --- Shamir ------------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=1, max_size=MAX_SECRET_BYTES))
def test_any_threshold_shares_reconstruct_the_secret(data: st.DataObject, secret: bytes) -> None:
    # Prepare
    n = data.draw(st.integers(min_value=2, max_value=8), label="n")
    threshold = data.draw(st.integers(min_value=2, max_value=n), label="threshold")
    xs = data.draw(st.lists(st.integers(min_value=1, max_value=2**64), min_size=n, max_size=n, unique=True), label="xs")
    shares = split(secret, threshold, xs)
    chosen = data.draw(st.lists(st.sampled_from(xs), min_size=threshold, max_size=n, unique=True), label="chosen")

    # Execute
    recovered = reconstruct({x: shares[x] for x in chosen}, threshold)

    # Assert
    assert recovered == secret


@settings(max_examples=60, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=1, max_size=MAX_SECRET_BYTES))
def test_fewer_than_threshold_shares_do_not_give_the_secret(data: st.DataObject, secret: bytes) -> None:
    # Prepare
    n = data.draw(st.integers(min_value=3, max_value=8), label="n")
    threshold = data.draw(st.integers(min_value=3, max_value=n), label="threshold")
    shares = split(secret, threshold, list(range(1, n + 1)))
    chosen = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=threshold - 1, max_size=threshold - 1,
                                unique=True), label="chosen")
    fewer = {x: shares[x] for x in chosen}

    # Execute / Assert
    with pytest.raises(AuditError, match=f"{threshold - 1} shares, {threshold} are needed"):
        reconstruct(fewer, threshold)
    try:
        guessed = reconstruct(fewer, threshold - 1)  # a lying threshold: interpolates the wrong polynomial
    except AuditError:
        return
    assert guessed != secret


@pytest.mark.parametrize("secret", [b"\x00", b"\x00" * MAX_SECRET_BYTES, b"\x00\x00\x01", b"\x00" + b"\xff" * 31,
                                    b"\xff" * MAX_SECRET_BYTES],
                         ids=["zero", "64-zeros", "two-leading-zeros", "x25519-like", "largest"])
def test_secrets_with_leading_zero_bytes_round_trip(secret: bytes) -> None:
    # Prepare
    shares = split(secret, 3, [1, 2, 3, 4])

    # Execute
    recovered = reconstruct({x: shares[x] for x in (2, 3, 4)}, 3)

    # Assert
    assert recovered == secret


@pytest.mark.parametrize(
    ("secret", "threshold", "xs", "message"),
    [
        (b"", 2, [1, 2], "secrets are 1..64 bytes, got 0"),
        (b"x" * 65, 2, [1, 2], "secrets are 1..64 bytes, got 65"),
        (b"x", 1, [1, 2], r"threshold must be in \[2, 2 shares\], got 1"),
        (b"x", 3, [1, 2], r"threshold must be in \[2, 2 shares\], got 3"),
        (b"x", 2, [1, 1], "distinct positive integers"),
        (b"x", 2, [0, 1], "distinct positive integers"),  # the share at 0 is the secret itself
        (b"x", 2, [1, PRIME], "distinct positive integers"),
    ],
    ids=["empty", "too-long", "threshold-1", "threshold-above-n", "repeated-point", "point-zero", "point-prime"],
)
def test_split_refuses_bad_secrets_thresholds_and_points(
    secret: bytes, threshold: int, xs: list[int], message: str,
) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        split(secret, threshold, xs)


def test_shares_of_different_secrets_do_not_mix_into_either() -> None:
    # Prepare
    first, second = split(b"\x11" * 32, 2, [1, 2, 3]), split(b"\x22" * 32, 2, [1, 2, 3])

    # Execute
    try:
        mixed = reconstruct({1: first[1], 2: second[2]}, 2)
    except AuditError:
        mixed = None

    # Assert
    assert mixed not in (b"\x11" * 32, b"\x22" * 32)


def test_altered_shares_never_reconstruct_a_secret_longer_than_split_accepts() -> None:
    # Prepare: equal shares interpolate to that constant; 0x01 + 65 bytes passes the leading-byte check
    forged = int.from_bytes(b"\x01" + b"\x07" * 65, "big")
    assert forged < PRIME

    # Execute / Assert
    with pytest.raises(AuditError, match="do not reconstruct a valid secret"):
        reconstruct({1: forged, 2: forged, 3: forged}, 3)



def test_a_checked_reconstruction_skips_altered_shares_and_names_them() -> None:
    # Prepare: five shares, threshold 3; the first two altered
    secret = b"\x42" * 32
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    altered = {**shares, 1: (shares[1] + 1) % PRIME, 2: (shares[2] * 3) % PRIME}

    # Execute
    recovered, named = reconstruct_verified(altered, 3, lambda s: s == secret, length=32)

    # Assert
    assert recovered == secret and named == [1, 2]
    with pytest.raises(AuditError, match="no 3 of the 5 shares give the committed secret"):
        reconstruct_verified({**altered, 3: 7}, 3, lambda s: s == secret, length=32)  # only two honest shares left
