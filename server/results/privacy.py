"""The `privacy` section of results.json, read back from the run's ledger (what each institution signed)."""

from __future__ import annotations

import json
from typing import Any

from common.audit import kinds
from common.audit.naming import REFUSAL_CHECKS, node_names
from common.audit.verify import abandoned_entries
from common.config import RunConfig
from server.results.schema import GUARANTEE_NONE, PrivacySummary

PRIVATE_PHASES = ("soft-labels",)


def privacy_section(cfg: RunConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mechanism and parameters, epsilon per institution per round (as attested), delta, and refusals: a
    `PrivacySummary` (server/results/schema.py), as results.json holds it.

    Figures come from the institutions' signed attestations, so they are the institutions' own
    accounting; refusals (PrivacyBudgetExceeded, check `privacy-budget`, and the site policies'
    PolicyViolation, check `site-policy`) come from the rejections the ledger recorded, each naming its
    institution as the ledger knows the node (common.audit.naming: `institution_from` says whether a checked
    attestation or only the node's claim names it). A run without a mechanism has `guarantee` "none" and no
    epsilon at all: no formal privacy guarantee, never epsilon 0. Releases
    of a round abandoned when the server stopped (a resumed run, `run-resumed`) are listed apart: they
    left the institutions and their spend is in every later `epsilon_total`, but the round was run again.
    """
    abandoned = abandoned_entries(entries)
    kept = [entry for entry in entries if entry.get("seq") not in abandoned]
    per_round: dict[int, dict[str, Any]] = {}
    names = node_names(entries)
    parameters: dict[str, Any] = {}
    deltas = set()
    refusals = []
    for entry in kept:
        body = entry["body"]
        if entry["kind"] == kinds.REPLY_REJECTED and body.get("check") in REFUSAL_CHECKS:
            name, source = names.get(str(body.get("node_id")), (None, None))
            refusals.append({"round": body.get("round"), "phase": body.get("phase"), "check": body.get("check"),
                             "node_id": body.get("node_id"), "institution_id": name, "institution_from": source,
                             "reason": body.get("reason")})
        if entry["kind"] != kinds.REPLY_ACCEPTED or body.get("phase") not in PRIVATE_PHASES:
            continue
        statement = _statement(body)
        privacy = statement.get("privacy") or {}
        if privacy.get("mechanism", "none") == "none":
            continue
        institution = statement.get("institution_id") or str(body.get("node_id"))
        per_round.setdefault(body["round"], {})[institution] = {
            "epsilon": privacy.get("epsilon"), "epsilon_total": privacy.get("epsilon_total"),
            "frozen": bool((privacy.get("parameters") or {}).get("frozen", False)),
            "reused": bool((privacy.get("parameters") or {}).get("reused", False)),  # resumed: trained before
        }
        parameters.setdefault(institution, privacy.get("parameters"))
        deltas.add(privacy.get("delta"))
    final = {}
    for round_ in sorted(per_round):
        for institution, figures in per_round[round_].items():
            final[institution] = figures["epsilon_total"]
    return PrivacySummary(
        mechanism=cfg.privacy, guarantee=GUARANTEE_NONE if cfg.privacy == "none" else "differential privacy",
        secure_aggregation=cfg.secure_aggregation,
        run_parameters={"dp-noise-multiplier": cfg.dp_noise_multiplier, "dp-max-grad-norm": cfg.dp_max_grad_norm,
                        "pate-teachers": cfg.pate_teachers, "pate-sigma": cfg.pate_sigma, "pate-queries": cfg.pate_queries},
        delta=sorted(d for d in deltas if d is not None),
        institution_parameters=parameters,
        epsilon_per_round=[{"round": r, "institutions": per_round[r]} for r in sorted(per_round)],
        epsilon_final=final,
        epsilon_max=max(final.values()) if final else None,
        refusals=refusals,
        abandoned_releases=[_abandoned(entry) for entry in entries
                            if entry.get("seq") in abandoned and entry["kind"] == kinds.REPLY_ACCEPTED],
    ).to_json()


def _abandoned(entry: dict[str, Any]) -> dict[str, Any]:
    body, statement = entry["body"], _statement(entry["body"])
    privacy = statement.get("privacy") or {}
    return {"round": body.get("round"), "phase": body.get("phase"), "node_id": body.get("node_id"),
            "institution_id": statement.get("institution_id") or body.get("institution_id"),
            "epsilon": privacy.get("epsilon"), "epsilon_total": privacy.get("epsilon_total")}


def _statement(body: dict[str, Any]) -> dict[str, Any]:
    attestation = body.get("attestation") or {}
    try:
        statement = json.loads(attestation.get("statement", "{}"))
    except ValueError:
        return {}
    return statement if isinstance(statement, dict) else {}
