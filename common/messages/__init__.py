"""Typed messages between server and institutions; the only package that knows Flower records.

Each message is a dataclass with `to_record()` and a validating `from_record()` that raises
`MessageFormatError` naming the field, the value found and what was expected. One module per family:
`soft_labels` (query and reply), `digest` (FedMD), `secagg` and `secagg_unmask` (secure aggregation), `fedavg`
(the FedAvg baseline's instruction and reply), `witness` (the ledger's witness requests and cosignatures),
`timings` (the compute timings a reply carries outside its attested payload);
`records` holds the checked record access, digests and attestation helpers they share.
This package only re-exports them.
"""

from common.messages.digest import DIGEST_TYPE, DigestInstruction, DigestReply
from common.messages.fedavg import TrainInstruction, TrainReply, weights_digest
from common.messages.records import ATTESTATION, attach_attestation, payload_description, read_attestation, record_digest, record_nbytes
from common.messages.secagg import (
    INBOX_TYPE,
    SETUP_TYPE,
    SHARES_TYPE,
    SecAggBundles,
    SecAggComplaints,
    SecAggInbox,
    SecAggKeys,
    SecAggRoster,
    SecAggSetup,
)
from common.messages.secagg_unmask import (
    CONSISTENCY_TYPE,
    UNMASK_TYPE,
    MaskedReply,
    SecAggConsistency,
    SecAggShares,
    SecAggSignature,
    SecAggUnmask,
)
from common.messages.soft_labels import SOFT_LABELS_TYPE, SoftLabelQuery, SoftLabelReply, validate_soft_labels
from common.messages.timings import NODE_PHASES, NodeTimings, attach_timings
from common.messages.witness import (
    QUERY_DIGEST_EXCLUDES,
    WITNESS_TYPE,
    WitnessCall,
    attach_cosignature,
    read_cosignature,
    read_witness_request,
    with_witness_request,
)

__all__ = [
    "ATTESTATION",
    "NODE_PHASES",
    "NodeTimings",
    "attach_timings",
    "CONSISTENCY_TYPE",
    "QUERY_DIGEST_EXCLUDES",
    "WITNESS_TYPE",
    "WitnessCall",
    "attach_cosignature",
    "read_cosignature",
    "read_witness_request",
    "with_witness_request",
    "DIGEST_TYPE",
    "INBOX_TYPE",
    "SETUP_TYPE",
    "SHARES_TYPE",
    "SOFT_LABELS_TYPE",
    "UNMASK_TYPE",
    "DigestInstruction",
    "DigestReply",
    "MaskedReply",
    "SecAggBundles",
    "SecAggComplaints",
    "SecAggConsistency",
    "SecAggInbox",
    "SecAggKeys",
    "SecAggRoster",
    "SecAggSetup",
    "SecAggShares",
    "SecAggSignature",
    "SecAggUnmask",
    "SoftLabelQuery",
    "SoftLabelReply",
    "TrainInstruction",
    "TrainReply",
    "attach_attestation",
    "payload_description",
    "read_attestation",
    "record_digest",
    "record_nbytes",
    "validate_soft_labels",
    "weights_digest",
]
