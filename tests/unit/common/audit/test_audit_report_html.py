"""Unit tests of the compliance report's HTML page (common/audit/report_html.py), its privacy across runs from the
institutions' own privacy ledgers (common/audit/report_privacy.py), and `fedstill audit report --privacy-ledger`, on
real signed ledgers (test_audit_report.fabricate_run). The page is parsed as a browser's parser would; the
integration test opens it in Chromium."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from test_audit_report import INSTITUTIONS, fabricate_run, release_logs
from typer.testing import CliRunner

from common.audit import kinds
from common.audit.keys import Signer
from common.audit.ledger import Ledger
from common.audit.report import COSIGNED, HTML_FILE, build_report, write_report
from common.audit.report_privacy import NO_GUARANTEE, privacy_ledger_arguments
from common.errors import ConfigError
from common.privacy import accounting
from simulations.cli.main import app

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
EVENT = {"mechanism": "gaussian", "noise_multiplier": 5.0, "releases": 2}
DELTA = 1e-5


class Cell(NamedTuple):
    table: str  # the class of its table
    article: str | None  # the institution whose card holds it
    row: dict[str, str | None]  # its row's attributes
    cls: str
    text: str


class Page(HTMLParser):
    """Every tag with its attributes, every text, and every table cell with where it stands."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[Cell] = []
        self.text: list[str] = []
        self._table, self._article, self._row = "", None, {}
        self._cell: tuple[str, list[str]] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        values = dict(attrs)
        if tag == "article":
            self._article = values.get("data-institution")
        elif tag == "table":
            self._table = values.get("class") or ""
        elif tag == "tr":
            self._row = values
        elif tag == "td":
            self._cell = (values.get("class") or "", [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append(Cell(self._table, self._article, self._row, self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "article":
            self._article = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell[1].append(data)

    def row(self, table: str, article: str | None = None, **attrs: str) -> list[str]:
        """The texts of the cells of the first row of `table` (in `article`) whose attributes include `attrs`
        (data_run for data-run)."""
        wanted = {key.replace("_", "-"): value for key, value in attrs.items()}
        found = [c for c in self.cells if c.table == table and c.article == article
                 and all(c.row.get(k) == v for k, v in wanted.items())]
        return [c.text for c in found if found and c.row is found[0].row]

    def facts(self, table: str, article: str) -> dict[str, str]:
        """A two-column table of (label, value) rows, as a dict."""
        cells = [c for c in self.cells if c.table == table and c.article == article]
        return {label.text: value.text for label, value in zip(cells[::2], cells[1::2], strict=True)}


@pytest.fixture
def signers() -> dict[str, Signer]:
    return {name: Signer.generate(name) for name in (kinds.COORDINATOR, *INSTITUTIONS)}


def privacy_ledger(path: Path, runs: list[str]) -> Path:
    """An institution's privacy-ledger.json holding one Gaussian release event per run (common.privacy.budget's format)."""
    entries = [{"run_id": run_id, "round": 1, "event": EVENT, "epsilon_after": 1.0, "time": "2025-01-01T00:00:00+00:00"}
               for run_id in runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"delta": DELTA, "entries": entries}), encoding="utf-8")
    return path


def two_runs(tmp_path: Path, signers: dict[str, Signer]) -> dict[str, Any]:
    """Two runs of inst-a (Gaussian mechanism) and inst-b (none), inst-a's privacy ledger holding both."""
    first = fabricate_run(tmp_path / "run1", signers, run_id="1001")
    second = fabricate_run(tmp_path / "run2", signers, run_id="2002")
    spent = privacy_ledger(tmp_path / "inst-a" / "privacy-ledger.json", ["1001", "2002"])
    return build_report([first, second], release_logs(tmp_path / "run1") + release_logs(tmp_path / "run2"),
                        privacy_ledgers=[("inst-a", spent)])


def page_of(report: dict[str, Any], out: Path) -> str:
    write_report(report, out)
    return (out / HTML_FILE).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------


def test_the_page_shows_each_run_verified_and_each_institution(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    report = two_runs(tmp_path, signers)

    # Execute
    page = Page(page_of(report, tmp_path / "out"))

    # Assert
    for run in ("run1", "run2"):
        assert page.row("runs", data_run=run)[:2] == [run, "verified"]
    assert [c.cls for c in page.cells if c.table == "runs" and c.text == "verified"] == ["verdict verified"] * 2
    assert {attrs.get("data-institution") for tag, attrs in page.tags if tag == "article"} == {"inst-a", "inst-b"}
    assert any("VERIFIED: every signature" in text for text in page.text)
    assert page.row("rejections", "inst-b")[:5] == ["run1", "2", "soft-labels", "22", "digest"]
    assert page.row("rejections", "inst-b")[6] == "its signed attestation"  # node 22 signed accepted replies too
    assert page.facts("facts", "inst-b")["rejected by the coordinator"] == "2"  # one a run, two runs


def test_an_altered_ledger_shows_not_verified_with_its_problems(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: an entry deleted from the ledger
    ledger = fabricate_run(tmp_path / "run1", signers)
    lines = ledger.read_text(encoding="utf-8").splitlines(keepends=True)
    ledger.write_text("".join(lines[:3] + lines[4:]), encoding="utf-8")

    # Execute
    text = page_of(build_report([ledger]), tmp_path / "out")
    page = Page(text)

    # Assert
    assert page.row("runs", data_run="run1")[1].startswith("NOT VERIFIED (")
    assert [c.cls for c in page.cells if c.table == "runs"][1] == "verdict not-verified"
    assert 'class="banner bad"' in text and "NOT VERIFIED: 1 of 1 ledger(s) failed verification" in text
    assert '<ul class="problems"><li>' in text and "sequence" in text
    assert page.facts("facts", "inst-a")["UNVERIFIED runs"] == "run1"


def test_hostile_strings_from_the_records_are_escaped(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: a coordinator (or anyone who writes a ledger) puts markup in an institution id, a reason and the run name
    ledger = Ledger.open(tmp_path / "run" / "ledger.jsonl", signers[kinds.COORDINATOR], {"run_name": HOSTILE, "allow_list": None})
    ledger.append(kinds.RUN_STARTED, {"run_id": "5", "run_name": HOSTILE, "scenario": HOSTILE, "method": "distill",
                                      "aggregation": "mean", "codec": "float16", "num_server_rounds": 1, "config_sha256": "c" * 64,
                                      "config": {"privacy": HOSTILE}})
    ledger.append(kinds.ROUND_OPENED, {"round": 1, "nodes": ["7"], "query_sha256": "0" * 64, "temperature": 1.0,
                                       "codec": "float16", "samples": 1, "public_fingerprint": "f" * 64})
    ledger.append(kinds.REPLY_REJECTED, {"round": 1, "phase": "soft-labels", "node_id": "7", "institution_id": HOSTILE,
                                         "check": HOSTILE, "reason": HOSTILE, "attestation": None})
    ledger.append(kinds.RUN_FAILED, {"status": "failed", "error": HOSTILE})

    # Execute
    text = page_of(build_report([ledger.path]), tmp_path / "out")
    page = Page(text)

    # Assert: no markup of theirs became a tag or an attribute; it all shows as text
    assert [tag for tag, _ in page.tags if tag in ("script", "iframe", "object", "embed", "link")] == []
    assert all(str(attrs.get("src")).startswith("data:image/png;base64,") for tag, attrs in page.tags if tag == "img")
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    assert HOSTILE not in text and sum(HOSTILE in t for t in page.text) >= 4
    assert any(attrs.get("data-institution") == HOSTILE for tag, attrs in page.tags if tag == "article")


def test_the_page_is_self_contained_with_no_external_url(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    report = two_runs(tmp_path, signers)

    # Execute
    text = page_of(report, tmp_path / "out")
    page = Page(text)

    # Assert: every source and link is inside the page; a policy forbids fetching anything
    links = [value for _, attrs in page.tags for name, value in attrs.items() if name in ("src", "href", "srcset", "action")]
    assert len(links) == 3 and all(str(value).startswith("data:image/png;base64,") for value in links)  # the three charts
    assert "http://" not in text and "https://" not in text
    assert [tag for tag, _ in page.tags if tag in ("script", "link", "iframe")] == []
    [policy] = [attrs["content"] for tag, attrs in page.tags if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy"]
    assert policy is not None and policy.startswith("default-src 'none'; img-src data:")


def test_a_run_without_a_mechanism_says_no_formal_guarantee_never_epsilon_0(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: inst-b releases without a mechanism
    report = build_report([fabricate_run(tmp_path / "run1", signers)])

    # Execute
    page = Page(page_of(report, tmp_path / "out"))

    # Assert: in the overview (privacy, epsilon across runs) and in each column of inst-b's privacy per run
    assert page.row("institutions", data_institution="inst-b")[6:8] == [NO_GUARANTEE, NO_GUARANTEE]
    assert page.row("privacy-runs", "inst-b", data_run="run1") == ["run1", NO_GUARANTEE, "2", NO_GUARANTEE, NO_GUARANTEE,
                                                                     NO_GUARANTEE, "–"]
    assert page.row("privacy-runs", "inst-a", data_run="run1")[1:5] == ["gaussian", "2", "1", "1"]
    assert not any(c.text in ("0", "0.0") for c in page.cells if "epsilon" in c.cls)


def test_the_privacy_ledger_gives_each_run_alone_their_sum_and_the_composed_epsilon(tmp_path: Path,
                                                                                    signers: dict[str, Signer]) -> None:
    # Prepare
    alone = accounting.epsilon([EVENT], DELTA)
    composed = accounting.epsilon([EVENT, EVENT], DELTA)

    # Execute
    report = two_runs(tmp_path, signers)
    page = Page(page_of(report, tmp_path / "out"))

    # Assert: the JSON report
    ledger = report["institutions"]["inst-a"]["privacy_ledger"]
    assert [(r["run"], r["run_id"], r["epsilon"]) for r in ledger["runs"]] == [("run1", "1001", alone), ("run2", "2002", alone)]
    assert ledger["epsilon_basic_composition"] == pytest.approx(2 * alone)
    assert ledger["epsilon_composed"] == pytest.approx(composed) and composed < 2 * alone
    assert ledger["runs_missing"] == [] and report["institutions"]["inst-b"]["privacy_ledger"] is None
    # ... and the page, labelled
    figures = page.facts("privacy-ledger", "inst-a")
    assert figures["epsilon composed by the accountant over its whole history"] == f"{composed:.4g}"
    assert figures["basic-composition bound (sum of each run's epsilon)"] == f"{2 * alone:.4g}"
    assert figures["each run's epsilon alone"] == f"run1: {alone:.4g}; run2: {alone:.4g}"
    assert page.row("privacy-runs", "inst-a", data_run="run2")[5] == f"{alone:.4g}"
    assert page.row("institutions", data_institution="inst-a")[7] == f"{composed:.4g} (basic composition {2 * alone:.4g})"


def test_witnessed_checkpoints_are_counted_per_institution(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: inst-a cosigns the ledger's tree head after each round; both cosign the final head (fabricate_run)
    def cosign(ledger: Ledger, round_: int) -> None:
        size = len(ledger.entries())
        ledger.append(COSIGNED, {"size": size, "root": "ab" * 32, "institution_id": "inst-a",
                                 "key": signers["inst-a"].public, "sig": "c2ln"})

    report = build_report([fabricate_run(tmp_path / "run1", signers, after_round=cosign)])

    # Execute
    page = Page(page_of(report, tmp_path / "out"))

    # Assert
    a, b = report["institutions"]["inst-a"]["witnessed"], report["institutions"]["inst-b"]["witnessed"]
    assert (a["cosignatures"], a["runs"], b["cosignatures"]) == (3, {"run1": 3}, 1)
    assert a["largest_size"] == b["largest_size"] > 0 and report["runs"][0]["cosignatures"] == 4
    witnessed = {c.row.get("data-institution"): c.text for c in page.cells if c.table == "institutions" and "witnessed" in c.cls}
    assert witnessed == {"inst-a": f"3 (largest tree {a['largest_size']} entries)",
                         "inst-b": f"1 (largest tree {b['largest_size']} entries)"}


def test_a_refusal_is_told_apart_from_a_rejection_and_named_by_its_claim(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare: a third node refuses in round 1 with an error reply (no attestation), naming itself in its reason
    def refuse(ledger: Ledger, round_: int) -> None:
        if round_ == 1:
            ledger.append(kinds.REPLY_REJECTED, {"round": 1, "phase": "soft-labels", "node_id": "33", "institution_id": None,
                                                 "check": "privacy-budget", "attestation": None, "reason": (
                                                     "node error: PrivacyBudgetExceeded: round 1 refused [refused by "
                                                     'institution "inst-c"]')})

    report = build_report([fabricate_run(tmp_path / "run1", signers, after_round=refuse)])

    # Execute
    page = Page(page_of(report, tmp_path / "out"))

    # Assert
    [refusal] = report["institutions"]["inst-c"]["rejections"]
    assert (refusal["refusal"], refusal["institution_from"], refusal["node_id"]) == (True, "claim", "33")
    assert report["institutions"]["inst-c"]["refusals"] == 1
    assert report["institutions"]["inst-b"]["rejections"][0]["refusal"] is False  # the digest check: a rejection
    assert page.row("institutions", data_institution="inst-c")[:5] == ["inst-c", "1", "0", "0", "1"]
    assert page.row("refusals", "inst-c") == ["run1", "1", "soft-labels", "33", "privacy-budget", refusal["reason"],
                                              "its own claim (unverified)", refusal["time"]]
    assert page.row("rejections", "inst-c") == []
    turned_down = [c.text for c in page.cells if c.table == "turned-down"]  # every run's, in one table
    assert turned_down[:5] == ["run1", "1", "inst-c (claimed)", "refused by the institution", "privacy-budget"]
    assert turned_down[6:11] == ["run1", "2", "inst-b", "rejected by the coordinator", "digest"]


# ---------------------------------------------------------------------------------------------------
# --privacy-ledger
# ---------------------------------------------------------------------------------------------------


def test_a_privacy_ledger_is_named_by_name_equals_path_or_by_the_release_log_beside_it(tmp_path: Path,
                                                                                      signers: dict[str, Signer]) -> None:
    # Prepare
    fabricate_run(tmp_path / "run1", signers)
    beside = privacy_ledger(tmp_path / "run1" / "sites" / "inst-a" / "privacy-ledger.json", ["1001"])
    alone = privacy_ledger(tmp_path / "elsewhere" / "privacy-ledger.json", ["1001"])

    # Execute / Assert
    assert privacy_ledger_arguments([str(beside), f"inst-b={alone}"]) == [("inst-a", beside), ("inst-b", alone)]
    with pytest.raises(ConfigError, match=r"does not name its institution .*--privacy-ledger NAME="):
        privacy_ledger_arguments([str(alone)])
    with pytest.raises(ConfigError, match="privacy ledger .*nowhere.json not found"):
        privacy_ledger_arguments([f"inst-a={tmp_path / 'nowhere.json'}"])
    with pytest.raises(ConfigError, match="the institution before '=' is not an institution id"):
        privacy_ledger_arguments([f"../x={alone}"])


def test_cli_report_takes_privacy_ledgers_and_writes_the_page(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)
    spent = privacy_ledger(tmp_path / "run1" / "sites" / "inst-a" / "privacy-ledger.json", ["1001"])
    logs = [arg for log in release_logs(tmp_path / "run1") for arg in ("--client-log", str(log))]

    # Execute
    result = CliRunner().invoke(app, ["audit", "report", str(ledger), *logs, "--privacy-ledger", str(spent),
                                      "--out", str(tmp_path / "out")])

    # Assert
    assert result.exit_code == 0, result.output
    alone = accounting.epsilon([EVENT], DELTA)
    assert "inst-a: 1 run(s)" in result.output and f"epsilon across runs {alone:.4g}" in result.output
    assert "inst-b: 1 run(s)" in result.output and "no formal privacy guarantee" in result.output
    assert (tmp_path / "out" / HTML_FILE).is_file()


def test_a_malformed_privacy_ledger_is_a_config_error_naming_the_file(tmp_path: Path, signers: dict[str, Signer]) -> None:
    # Prepare
    ledger = fabricate_run(tmp_path / "run1", signers)
    bad = tmp_path / "privacy-ledger.json"
    bad.write_text('{"delta": 1e-5, "entries": [{"run_id": 1}]}', encoding="utf-8")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"privacy ledger .*privacy-ledger.json: .*entry 0 is malformed"):
        build_report([ledger], privacy_ledgers=[("inst-a", bad)])
    with pytest.raises(ConfigError, match="names inst-a more than once"):
        build_report([ledger], privacy_ledgers=[("inst-a", bad), ("inst-a", bad)])
