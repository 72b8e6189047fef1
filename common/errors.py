"""Exceptions fedstill raises on purpose; anything else is a bug.

    FedstillError
    ├── ConfigError           a run-config key is unknown, missing, ill-typed or out of range
    ├── DataError             a data folder is missing, or a data file is corrupt or unexpected
    ├── MessageFormatError    a message (query or reply) does not match its schema
    ├── FingerprintMismatch   the two sides do not hold the same public transfer set
    ├── QuorumError           too few valid replies (or nodes) to go on with a round
    ├── PrivacyBudgetExceeded a release would spend more privacy budget than allowed
    ├── PolicyViolation       a query asks for what the institution's site policy refuses
    └── AuditError            a signature, digest or ledger link does not verify

Every message names the thing, the value and the fix. Messages raised in a client travel back to
the server as text, so they never carry private data (samples, raw outputs, file contents).
"""

from __future__ import annotations


class FedstillError(Exception):
    """Base class of the errors fedstill raises on purpose."""


class ConfigError(FedstillError):
    """A run-config key is unknown, missing, ill-typed or out of range."""


class DataError(FedstillError):
    """A data folder is missing, or one of its files is corrupt or unexpected."""


class MessageFormatError(FedstillError):
    """A query or reply does not match its schema."""


class FingerprintMismatch(MessageFormatError):
    """The server and a client do not hold the same public transfer set."""


class QuorumError(FedstillError):
    """Too few nodes or valid replies to run or finish a round."""


class PrivacyBudgetExceeded(FedstillError):
    """A release would spend more privacy budget than the institution allows."""


class PolicyViolation(FedstillError):
    """A query asks what the institution's site policy refuses; the message starts with the policy line."""


class AuditError(FedstillError):
    """A signature, payload digest or ledger link does not verify.

    `check` names the check that failed ("signature", "digest", "allow-list", ...), for the ledger.
    """

    def __init__(self, message: str, check: str = "audit") -> None:
        super().__init__(message)
        self.check = check
