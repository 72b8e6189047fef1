"""The entry kinds of the coordinator's ledger and of an institution's release log, and what each body holds.

Coordinator ledger (`<run folder>/ledger.jsonl`, signer "coordinator"):
    ledger-opened       {signer, key, run_name, allow_list: {institution: key} | null}
    run-started         {run_id, run_name, scenario, method, aggregation, codec, num_server_rounds, config_sha256, config}
    round-opened        {round, nodes, query_sha256, temperature, codec, samples, public_fingerprint}
    reply-accepted      {round, phase, node_id, institution_id, payload_sha256, payload_bytes, uplink_bytes, attestation}
    reply-rejected      {round, phase, node_id, institution_id, check, reason, attestation}   (institution and
                        attestation as the reply claimed them, unverified, or null)
    weight-clipped      {round, node_id, institution_id, check, declared, used}   before `aggregated`, under a
                        weighted rule: the declared size of that reply was capped (check "weight-cap": the
                        allow-list's max-examples; "weight-clip": weight-clip times the lower median)
    sum-refused         {round, check, reason}   secure aggregation: the opened sum failed a range check, and
                        no institution can be singled out. Check "weight-range": the weighted sum; the round
                        goes on with the unweighted sum every masked reply also carries. Check "value-range":
                        the unweighted sum; the round stops
    secagg-dropped      {round, phase, node_id, institution_id, check, reason}   secure aggregation: a node dropped
                        for what a step showed beyond its own reply (check "secagg-dispute": in phase "secagg-inbox",
                        one side of disputes over share bundles that did not open; "secagg-share": in phase
                        "secagg-shares", it returned shares off their polynomials)
    aggregated          {round, rule, nodes, institutions, samples_kept, ensemble_sha256}
    digest-opened       {round, nodes, query_sha256, samples, digest_epochs, revisit_epochs}   FedMD only; its
                        replies follow as reply-accepted/-rejected with phase "digest"
    exchange-opened     {round, phase, nodes, query_sha256 (one digest, or node -> digest)}   secure
                        aggregation: phases "secagg-keys", "secagg-bundles", "secagg-inbox" (before round-opened),
                        "secagg-consistency" and "secagg-shares" (after the masked soft labels); the FedAvg baseline
                        (method "fedavg"): phase "fedavg", one per round in place of round-opened. Replies follow
                        with that phase
    aggregated (FedAvg) {round, rule: "fedavg", nodes, institutions, weights_sha256}   the averaged weights
    student-checkpoint  {round, file, sha256, student_accuracy}
    run-finished        {status: "completed", rounds, student_sha256}
    run-failed          {status: "failed", error}
    run-stopped         {status: "stopped", error}   the run was stopped with `flwr stop` (error says how Flower ended
                        it); Flower has cut the run off from the institutions by then, so none cosigns its end
    ledger-resumed      {run_id}                       a restarted server continues the chain
    run-resumed         {run_id, checkpoint_round, checkpoint_seq, checkpoint_hash, interrupted_run_ids,
                        abandoned_rounds}   after run-started, when `resume = true` continues from the checkpoint
                        made after round `checkpoint_round` (its student-checkpoint entry is `checkpoint_seq`).
                        Entries after that seq, of the `interrupted_run_ids`, stay in the chain: the rounds they
                        were about (`abandoned_rounds`) were abandoned and are run again after this entry.
                        checkpoint_round 0: the stopped run completed no round; checkpoint_seq is its run-started
    ledger-recovered    {torn_bytes, torn_sha256, set_aside}
    tree-head           {ledger, size, root, key, sig}   the coordinator's signed Merkle tree head of the first
                        `size` entries (common.audit.witness), sent to every institution to witness
    cosigned            {ledger, size, root, institution_id, key, sig, node_id}   an institution's cosignature
                        of that head, after checking it extends what it cosigned before

Institution release log (`release-log.jsonl`, signer = the institution id):
    ledger-opened       {signer, key, institution_id}
    release             {run_id, round, node_id, attestation}
    cosigned            {ledger, size, root, coordinator_key, sig}   a coordinator's tree head this institution
                        checked and cosigned (sig: its cosignature)
    receipt             {ledger, size, root, seq, entry, proof}   a ledger entry accepting one of its replies,
                        with its inclusion proof in the cosigned head of that size
    witness-refused     {ledger, size, reason}   a tree head it refused (rollback, fork, bad signature or receipt)

Run and node ids are decimal strings (64-bit ids do not fit RFC 8785 numbers).
`attestation` is {"statement": <canonical JSON text>, "signature": <base64>} (common.audit.attestation),
or null for an unsigned reply (only when the coordinator runs without an allow-list).
`phase` is "soft-labels" (the answer to round-opened), "digest" (to digest-opened), "fedavg" (to a FedAvg
exchange-opened: the reply's attestation states payload kind "fedavg-weights", the trained weights) or a
secure-aggregation phase (to exchange-opened).
Rejection checks: "node-error", "timeout", "format", "unsigned", "allow-list", "signature", "statement",
"digest" (payload digest mismatch), "identity" (a node changed institution, or two nodes claim one); under secure
aggregation also "secagg-key" (a round key invalid, of small order, or not signed by its institution), "secagg-bundle"
(a share bundle its sender did not sign), "secagg-signature" (a survivor set signed wrongly).
"""

from __future__ import annotations

RUN_STARTED = "run-started"
ROUND_OPENED = "round-opened"
REPLY_ACCEPTED = "reply-accepted"
REPLY_REJECTED = "reply-rejected"
AGGREGATED = "aggregated"
DIGEST_OPENED = "digest-opened"
EXCHANGE_OPENED = "exchange-opened"
CHECKPOINT = "student-checkpoint"
RUN_FINISHED = "run-finished"
RUN_FAILED = "run-failed"
RUN_STOPPED = "run-stopped"
RUN_RESUMED = "run-resumed"
RELEASE = "release"
WEIGHT_CLIPPED = "weight-clipped"
SUM_REFUSED = "sum-refused"
TREE_HEAD = "tree-head"
COSIGNED = "cosigned"
RECEIPT = "receipt"
WITNESS_REFUSED = "witness-refused"
WITNESS_PHASE = "witness"  # the exchange after the closing entry: institutions cosign the final tree head
SECAGG_DROPPED = "secagg-dropped"
FEDAVG_PHASE = "fedavg"  # the FedAvg baseline's exchange: global weights down, trained weights up
FEDAVG_PAYLOAD = "fedavg-weights"  # the payload kind a FedAvg reply's attestation states
CLOSING = (RUN_FINISHED, RUN_FAILED, RUN_STOPPED)
ROUND_WORK = (ROUND_OPENED, REPLY_ACCEPTED, REPLY_REJECTED, AGGREGATED, DIGEST_OPENED, EXCHANGE_OPENED, CHECKPOINT,
              WEIGHT_CLIPPED, SUM_REFUSED, SECAGG_DROPPED)
COORDINATOR = "coordinator"
