"""Provable compliance: institution keys, signed release attestations, hash-chained ledgers, verification."""
