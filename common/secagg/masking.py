"""Fixed-point encoding and the masks of secure aggregation: seeds from X25519 + HKDF, streams from ChaCha20.

Vectors travel as uint64 integers mod 2^64: x -> round(x * 2^SCALE_BITS). Client i sends

    y_i = x_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)      (mod 2^64)

with b_i its own random seed and s_ij = HKDF(X25519(c_i, C_j)) the seed it shares with client j
(Bonawitz et al., 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning").
Summed over all clients the pairwise masks cancel; the server removes the self masks once it has
reconstructed each b_i from shares. Every y_i alone is uniformly distributed: it says nothing about x_i.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import ConfigError

SCALE_BITS = 24  # fixed-point resolution 2^-24 ~ 6e-8 per entry
FIELD_25519 = 2**255 - 19  # X25519 public keys are u-coordinates below this, little-endian
MAX_ABS = float(1 << 30)  # |x| bound per entry per client: sums of 2^9 clients stay below 2^63 / 2^24


def quantise(values: np.ndarray) -> np.ndarray:
    """float -> uint64 fixed point mod 2^64 (negative values wrap); rounding error <= 2^-25 per entry."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all() or (np.abs(values) > MAX_ABS).any():
        raise ConfigError(f"secure aggregation: values must be finite and within +-{MAX_ABS:g}")
    return np.round(values * (1 << SCALE_BITS)).astype(np.int64).view(np.uint64)


def dequantise(values: np.ndarray) -> np.ndarray:
    """uint64 fixed point (a sum of quantised vectors) -> float64."""
    return np.asarray(values, dtype=np.uint64).view(np.int64).astype(np.float64) / (1 << SCALE_BITS)


def prg(seed: bytes, length: int) -> npt.NDArray[np.uint64]:
    """`length` pseudo-random uint64 from a 32-byte seed: the ChaCha20 keystream under that key."""
    if len(seed) != 32:
        raise ConfigError(f"secure aggregation: PRG seeds are 32 bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(b"\x00" * (8 * length)), dtype=np.uint64).copy()


def derive_seed(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """32-byte key from an X25519 agreement, bound to `info` (the run, round and purpose) by HKDF-SHA256."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def pairwise_mask(me: int, peer: int, seed: bytes, length: int) -> npt.NDArray[np.uint64]:
    """What client `me` adds for its pair with `peer`: +PRG(s) when me < peer, -PRG(s) otherwise."""
    stream = prg(seed, length)
    return stream if me < peer else (np.uint64(0) - stream)


def apply_masks(quantised: np.ndarray, me: int, self_seed: bytes, pair_seeds: dict[int, bytes]) -> npt.NDArray[np.uint64]:
    """y = x + PRG(b) + sum of pairwise masks (mod 2^64)."""
    length = quantised.size
    masked: npt.NDArray[np.uint64] = quantised.reshape(-1).astype(np.uint64) + prg(self_seed, length)
    for peer, seed in pair_seeds.items():
        masked += pairwise_mask(me, peer, seed, length)
    return masked


def public_key_problem(key: bytes) -> str:
    """What is wrong with an X25519 public key ("" when nothing): not 32 bytes, not the canonical encoding of a
    coordinate (two encodings of one key would pass a check for distinct keys), or a point of small order, with
    which every shared secret is zero, so a peer sending one would make every mask and bundle key public.
    RFC 7748 section 6.1: X25519 over a small-order point gives all zeros; OpenSSL refuses to return it."""
    if len(key) != 32:
        return f"a key of {len(key)} bytes, not 32"
    if int.from_bytes(key, "little") >= FIELD_25519:
        return "not a canonical X25519 encoding (a coordinate >= 2^255 - 19)"
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        return "a point of small order (every shared secret with it is zero)"
    return ""
