"""Privacy in the compliance report: per run and across runs, from the attestations and from each institution's own
privacy ledger, and "no formal privacy guarantee" — never epsilon 0 — where no mechanism was used.

Two sources, labelled apart because they answer different questions:
- the **attestations** (signed, in the ledgers): each release states its mechanism, the epsilon it spent and the
  institution's total after it, as the institution's accountant computed them at the time;
- the institution's **privacy ledger** (`privacy-ledger.json`, common.privacy.budget; unsigned, the institution's
  own record of every mechanism application, whatever federation it joined). From its history the report computes
  the epsilon of each run's events alone, their sum — the *basic composition* bound (Dwork & Roth 2014, Thm 3.16:
  the epsilons, and the deltas, of mechanisms on the same data add up) — and the accountant's epsilon of the whole
  history composed (common.privacy.accounting.epsilon: dp-accounting's Renyi-DP accountant, which composes the
  Renyi curves, not the epsilons: usually much smaller), all at the ledger's delta.

A privacy ledger does not name its institution: `--privacy-ledger NAME=PATH` does, or the release log kept in
the same folder (the layout `fedstill simulate` and a node's own folder use).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.audit.keys import check_name
from common.audit.ledger import OPENED
from common.errors import ConfigError, FedstillError
from common.privacy import accounting
from common.privacy.budget import read_ledger_file

NO_GUARANTEE = "no formal privacy guarantee"
"""What the report says, in words, of a release, run or institution without a privacy mechanism."""
NONE, DP, PARTIAL = "none", "differential privacy", "partial"
"""The `guarantee` of a release or run (NONE, DP) and of an institution over several runs (PARTIAL: some without)."""
RELEASE_LOG = "release-log.jsonl"


def guarantee_of(mechanism: object) -> str:
    return NONE if mechanism in (None, "", "none") else DP


def privacy_ledger_arguments(items: Iterable[str]) -> list[tuple[str, Path]]:
    """(institution, path) of each `--privacy-ledger` value: `NAME=PATH`, or a PATH whose folder holds the
    institution's release log (release-log.jsonl names its institution)."""
    return [_argument(item) for item in items]


def _argument(item: str) -> tuple[str, Path]:
    name, sep, rest = item.partition("=")
    if sep and not Path(item).is_file():
        path = Path(rest)
        try:
            check_name(name)
        except ConfigError as error:
            raise ConfigError(f"--privacy-ledger {item!r}: the institution before '=' is not an institution id ({error}); "
                              "use NAME=PATH") from None
    else:
        path, name = Path(item), _name_beside(Path(item))
    if not path.is_file():
        raise ConfigError(f"privacy ledger {path} not found; check the path (an institution keeps privacy-ledger.json "
                          "in its own folder: node config privacy-ledger, or sites/<institution>/ in a simulated run)")
    return name, path


def _name_beside(path: Path) -> str:
    """The institution of the release log next to a privacy ledger; ConfigError when there is none to read."""
    log = path.parent / RELEASE_LOG
    try:
        with log.open(encoding="utf-8") as handle:
            entry = json.loads(handle.readline())
        name = entry["body"]["institution_id"] if entry.get("kind") == OPENED else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        name = None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"privacy ledger {path}: the file does not name its institution and no release log beside it "
                          f"does; pass --privacy-ledger NAME={path}")
    return name


def privacy_ledger_summary(path: Path, run_labels: dict[str, str]) -> dict[str, Any]:
    """What an institution's privacy ledger says across runs: each run's epsilon alone, their sum (basic
    composition) and the accountant's epsilon of the whole history; `run_labels` maps run ids to report runs."""
    try:
        delta, entries = read_ledger_file(path)
        runs: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            runs.setdefault(entry["run_id"], []).append(entry["event"])
        alone = {run_id: accounting.epsilon(events, delta) for run_id, events in runs.items()}
        composed = accounting.epsilon([entry["event"] for entry in entries], delta)
    except FedstillError as error:
        raise ConfigError(f"privacy ledger {path}: {error}") from None
    per_run = [{"run_id": run_id, "run": run_labels.get(run_id), "events": len(events),
                "mechanisms": sorted({str(e["mechanism"]) for e in events}), "epsilon": alone[run_id]}
               for run_id, events in runs.items()]
    return {"path": str(path), "delta": delta, "entries": len(entries), "runs": per_run,
            "epsilon_composed": composed, "epsilon_basic_composition": math.fsum(alone.values()),
            "epsilon_after_last": entries[-1]["epsilon_after"] if entries else None,
            "accountant": f"dp-accounting {accounting.ACCOUNTANT}", "runs_missing": []}


def summarise_privacy(institution: dict[str, Any]) -> None:
    """Per run and overall, from the attested releases: only releases under a mechanism carry an epsilon.

    The sum of the attested per-release epsilons is what the institution's own accountant added up release by
    release (each `epsilon` is its total after minus before); without a mechanism it is null, never 0.
    """
    spent = institution["privacy"]
    institution["data_categories"].sort()
    institution["privacy_mechanisms"].sort()
    runs: dict[str, list[dict[str, Any]]] = {}
    for release in spent:
        runs.setdefault(release["run"], []).append(release)
    institution["privacy_runs"] = {label: _figures(releases) for label, releases in runs.items()}
    without = [label for label, figures in institution["privacy_runs"].items() if figures["guarantee"] == NONE]
    summary = _figures(spent)  # nothing released (only refusals, timeouts): no guarantee is needed, none is named
    summary["guarantee"] = None if not spent else NONE if len(without) == len(runs) else PARTIAL if without else DP
    institution["privacy_summary"] = {**summary, "no_guarantee": summary["guarantee"] == NONE, "runs_without_guarantee": without}
    ledger = institution.get("privacy_ledger")
    if ledger is not None:
        logged = {r["run"] for r in ledger["runs"]}
        ledger["runs_missing"] = [label for label, figures in institution["privacy_runs"].items()
                                  if figures["guarantee"] == DP and label not in logged]


def _figures(releases: list[dict[str, Any]]) -> dict[str, Any]:
    private = [r for r in releases if r["guarantee"] == DP]
    if not private:
        return {"releases": len(releases), "releases_under_mechanism": 0, "guarantee": NONE, "mechanisms": [],
                "epsilon_sum": None, "epsilon_max": None, "epsilon_total_reported_max": None, "delta_sum": None, "delta": None}
    deltas = [r["delta"] for r in private if r["delta"] is not None]
    return {"releases": len(releases), "releases_under_mechanism": len(private), "guarantee": DP,
            "mechanisms": sorted({r["mechanism"] for r in private}),
            "epsilon_sum": math.fsum(r["epsilon"] for r in private), "epsilon_max": max(r["epsilon"] for r in private),
            "epsilon_total_reported_max": max(r["epsilon_total"] for r in private),
            "delta_sum": math.fsum(deltas), "delta": max(deltas, default=None)}
