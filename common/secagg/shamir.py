"""Shamir secret sharing (Shamir, 1979) of byte strings over the prime field GF(2^521 - 1).

A secret of up to 64 bytes becomes the constant term of a random polynomial of degree t - 1; share
x is the polynomial's value at x (x = 1..n). Any t shares give the secret back by Lagrange
interpolation at 0; fewer than t reveal nothing about it (every secret is equally consistent with them).
"""

from __future__ import annotations

import secrets

from common.errors import AuditError, ConfigError

PRIME = (1 << 521) - 1
MAX_SECRET_BYTES = 64


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
    points = sorted(shares.items())[:threshold]
    value = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        value = (value + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    secret = raw[1:]
    if not raw or raw[0] != 1 or len(secret) > MAX_SECRET_BYTES or (length is not None and len(secret) != length):
        raise AuditError("secret sharing: the shares do not reconstruct a valid secret (altered or mixed shares)", "secagg")
    return secret


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
