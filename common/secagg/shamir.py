"""Shamir secret sharing (Shamir, 1979) of byte strings over the prime field GF(2^521 - 1).

A secret of up to 64 bytes becomes the constant term of a random polynomial of degree t - 1; share
x is the polynomial's value at x (x = 1..n). Any t shares give the secret back by Lagrange
interpolation at 0; fewer than t reveal nothing about it (every secret is equally consistent with them).
Shares are not verifiable on their own, so a reconstruction that can recognise its secret (a commitment,
a public key) tries further subsets of t shares when some are altered, and names the altered ones.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable

from common.errors import AuditError, ConfigError

PRIME = (1 << 521) - 1
MAX_SECRET_BYTES = 64
MAX_SUBSETS = 5000  # subsets of t shares tried before a reconstruction gives up on altered shares


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, int]:
    """Shares of `secret` at the points `xs` (distinct, 1 <= x < PRIME); any `threshold` recover it."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ConfigError(f"secret sharing: secrets are 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 2 <= threshold <= len(xs):
        raise ConfigError(f"secret sharing: threshold must be in [2, {len(xs)} shares], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ConfigError("secret sharing: share points must be distinct positive integers")
    # a leading 0x01 keeps leading zero bytes of the secret through the integer round trip
    coefficients = [int.from_bytes(b"\x01" + secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def reconstruct(shares: dict[int, int], threshold: int, length: int | None = None) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0); `length`, when given,
    is the secret's known size in bytes, and anything else is refused as altered shares."""
    if len(shares) < threshold:
        raise AuditError(f"secret sharing: {len(shares)} shares, {threshold} are needed to reconstruct", "secagg")
    value = _interpolate(sorted(shares.items())[:threshold], 0)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    secret = raw[1:]
    if not raw or raw[0] != 1 or len(secret) > MAX_SECRET_BYTES or (length is not None and len(secret) != length):
        raise AuditError("secret sharing: the shares do not reconstruct a valid secret (altered or mixed shares)", "secagg")
    return secret


def reconstruct_verified(
    shares: dict[int, int], threshold: int, is_secret: Callable[[bytes], bool], length: int | None = None,
    max_subsets: int = MAX_SUBSETS,
) -> tuple[bytes, list[int]]:
    """The secret, and the points whose shares are not on its polynomial (altered shares).

    Honest shares all lie on one polynomial of degree t - 1; `is_secret` recognises the true secret (its
    commitment, or its public key). The first t shares are tried first; while what they give is not the
    secret, further subsets of t shares are tried (at most `max_subsets`), so that altered shares do not
    stop a reconstruction while t honest ones are among the shares. AuditError when no subset gives it.
    """
    if len(shares) < threshold:
        raise AuditError(f"secret sharing: {len(shares)} shares, {threshold} are needed to reconstruct", "secagg")
    for subset in itertools.islice(itertools.combinations(sorted(shares.items()), threshold), max_subsets):
        try:
            secret = reconstruct(dict(subset), threshold, length)
        except AuditError:
            continue
        if is_secret(secret):
            altered = [x for x, y in sorted(shares.items()) if (x, y) not in subset and _interpolate(list(subset), x) != y]
            return secret, altered
    raise AuditError(f"secret sharing: no {threshold} of the {len(shares)} shares give the committed secret "
                     "(too many altered shares)", "secagg")


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """The value at `at` of the polynomial through `points` (Lagrange)."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        value = (value + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
