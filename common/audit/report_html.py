"""The compliance report as one self-contained HTML page: verdict per run, then per institution what it released,
refused and spent, and the charts — for auditors who open a file, not a server.

Self-contained and inert: the CSS is inline, each chart is a PNG in a `data:` URI, there is no script and no
external URL, and a Content-Security-Policy forbids fetching anything, so the page shows the same offline, in
an archive, years later. Every string taken from the records (run names, institution ids, reasons, paths) is
untrusted input — a ledger or a release log can be written by anyone — and is escaped before it is written.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from html import escape
from typing import Any

from common.audit.report_privacy import DP, NO_GUARANTEE, NONE, PARTIAL

COMPOSITION_CHART = "composition"
"""The key of the privacy-across-runs chart in `render_html`'s charts (the other two are the plots' file names)."""
CAPTIONS = {
    "audit-bytes-per-round.png": "Bytes each institution sent per round (every run in order); red crosses: releases the "
                                 "coordinator did not accept.",
    "audit-epsilon.png": "Cumulative epsilon each institution attested, release by release; institutions without a "
                         "mechanism are named, not drawn.",
    COMPOSITION_CHART: "Across runs, from each institution's privacy ledger: the basic-composition bound (each run's "
                       "epsilon added) against the accountant's epsilon of the whole history.",
}
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1220px;color:#1d232a;
padding:0 16px}
h1{margin:0 0 4px}h2{border-bottom:2px solid #d5dbe1;padding-bottom:4px;margin-top:32px}h3{margin:22px 0 6px}
h4{margin:14px 0 4px;color:#3b4651}
table{border-collapse:collapse;margin:6px 0 10px;width:100%}th,td{border:1px solid #d5dbe1;padding:4px 7px;text-align:left;
vertical-align:top}th{background:#eef2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:10px 14px;border-radius:6px;font-weight:600}.ok{background:#e3f4e6;color:#14532d}
.bad{background:#fde7e7;color:#7f1d1d}.verdict.verified{color:#14532d;font-weight:700}
.verdict.not-verified{color:#b91c1c;font-weight:700}.none{color:#8a4b00;font-style:italic}.muted{color:#66717c}
article.institution{border:1px solid #d5dbe1;border-radius:8px;padding:4px 16px 10px;margin:14px 0}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #d5dbe1}code{font-size:12px;word-break:break-all}
ul.problems{color:#7f1d1d;margin:4px 0}
"""


def render_html(report: dict[str, Any], charts: dict[str, bytes]) -> str:
    """The page: the overall verdict, runs, institutions (overview, then one card each), release logs, charts and
    notes. `charts` maps a chart's name to its PNG bytes."""
    body = [_header(report), _runs(report), _institutions(report), _release_logs(report), _charts(charts), _notes()]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{POLICY}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>fedstill audit report {_e(report['generated'])}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _e(value: Any) -> str:
    """Any value as escaped HTML text (quotes too, so it is safe inside an attribute); None as empty."""
    return "" if value is None else escape(str(value), quote=True)


def _table(headers: Iterable[str], rows: Iterable[str], cls: str = "", empty: str = "") -> str:
    """A table of already-rendered `<tr>` rows (or `empty`, as a paragraph, when there are none); no header row
    when `headers` is empty."""
    rows = list(rows)
    if not rows and empty:
        return f"<p class=\"muted\">{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table class=\"{cls}\">{thead}<tbody>{''.join(rows)}</tbody></table>"


def _row(*cells: Any, attrs: str = "") -> str:
    """One `<tr>`: a cell is a value (escaped) or (value, css class) or (html, css class, True) for markup made here."""
    out = []
    for cell in cells:
        if isinstance(cell, tuple):
            text = cell[0] if len(cell) > 2 and cell[2] else _e(cell[0])
            out.append(f"<td class=\"{cell[1]}\">{text}</td>")
        else:
            out.append(f"<td>{_e(cell)}</td>")
    return f"<tr{attrs}>{''.join(out)}</tr>"


def _epsilon(value: float | None, guarantee: str | None = DP) -> tuple[str, str]:
    """An epsilon as a cell: the number, or the words when there is no mechanism (never 0)."""
    if value is None or guarantee == NONE:
        return NO_GUARANTEE, "none"
    return f"{value:.4g}", "num epsilon"


def _header(report: dict[str, Any]) -> str:
    failed = [ledger for ledger in report["ledgers"] if not ledger["ok"]]
    if failed:
        verdict = (f"NOT VERIFIED: {len(failed)} of {len(report['ledgers'])} ledger(s) failed verification; what could be "
                   "read from them is shown, marked unverified, and cannot be trusted as it stands.")
    else:
        verdict = ("VERIFIED: every signature, hash link and sequence number holds" + (
            ", and the release logs given match the ledgers." if report["release_logs"] else
            "; no institution's release log was given to cross-check."))
    return (f"<header><h1>Audit report</h1><p class=\"muted\">Generated {_e(report['generated'])} from "
            f"{len(report['ledgers'])} ledger(s), {len(report['release_logs'])} release log(s) and "
            f"{len(report.get('privacy_ledgers', []))} privacy ledger(s).</p>"
            f"<p id=\"overall\" class=\"banner {'bad' if failed else 'ok'}\">{_e(verdict)}</p></header>")


def _runs(report: dict[str, Any]) -> str:
    ledgers = {ledger["run"]: ledger for ledger in report["ledgers"]}
    rows, problems = [], []
    for run in report["runs"]:
        ledger = ledgers.get(run["run"], {})
        verified = bool(ledger.get("ok"))
        verdict = ("verified", "verdict verified") if verified else (
            f"NOT VERIFIED ({len(ledger.get('problems', []))} problem(s))", "verdict not-verified")
        guarantee = (NO_GUARANTEE, "privacy none") if run.get("guarantee") == NONE else (run.get("privacy") or "unknown", "privacy")
        status = str(run["status"]) + (f": {run['error']}" if run.get("error") else "")
        rows.append(_row(run["run"], verdict, ", ".join(run["run_ids"]), run["scenario"],
                         f"{run['method']} / {run['aggregation']}", guarantee, f"{run['rounds']} of {run['num_server_rounds']}",
                         status, ", ".join(run["institutions"]), run.get("cosignatures") or "none",
                         attrs=f" data-run=\"{_e(run['run'])}\""))
        if ledger.get("problems") or ledger.get("notes"):
            items = "".join(f"<li>{_e(p)}</li>" for p in ledger.get("problems", []))
            notes = "".join(f"<li>{_e(n)}</li>" for n in ledger.get("notes", []))
            problems.append(f"<h4>{_e(run['run'])}: <code>{_e(ledger.get('path'))}</code></h4>"
                            + (f"<ul class=\"problems\">{items}</ul>" if items else "")
                            + (f"<ul class=\"muted\">{notes}</ul>" if notes else ""))
    table = _table(["run", "verdict", "run id(s)", "scenario", "method / aggregation", "privacy", "rounds", "status",
                    "institutions", "witnessed checkpoints"], rows, "runs")
    return f"<section id=\"runs\"><h2>Runs: the verdict on each record</h2>{table}{''.join(problems)}</section>"


def _institutions(report: dict[str, Any]) -> str:
    overview = [_row(name, len(inst["runs"]), (inst["releases_accepted"], "num"),
                     (inst["releases_rejected"] - inst.get("refusals", 0), "num"), (inst.get("refusals", 0), "num"),
                     (f"{inst['bytes_sent']:,}", "num"), _guarantee_cell(inst), _composed_cell(inst), _witnessed(inst),
                     attrs=f" data-institution=\"{_e(name)}\"")
                for name, inst in report["institutions"].items()]
    table = _table(["institution", "runs joined", "releases accepted", "rejected by the coordinator", "refused by the "
                    "institution", "bytes sent", "privacy", "epsilon across runs (accountant)", "witnessed checkpoints"],
                   overview, "institutions", empty="No institution appears in these records.")
    cards = "".join(_card(name, inst) for name, inst in report["institutions"].items())
    return f"<section id=\"institutions\"><h2>Institutions</h2>{table}{_turned_down(report)}{cards}</section>"


def _turned_down(report: dict[str, Any]) -> str:
    """Every refusal and rejection of every run in one table, in run order: what an auditor looks for first."""
    order = {run["run"]: n for n, run in enumerate(report["runs"])}
    found = sorted(((name, r) for name, inst in report["institutions"].items() for r in inst["rejections"]),
                   key=lambda item: (order.get(item[1]["run"], len(order)), str(item[1]["time"])))
    rows = [_row(r["run"], (r["round"], "num"), name + (" (claimed)" if r.get("institution_from") == "claim" else ""),
                 ("refused by the institution" if r.get("refusal") else "rejected by the coordinator", "kind"),
                 (r["check"], "check"), r["reason"], attrs=f" data-run=\"{_e(r['run'])}\"") for name, r in found]
    return "<h3>Refusals and rejections</h3>" + _table(["run", "round", "institution", "outcome", "check", "reason"], rows,
                                                       "turned-down", empty="No reply was refused or rejected.")


def _guarantee_cell(inst: dict[str, Any]) -> tuple[str, str]:
    summary = inst["privacy_summary"]
    if summary["guarantee"] is None:
        return "nothing released", "muted"
    if summary["guarantee"] == NONE:
        return NO_GUARANTEE, "none"
    mechanisms = ", ".join(m for m in inst["privacy_mechanisms"] if m != "none")
    if summary["guarantee"] == PARTIAL:
        return f"{mechanisms}; {NO_GUARANTEE} in {', '.join(summary['runs_without_guarantee'])}", "none"
    return mechanisms, ""


def _composed_cell(inst: dict[str, Any]) -> tuple[str, str]:
    ledger = inst.get("privacy_ledger")
    if ledger is None:
        guarantee = inst["privacy_summary"]["guarantee"]
        return (NO_GUARANTEE, "none") if guarantee == NONE else ("nothing released", "muted") if guarantee is None else (
            "no privacy ledger given", "muted")
    return f"{ledger['epsilon_composed']:.4g} (basic composition {ledger['epsilon_basic_composition']:.4g})", "num"


def _witnessed(inst: dict[str, Any]) -> tuple[str, str]:
    witnessed = inst.get("witnessed") or {}
    if not witnessed.get("cosignatures"):
        return "none", "witnessed muted"
    return f"{witnessed['cosignatures']} (largest tree {witnessed['largest_size']} entries)", "witnessed"


def _card(name: str, inst: dict[str, Any]) -> str:
    rounds = "; ".join(f"{run}: {', '.join(map(str, r)) if len(r) <= 8 else f'{len(r)} rounds, {r[0]}-{r[-1]}'}"
                       for run, r in inst["rounds"].items())
    facts = [("runs joined", ", ".join(inst["runs"]) or "none"), ("rounds joined", rounds or "none"),
             ("releases accepted", inst["releases_accepted"]),
             ("rejected by the coordinator", inst["releases_rejected"] - inst.get("refusals", 0)),
             ("refused by the institution (its budget or site policy)", inst.get("refusals", 0)),
             ("releases only its own log holds (late, abandoned, missing)", inst["releases_only_logged"]),
             ("bytes accepted / sent", f"{inst['bytes_accepted']:,} / {inst['bytes_sent']:,}"),
             ("data categories", "; ".join(inst["data_categories"]) or "none"),
             ("first / last release", f"{inst['first_release'] or '–'} / {inst['last_release'] or '–'}"),
             ("release log(s) given", ", ".join(inst["release_logs"]) or "none"),
             ("witnessed checkpoints", _witnessed(inst)[0])]
    if inst["unverified_runs"]:
        facts.insert(0, ("UNVERIFIED runs", ", ".join(inst["unverified_runs"])))
    summary = _table([], (_row((label, "label"), value) for label, value in facts), "facts")
    return (f"<article class=\"institution\" data-institution=\"{_e(name)}\"><h3>{_e(name)}</h3>{summary}"
            f"{_privacy_runs(inst)}{_privacy_ledger(inst)}{_refusals(inst)}{_rejections(inst)}</article>")


def _privacy_runs(inst: dict[str, Any]) -> str:
    ledger = {r["run"]: r for r in (inst.get("privacy_ledger") or {}).get("runs", []) if r["run"]}
    rows = []
    for run, figures in inst.get("privacy_runs", {}).items():
        guarantee = figures["guarantee"]
        rows.append(_row(run, (", ".join(figures["mechanisms"]) or NO_GUARANTEE, "none" if guarantee == NONE else ""),
                         (figures["releases"], "num"), _epsilon(figures["epsilon_sum"], guarantee),
                         _epsilon(figures["epsilon_total_reported_max"], guarantee),
                         _ledger_cell(ledger.get(run), guarantee, inst.get("privacy_ledger") is not None),
                         (f"{figures['delta']:g}" if figures["delta"] is not None else "–", "num"),
                         attrs=f" data-run=\"{_e(run)}\""))
    return "<h4>Privacy per run</h4>" + _table(
        ["run", "mechanism", "attested releases", "epsilon spent in the run (attested)", "institution's total after it "
         "(attested)", "epsilon of the run alone (its privacy ledger)", "delta"], rows, "privacy-runs",
        empty="No attested release: nothing is known of this institution's privacy.")


def _ledger_cell(own: dict[str, Any] | None, guarantee: str, given: bool) -> tuple[str, str]:
    """A run's epsilon alone, as the institution's privacy ledger gives it."""
    if own is not None:
        return _epsilon(own["epsilon"])
    if guarantee == NONE:
        return NO_GUARANTEE, "none"
    return ("not in its privacy ledger", "none") if given else ("no privacy ledger given", "muted")


def _privacy_ledger(inst: dict[str, Any]) -> str:
    ledger = inst.get("privacy_ledger")
    if ledger is None:
        return ""
    runs = "; ".join(f"{r['run'] or 'run ' + r['run_id'] + ' (not in this report)'}: {r['epsilon']:.4g}" for r in ledger["runs"])
    facts = [("epsilon composed by the accountant over its whole history", _epsilon(ledger["epsilon_composed"])),
             ("basic-composition bound (sum of each run's epsilon)", _epsilon(ledger["epsilon_basic_composition"])),
             ("each run's epsilon alone", runs or "no event"), ("delta", ledger["delta"]),
             ("events in its history", ledger["entries"]), ("accountant", ledger["accountant"]),
             ("runs under a mechanism it does not hold", ", ".join(ledger["runs_missing"]) or "none"),
             ("privacy ledger", ledger["path"])]
    rows = (_row((label, "label"), value) for label, value in facts)
    return "<h4>Privacy across runs (its own privacy ledger)</h4>" + _table([], rows, "privacy-ledger")


def _refusals(inst: dict[str, Any]) -> str:
    rows = [_row(r["run"], (r["round"], "num"), r["phase"], r["node_id"], (r["check"], "check"), r["reason"], _named_by(r),
                 r["time"], attrs=f" data-run=\"{_e(r['run'])}\"") for r in inst["rejections"] if r.get("refusal")]
    return "<h4>Refusals (the institution declined to answer; nothing left it)</h4>" + _table(
        ["run", "round", "phase", "node", "check", "reason", "named by", "time"], rows, "refusals", empty="none")


def _rejections(inst: dict[str, Any]) -> str:
    rows = [_row(r["run"], (r["round"], "num"), r["phase"], r["node_id"], (r["check"], "check"), r["reason"], _named_by(r),
                 r["time"], attrs=f" data-run=\"{_e(r['run'])}\"") for r in inst["rejections"] if not r.get("refusal")]
    return "<h4>Rejections (the coordinator dropped the reply)</h4>" + _table(
        ["run", "round", "phase", "node", "check", "reason", "named by", "time"], rows, "rejections", empty="none")


def _named_by(rejection: dict[str, Any]) -> str:
    """How the record knows whose reply it was: a signature it checked, or only the node's word."""
    source = rejection.get("institution_from")
    return "its signed attestation" if source == "attestation" else "its own claim (unverified)" if source == "claim" else "unknown"


def _release_logs(report: dict[str, Any]) -> str:
    rows = [_row((f"<code>{_e(log['path'])}</code>", "path", True), log["institution"], (log["releases"], "num"),
                 (log["accepted"], "num"), (log["rejected"], "num"), (log["late"], "num"), (log.get("abandoned", 0), "num"),
                 "; ".join(f"{m['run']} round {m['round']}" for m in log["missing"]) or "0",
                 "yes" if log["all_in_ledger"] else "NO", ", ".join(log["checked_against"]) or "not checked")
            for log in report["release_logs"]]
    return "<section id=\"release-logs\"><h2>Release logs: the institutions' own records</h2>" + _table(
        ["log", "institution", "releases", "accepted", "rejected", "late", "abandoned", "missing from the ledger",
         "all in the ledger", "checked against"], rows, "release-logs",
        empty="No institution's release log was given: the ledgers were not cross-checked.") + "</section>"


def _charts(charts: dict[str, bytes]) -> str:
    figures = "".join(
        f"<figure><img alt=\"{_e(CAPTIONS.get(name, name))}\" src=\"data:image/png;base64,"
        f"{base64.b64encode(png).decode('ascii')}\"><figcaption class=\"muted\">{_e(CAPTIONS.get(name, name))}</figcaption>"
        "</figure>" for name, png in charts.items())
    return f"<section id=\"charts\"><h2>Charts</h2>{figures}</section>"


def _notes() -> str:
    notes = [
        "Verified: every entry of the ledger is in its exact canonical form, hash-linked, numbered and signed by the "
        "coordinator's key, every accepted reply carries an institution's attestation that verifies against the "
        "allow-list, and each release log given matches the ledger (fedstill audit verify).",
        f"{NO_GUARANTEE.capitalize()}: a run or release without a privacy mechanism claims no epsilon at all; it is "
        "shown in words, never as epsilon 0, which would claim perfect privacy.",
        "Epsilon attested: each release states the epsilon the institution's accountant added to its total; across runs, "
        "the institution's privacy ledger gives each run's epsilon alone, their sum (basic composition, an upper bound) and "
        "the accountant's epsilon of the whole history composed (Renyi DP: usually much smaller).",
        "Refused: the institution declined (privacy-budget: its budget would be exceeded; site-policy: its policy forbids "
        "the query); nothing left it. Rejected: the coordinator dropped a reply that failed a check. A name marked as a "
        "claim was not verified by a signature.",
        "Witnessed checkpoints: cosignatures of the ledger's signed tree heads by the institution (ledger entries of kind "
        "cosigned); counted here, with the largest tree each cosigned, not re-verified by this page. \"none\": the "
        "institution cosigned no checkpoint of these ledgers.",
    ]
    return "<section id=\"notes\"><h2>What this page shows</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>"
