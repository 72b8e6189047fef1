"""Compliance reports: verify the ledgers of one or more runs, then total what each institution released, as JSON, Markdown and plots."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.audit import kinds
from common.audit.canonical import utc_now
from common.audit.ledger import OPENED, RESUMED
from common.audit.verify import Chain, read_chain, verify_ledger
from common.errors import ConfigError

SCHEMA = "fedstill.audit-report/1"
JSON_FILE, MARKDOWN_FILE = "audit-report.json", "audit-report.md"
BYTES_PLOT, EPSILON_PLOT = "audit-bytes-per-round.png", "audit-epsilon.png"
REPLIES = (kinds.REPLY_ACCEPTED, kinds.REPLY_REJECTED)


def build_report(
    ledgers: Iterable[Path | str], client_logs: Iterable[Path | str] = (), coordinator_key: str | None = None,
    allow_list: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Verify each ledger with the release logs of its run, then aggregate per institution across all runs.

    A ledger that does not verify is still read as far as it parses: its run has `verified: false`, the
    institutions it names list it under `unverified_runs`, and the report's `verified` is false.
    A release log is checked against the ledgers whose run ids it holds or whose folder holds it; one
    that holds no release of any given run, against every ledger its institution appears in.
    """
    ledger_paths, log_paths = _existing(ledgers, "ledger"), _existing(client_logs, "release log")
    if not ledger_paths:
        raise ConfigError("no ledger given: pass the ledger.jsonl of at least one run")
    chains = [read_chain(path, coordinator_key) for path in ledger_paths]
    labels = _run_labels(chains)
    logs = [read_chain(path) for path in log_paths]
    report: dict[str, Any] = {"schema": SCHEMA, "generated": utc_now(), "verified": True, "ledgers": [], "runs": [],
                              "institutions": {}, "release_logs": [], "rounds_axis": []}
    for chain, label in zip(chains, labels):
        companions = _companions(chain, logs, chains)
        check = verify_ledger(chain.path, coordinator_key=coordinator_key, allow_list=allow_list, client_logs=companions)
        report["verified"] = report["verified"] and check.ok
        report["ledgers"].append({
            "path": str(chain.path), "run": label, "ok": check.ok, "problems": [str(p) for p in check.problems],
            "notes": list(check.notes), "checked": dict(check.checked), "release_logs": [str(p) for p in companions],
        })
        report["runs"].append(_run_summary(chain, label, check.ok))
        _add_replies(report, chain, label, check.ok)
    for log in logs:
        entry = _release_log(log, chains, labels)
        entry["checked_against"] = [ledger["run"] for ledger in report["ledgers"] if entry["path"] in ledger["release_logs"]]
        report["release_logs"].append(entry)
        if entry["institution"]:
            _institution(report, entry["institution"])["release_logs"].append(entry["path"])
    for institution in report["institutions"].values():
        _summarise_privacy(institution)
    report["institutions"] = dict(sorted(report["institutions"].items()))
    return report


def _existing(paths: Iterable[Path | str], what: str) -> list[Path]:
    found = [Path(p) for p in paths]
    if missing := [str(p) for p in found if not p.is_file()]:
        raise ConfigError(f"{what} {', '.join(missing)} not found; check the path (a run folder holds ledger.jsonl, "
                          f"an institution's sites folder its release-log.jsonl)")
    return found


def _run_labels(chains: list[Chain]) -> list[str]:
    """One unique name per ledger: its run name, or its folder's name, numbered when two share one."""
    labels: list[str] = []
    for chain in chains:
        bodies = _bodies(chain, kinds.RUN_STARTED) or _bodies(chain, OPENED)
        name = str((bodies[0] if bodies else {}).get("run_name") or chain.path.parent.name)
        labels.append(name if name not in labels else f"{name} ({len(labels) + 1})")
    return labels


def _bodies(chain: Chain, kind: str) -> list[dict[str, Any]]:
    return [entry["body"] for _, entry in chain.entries if entry["kind"] == kind]


def _run_ids(chain: Chain) -> set[str]:
    return {str(body.get("run_id")) for body in _bodies(chain, kinds.RUN_STARTED)}


def _companions(chain: Chain, logs: list[Chain], chains: list[Chain]) -> list[Path]:
    """The release logs of this ledger's run; a log of no given run goes to every ledger its institution is in."""
    run_ids, folder = _run_ids(chain), chain.path.parent.resolve()
    institutions = set(_node_institutions(chain).values())
    chosen = []
    for log in logs:
        log_ids = {str(body.get("run_id")) for body in _bodies(log, kinds.RELEASE)}
        orphan = not any(log_ids & _run_ids(other) for other in chains)
        if log_ids & run_ids or folder in log.path.resolve().parents or (orphan and _log_institution(log) in institutions):
            chosen.append(log.path)
    return chosen


def _log_institution(log: Chain) -> str | None:
    return log.genesis["body"].get("institution_id") if log.genesis else None


def _signed(body: dict[str, Any]) -> tuple[str, str] | None:
    """An entry's attestation as (statement, signature), or None."""
    value = body.get("attestation")
    if isinstance(value, dict) and isinstance(value.get("statement"), str) and isinstance(value.get("signature"), str):
        return value["statement"], value["signature"]
    return None


def _statement(body: dict[str, Any]) -> dict[str, Any]:
    """The attestation's statement as a dict, or {} when there is none or it does not parse."""
    try:
        fields = json.loads(_signed(body)[0]) if _signed(body) else {}
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _round(body: dict[str, Any]) -> int | None:
    value = body.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _node_institutions(chain: Chain) -> dict[str, str]:
    """Node id -> institution id, from every reply and aggregation that names both."""
    nodes: dict[str, str] = {}
    for _, entry in chain.entries:
        body = entry["body"]
        if entry["kind"] in REPLIES:
            name = body.get("institution_id") or _statement(body).get("institution_id")
            if isinstance(name, str):
                nodes.setdefault(str(body.get("node_id")), name)
        elif entry["kind"] == kinds.AGGREGATED:
            for node, name in zip(body.get("nodes") or [], body.get("institutions") or []):
                if isinstance(name, str):
                    nodes.setdefault(str(node), name)
    return nodes


def _run_summary(chain: Chain, label: str, verified: bool) -> dict[str, Any]:
    started = _bodies(chain, kinds.RUN_STARTED)
    first = started[0] if started else {}
    closing = next((e for _, e in reversed(chain.entries) if e["kind"] in kinds.CLOSING), None)
    end = closing["body"] if closing else {}
    checkpoints = _bodies(chain, kinds.CHECKPOINT)
    aggregated = _bodies(chain, kinds.AGGREGATED)
    return {
        "run": label, "ledger": str(chain.path), "verified": verified, "run_name": first.get("run_name"),
        "run_ids": sorted({str(body.get("run_id")) for body in started}), "scenario": first.get("scenario"),
        "method": first.get("method"), "aggregation": first.get("aggregation"), "codec": first.get("codec"),
        "rules": sorted({str(body.get("rule")) for body in aggregated}),
        "num_server_rounds": first.get("num_server_rounds"), "rounds_opened": len(_bodies(chain, kinds.ROUND_OPENED)),
        "rounds_aggregated": len(aggregated), "rounds": end.get("rounds", len(aggregated)),
        "status": end.get("status", "unfinished"), "error": end.get("error"), "restarts": len(_bodies(chain, RESUMED)),
        "started": next((e["time"] for _, e in chain.entries if e["kind"] == kinds.RUN_STARTED), None),
        "ended": closing["time"] if closing else None,
        "student_sha256": end.get("student_sha256") or (checkpoints[-1].get("sha256") if checkpoints else None),
        "student_accuracy": checkpoints[-1].get("student_accuracy") if checkpoints else None,
        "institutions": sorted(set(_node_institutions(chain).values())),
    }


def _institution(report: dict[str, Any], name: str) -> dict[str, Any]:
    return report["institutions"].setdefault(name, {
        "runs": [], "rounds": {}, "releases_accepted": 0, "releases_rejected": 0, "bytes_accepted": 0, "bytes_sent": 0,
        "uplink_bytes_accepted": 0, "data_categories": [], "privacy_mechanisms": [], "privacy": [], "per_round": [],
        "rejections": [], "first_release": None, "last_release": None, "unverified_runs": [], "release_logs": [],
    })


def _add_replies(report: dict[str, Any], chain: Chain, label: str, verified: bool) -> None:
    """Every reply the ledger records, under the institution that made it (or `node N (unidentified)`)."""
    nodes = _node_institutions(chain)
    for _, entry in chain.entries:
        body = entry["body"]
        if entry["kind"] == kinds.ROUND_OPENED and [label, _round(body)] not in report["rounds_axis"]:
            report["rounds_axis"].append([label, _round(body)])
        if entry["kind"] not in REPLIES:
            continue
        statement = _statement(body)
        node = str(body.get("node_id"))
        name = body.get("institution_id") or statement.get("institution_id") or nodes.get(node) or f"node {node} (unidentified)"
        _add_reply(_institution(report, str(name)), label, entry, statement, verified)


def _add_reply(institution: dict[str, Any], label: str, entry: dict[str, Any], statement: dict[str, Any], verified: bool) -> None:
    body, accepted, round_ = entry["body"], entry["kind"] == kinds.REPLY_ACCEPTED, _round(entry["body"])
    _add_new(institution["runs"], label)
    _add_new(institution["rounds"].setdefault(label, []), round_)
    if not verified:
        _add_new(institution["unverified_runs"], label)
    size = body.get("payload_bytes") if accepted else statement.get("payload_bytes")
    size = int(_number(size))
    institution["releases_accepted" if accepted else "releases_rejected"] += 1
    institution["bytes_accepted"] += size if accepted else 0
    institution["bytes_sent"] += size
    institution["uplink_bytes_accepted"] += int(_number(body.get("uplink_bytes"))) if accepted else 0
    institution["per_round"].append({"run": label, "round": round_, "accepted": accepted, "bytes": size})
    if not accepted:
        institution["rejections"].append({"run": label, "round": round_, "node_id": body.get("node_id"), "check": body.get("check"),
                                          "reason": body.get("reason"), "time": entry["time"], "attested": bool(statement)})
    if not statement:
        return  # nothing signed: the ledger cannot say what, if anything, left the institution
    for category in statement.get("data_categories") or []:
        _add_new(institution["data_categories"], str(category))
    privacy = statement.get("privacy") if isinstance(statement.get("privacy"), dict) else {}
    mechanism = str(privacy.get("mechanism", "none"))
    _add_new(institution["privacy_mechanisms"], mechanism)
    time = str(statement.get("time") or entry["time"])
    institution["privacy"].append({
        "run": label, "round": round_, "time": time, "accepted": accepted, "mechanism": mechanism,
        "epsilon": _number(privacy.get("epsilon")), "epsilon_total": _number(privacy.get("epsilon_total")),
        "delta": _number(privacy.get("delta")),
    })
    institution["first_release"] = min(filter(None, (institution["first_release"], time)))
    institution["last_release"] = max(filter(None, (institution["last_release"], time)))


def _add_new(items: list[Any], item: Any) -> None:
    if item not in items:
        items.append(item)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _summarise_privacy(institution: dict[str, Any]) -> None:
    """Basic composition (sum of each release's epsilon and delta): an upper bound on what was spent."""
    spent = institution["privacy"]
    institution["data_categories"].sort()
    institution["privacy_mechanisms"].sort()
    institution["privacy_summary"] = {
        "releases": len(spent), "epsilon_sum": sum(p["epsilon"] for p in spent), "delta_sum": sum(p["delta"] for p in spent),
        "epsilon_max": max((p["epsilon"] for p in spent), default=0.0),
        "epsilon_total_reported_max": max((p["epsilon_total"] for p in spent), default=0.0),
        "no_guarantee": not spent or all(p["mechanism"] == "none" for p in spent),
    }


def _release_log(log: Chain, chains: list[Chain], labels: list[str]) -> dict[str, Any]:
    """Which releases of an institution's log the ledgers record: accepted, rejected, late (timed out) or missing."""
    where, runs, timeouts = {}, {}, set()
    for chain, label in zip(chains, labels):
        runs.update({run_id: label for run_id in _run_ids(chain)})
        for _, entry in chain.entries:
            if (signed := _signed(entry["body"])) is not None:
                where[signed] = entry["kind"]
            if entry["kind"] == kinds.REPLY_REJECTED and entry["body"].get("check") == "timeout":
                timeouts.add((label, _round(entry["body"]), str(entry["body"].get("node_id"))))
    counts = {"releases": 0, "accepted": 0, "rejected": 0, "late": 0, "other_runs": 0}
    missing = []
    for _, entry in log.entries:
        body = entry["body"]
        if entry["kind"] != kinds.RELEASE:
            continue
        counts["releases"] += 1
        kind, label = where.get(_signed(body)), runs.get(str(body.get("run_id")))
        if label is None:
            counts["other_runs"] += 1
        elif kind is not None:
            counts["accepted" if kind == kinds.REPLY_ACCEPTED else "rejected"] += 1
        elif (label, _round(body), str(body.get("node_id"))) in timeouts:
            counts["late"] += 1
        else:
            missing.append({"run": label, "round": _round(body)})
    return {"path": str(log.path), "institution": _log_institution(log), **counts, "missing": missing,
            "all_in_ledger": not missing}


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write audit-report.json, audit-report.md and its two plots into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / JSON_FILE, out_dir / MARKDOWN_FILE, out_dir / BYTES_PLOT, out_dir / EPSILON_PLOT]
        _write_text(paths[0], json.dumps(report, indent=2) + "\n")
        _write_text(paths[1], render_markdown(report))
        _plot_bytes(report, paths[2])
        _plot_epsilon(report, paths[3])
    except OSError as error:
        raise ConfigError(f"cannot write the report into {out_dir}: {error.strerror or error}; choose another --out") from None
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_markdown(report: dict[str, Any]) -> str:
    """A page for a compliance officer: verification first, then runs, institutions, rejections, privacy, logs, plots."""
    return "\n".join([_md_verification(report), _md_runs(report), _md_institutions(report), _md_rejections(report),
                      _md_privacy(report), _md_release_logs(report),
                      f"## Plots\n\n![bytes released per round]({BYTES_PLOT})\n\n![cumulative epsilon]({EPSILON_PLOT})\n"])


def _md_verification(report: dict[str, Any]) -> str:
    failed, ledgers = [ledger for ledger in report["ledgers"] if not ledger["ok"]], report["ledgers"]
    lines = [f"# Audit report\n\nGenerated {report['generated']} from {len(ledgers)} ledger(s) and "
             f"{len(report['release_logs'])} release log(s).\n\n## Verification\n"]
    if failed:
        lines.append(f"**NOT VERIFIED**: {len(failed)} of {len(ledgers)} ledger(s) failed verification. The figures below still "
                     f"include what could be read from them, marked *(unverified)*; they cannot be trusted as they stand.\n")
    else:
        lines.append("**VERIFIED**: every signature, hash link and sequence number holds" + (
            ", and the release logs given match the ledgers.\n" if report["release_logs"] else
            "; no institution's release log was given to cross-check.\n"))
    lines += _table(["ledger", "run", "status", "entries", "release logs"], [
        [f"`{ledger['path']}`", ledger["run"], "verified" if ledger["ok"] else f"**FAILED** ({len(ledger['problems'])} problem(s))",
         ledger["checked"].get(Path(ledger["path"]).name, 0), len(ledger["release_logs"])] for ledger in ledgers])
    for ledger in ledgers:
        for kind, title in (("problems", "Problems"), ("notes", "Notes")):
            if ledger[kind]:
                lines += [f"\n{title} of `{ledger['path']}`:\n"] + [f"- {_cell(item)}" for item in ledger[kind]]
    return "\n".join(lines) + "\n"


def _md_runs(report: dict[str, Any]) -> str:
    return _section("Runs", ["run", "run id(s)", "scenario", "method", "aggregation", "rounds", "status", "student sha256"], [
        [run["run"] + ("" if run["verified"] else " *(unverified)*"), ", ".join(run["run_ids"]), run["scenario"], run["method"],
         run["aggregation"], f"{run['rounds']} of {run['num_server_rounds']}", run["status"] + (f": {run['error']}" if run["error"] else ""),
         f"`{run['student_sha256']}`" if run["student_sha256"] else ""] for run in report["runs"]])


def _md_institutions(report: dict[str, Any]) -> str:
    rows = []
    for name, inst in report["institutions"].items():
        logs = [log for log in report["release_logs"] if log["institution"] == name]
        missing = sum(len(log["missing"]) for log in logs)
        logged = (f"{sum(log['releases'] for log in logs)} logged, " + (f"**{missing} missing from the ledger**" if missing else
                  "all in the ledger")) if logs else "not given"
        rounds = "; ".join(f"{run}: {', '.join(map(str, r)) if len(r) <= 8 else f'{len(r)} rounds, {r[0]}-{r[-1]}'}"
                           for run, r in inst["rounds"].items())
        unverified = f" *(unverified: {', '.join(inst['unverified_runs'])})*" if inst["unverified_runs"] else ""
        rows.append([name + unverified, len(inst["runs"]), rounds, inst["releases_accepted"], inst["releases_rejected"],
                     f"{inst['bytes_accepted']:,}", f"{inst['bytes_sent']:,}", "; ".join(inst["data_categories"]),
                     inst["first_release"], inst["last_release"], logged])
    return _section("Institutions", ["institution", "runs", "rounds joined", "accepted", "rejected", "bytes accepted", "bytes sent",
                                     "data categories", "first release", "last release", "release log"], rows,
                    note="*Bytes sent* counts accepted releases and rejected ones that carried an attestation.")


def _md_rejections(report: dict[str, Any]) -> str:
    return _section("Rejections", ["run", "round", "institution", "node", "check", "reason", "time"], [
        [r["run"], r["round"], name, r["node_id"], r["check"], r["reason"], r["time"]]
        for name, inst in report["institutions"].items() for r in inst["rejections"]], empty="No reply was rejected.")


def _md_privacy(report: dict[str, Any]) -> str:
    note = ("The sums are basic composition over every attested release (accepted or rejected: both left the institution), an "
            "upper bound; *epsilon_total* is the institution's own accounting. Per-release figures are in the JSON report.")
    if any(inst["privacy_summary"]["no_guarantee"] for inst in report["institutions"].values()):
        note += ("\n\n**Mechanism `none`**: epsilon 0 is recorded for releases made without a privacy mechanism; it means no "
                 "differential-privacy guarantee was claimed, not perfect privacy.")
    return _section("Privacy", ["institution", "mechanism(s)", "attested releases", "epsilon per release (max)",
                                "epsilon, sum over releases", "epsilon_total reported (max)", "delta, sum"], [
        [name, ", ".join(inst["privacy_mechanisms"]) or "none", s["releases"], f"{s['epsilon_max']:g}", f"{s['epsilon_sum']:g}",
         f"{s['epsilon_total_reported_max']:g}", f"{s['delta_sum']:g}"]
        for name, inst in report["institutions"].items() for s in [inst["privacy_summary"]]], note=note)


def _md_release_logs(report: dict[str, Any]) -> str:
    return _section("Release logs", ["log", "institution", "releases", "accepted", "rejected", "late (timed out)",
                                     "missing from the ledger", "of other runs", "all in the ledger", "verified against"], [
        [f"`{log['path']}`", log["institution"], log["releases"], log["accepted"], log["rejected"], log["late"],
         "; ".join(f"{m['run']} round {m['round']}" for m in log["missing"]) or "0", log["other_runs"],
         "yes" if log["all_in_ledger"] else "**no**", ", ".join(log["checked_against"]) or "**not checked**"]
        for log in report["release_logs"]], empty="No institution's release log was given: the ledgers were not cross-checked.")


def _section(title: str, headers: list[str], rows: list[list[Any]], empty: str = "", note: str = "") -> str:
    if not rows and empty:
        return f"## {title}\n\n{empty}\n"
    return "\n".join([f"## {title}\n", *_table(headers, rows)]) + "\n" + (f"\n{note}\n" if note else "")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_cell("" if value is None else value) for value in row) + " |" for row in rows]


def _cell(value: Any) -> str:
    """Text made safe for one Markdown table cell: no row breaks, no column breaks."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _axis(report: dict[str, Any]) -> tuple[dict[tuple[str, Any], int], list[str]]:
    """Every round of every run, in ledger order: (run, round) -> x position, and the tick labels."""
    points = [(run, round_) for run, round_ in report["rounds_axis"]]
    one_run = len({run for run, _ in points}) <= 1
    return {point: x for x, point in enumerate(points)}, [str(r) if one_run else f"{run}:{r}" for run, r in points]


def _plot_bytes(report: dict[str, Any], path: Path) -> None:
    """Bytes each institution sent per round, rejected releases crossed out in red."""
    plt, fig, ax = _figure()
    index, ticks = _axis(report)
    crossed: list[tuple[int, int]] = []
    for name, inst in report["institutions"].items():
        totals: dict[int, int] = {}
        for item in inst["per_round"]:
            if (x := index.get((item["run"], item["round"]))) is not None:
                totals[x] = totals.get(x, 0) + item["bytes"]
                crossed += [] if item["accepted"] else [(x, totals[x])]
        xs = sorted(totals)
        ax.plot(xs, [totals[x] for x in xs], marker="o", markersize=4, label=name)
    if crossed:
        ax.scatter(*zip(*crossed), marker="x", s=70, color="red", zorder=3, label="rejected by the coordinator")
    ax.set(xlabel="round", ylabel="bytes sent", title="bytes released per round, per institution", ylim=(0, None))
    _save(fig, ax, ticks, path, plt)


def _plot_epsilon(report: dict[str, Any], path: Path) -> None:
    """Cumulative epsilon per institution (basic composition over attested releases)."""
    plt, fig, ax = _figure()
    index, ticks = _axis(report)
    for name, inst in report["institutions"].items():
        points = sorted((index[(p["run"], p["round"])], p["epsilon"]) for p in inst["privacy"] if (p["run"], p["round"]) in index)
        xs = [x for x, _ in points]
        ax.step(xs, list(itertools.accumulate(epsilon for _, epsilon in points)), where="post", marker="o", markersize=4, label=name)
    if all(inst["privacy_summary"]["no_guarantee"] for inst in report["institutions"].values()):
        ax.annotate("mechanism 'none': epsilon 0 means no guarantee was claimed", xy=(0.02, 0.95), xycoords="axes fraction",
                    fontsize=8, va="top", color="darkred")
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="privacy spent per institution (sum of epsilon)", ylim=(0, None))
    _save(fig, ax, ticks, path, plt)


def _figure() -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    return plt, fig, ax


def _save(fig: Any, ax: Any, ticks: list[str], path: Path, plt: Any) -> None:
    if ticks:
        step, long = max(1, -(-len(ticks) // 20)), len(ticks[0]) >= 6  # at most about 20 labels
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], rotation=30 if long else 0, ha="right" if long else "center")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
