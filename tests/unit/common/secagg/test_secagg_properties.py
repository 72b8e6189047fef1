"""Property tests of what secure aggregation reveals (common/secagg/): any t - 1 shares say nothing of the secret,
a masked vector alone is uniform whatever the input, and any dropouts up to n - t leave the exact sum.

Shamir's and the masks' randomness come from the operating system (`secrets`, `os.urandom`), as in production, so
the statistical checks use bounds that honest randomness fails with probability below about 1e-6 per example.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg.masking import quantise
from common.secagg.protocol import (
    ClientSecrets,
    client_masked_input,
    client_open_bundles,
    client_share_bundles,
    client_unmask,
    majority_threshold,
    make_roster,
    seed_commitment,
    server_sum,
)
from common.secagg.shamir import MAX_SECRET_BYTES, PRIME, _interpolate, reconstruct, split

CONTEXT = b"fedstill/9/1"
SPLITS = 300  # splits of each secret per example


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


def low_bits(values: list[int], bits: int = 64) -> np.ndarray:
    """The fraction of `values` with each of their lowest `bits` bits set."""
    return np.array([[(v >> k) & 1 for k in range(bits)] for v in values]).mean(axis=0)


@settings(max_examples=10, deadline=None)
@given(data=st.data(), first=st.binary(min_size=1, max_size=MAX_SECRET_BYTES),
       second=st.binary(min_size=1, max_size=MAX_SECRET_BYTES))
def test_any_t_minus_1_shares_are_uniform_and_the_same_for_every_secret(data: st.DataObject, first: bytes,
                                                                         second: bytes) -> None:
    # Prepare: t - 1 share points of n
    n = data.draw(st.integers(min_value=3, max_value=7), label="n")
    threshold = data.draw(st.integers(min_value=2, max_value=n), label="threshold")
    points = data.draw(st.lists(st.integers(min_value=1, max_value=n), min_size=threshold - 1, max_size=threshold - 1,
                                unique=True), label="points seen")
    xs = list(range(1, n + 1))

    # Execute: the shares those points receive, over many splits of each secret
    seen = {secret: [[split(secret, threshold, xs)[x] for x in points] for _ in range(SPLITS)] for secret in (first, second)}

    # Assert: each share is uniform on GF(p), whichever the secret (two-sample KS between the secrets, per point)
    for index in range(threshold - 1):
        a, b = (np.array([row[index] / PRIME for row in seen[s]]) for s in (first, second))
        assert abs(a.mean() - 0.5) < 0.1 and abs(b.mean() - 0.5) < 0.1
        assert ks_distance(a, b) < 0.25  # p < 1e-8 for two samples of 300 from one distribution
    pooled = [v for s in (first, second) for row in seen[s] for v in row]
    assert np.all(np.abs(low_bits(pooled) - 0.5) < 6 * 0.5 / np.sqrt(len(pooled)) + 1e-9)  # 6 sigma: p < 2e-9 a bit

    # Assert, exactly: those t - 1 shares fit every secret; one more point decides which
    shares = dict(zip(points, seen[first][0], strict=True))
    target = int.from_bytes(b"\x01" + second, "big")
    other = next(x for x in xs if x not in points)
    completed = {**shares, other: _interpolate([(0, target), *shares.items()], other)}
    assert reconstruct(completed, threshold) == second


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_masked_vector_alone_is_uniform_whatever_the_input(data: st.DataObject) -> None:
    # Prepare: inputs from constants to extremes, equal for every client
    n = data.draw(st.integers(min_value=3, max_value=5), label="n")
    kind = data.draw(st.sampled_from(["zeros", "ones", "ramp", "extreme", "soft labels"]), label="input")
    length = 2048
    x = {"zeros": np.zeros(length), "ones": np.ones(length), "ramp": np.linspace(0, 1, length),
         "extreme": np.full(length, -2.0**29), "soft labels": np.random.default_rng(1).dirichlet(np.ones(8), 256).reshape(-1)}[kind]
    secrets = {node: ClientSecrets.generate() for node in range(1, n + 1)}
    roster = make_roster({node: s.public_keys() for node, s in secrets.items()})

    # Execute
    masked = {node: client_masked_input(node, secrets[node], roster, os.urandom(32), x, CONTEXT)
              for node in secrets}

    # Assert: every bit of every entry is set half the time; no entry shows its input; equal inputs, unrelated outputs
    for y in masked.values():
        bits = ((y[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
        assert np.all(np.abs(bits - 0.5) < 6 * 0.5 / np.sqrt(length))
        assert abs(float((y.astype(np.float64) / 2.0**64).mean()) - 0.5) < 6 * 0.29 / np.sqrt(length)
        assert not np.any(y == quantise(x))
    assert not np.any(masked[1] == masked[2])


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_dropouts_up_to_n_minus_t_leave_the_exact_sum_at_the_default_threshold(data: st.DataObject) -> None:
    # Prepare: the protocol's own threshold; any dropouts after the shares, any silent survivors, up to n - t in all
    n = data.draw(st.integers(min_value=3, max_value=8), label="n")
    threshold = majority_threshold(n)
    nodes = list(range(101, 101 + n))
    dropped = data.draw(st.sets(st.sampled_from(nodes), max_size=n - threshold), label="dropped after sharing")
    survivors = set(nodes) - dropped
    silent = data.draw(st.sets(st.sampled_from(sorted(survivors)), max_size=len(survivors) - threshold),
                       label="survivors silent at unmasking")
    rng = np.random.default_rng(data.draw(st.integers(min_value=0, max_value=2**32 - 1), label="seed"))
    inputs = {node: rng.normal(scale=10.0, size=11) for node in survivors}
    secrets = {node: ClientSecrets.generate() for node in nodes}
    roster = make_roster({node: s.public_keys() for node, s in secrets.items()})
    seeds, outboxes = {}, {}
    for node in nodes:
        seeds[node], outboxes[node] = client_share_bundles(node, secrets[node], roster, threshold, CONTEXT)
    opened = {dst: client_open_bundles(dst, secrets[dst], roster, {src: outboxes[src][dst] for src in nodes}, CONTEXT)[0]
              for dst in nodes}

    # Execute
    masked = {node: client_masked_input(node, secrets[node], roster, seeds[node], x, CONTEXT) for node, x in inputs.items()}
    answers = {node: client_unmask(node, opened[node], set(nodes), survivors, threshold) for node in survivors - silent}
    result = server_sum(masked, answers, roster, threshold, CONTEXT,
                        {node: seed_commitment(seed, CONTEXT) for node, seed in seeds.items()})

    # Assert
    expected = np.zeros(11, dtype=np.uint64)
    for x in inputs.values():
        expected += quantise(x)
    assert np.array_equal(result.total, expected) and result.altered == {}
