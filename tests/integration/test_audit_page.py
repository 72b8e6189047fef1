"""End to end: three real runs of the same three institutions — one under DP-SGD, one where an institution refuses
on its spent budget (PATE), one without a privacy mechanism — reported by `fedstill audit report` as one
self-contained HTML page, which headless Chromium opens: the test reads the verdicts and tables from the DOM the
browser built and saves a screenshot (set FEDSTILL_AUDIT_SCREENSHOT=path to keep a copy, as docs/images/ does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from common.audit.keys import Signer, write_key_pair
from simulations.launcher import local_superlinks
from simulations.provision import provision_sites

from run_cli import fedstill

CHROMIUM = Path("/usr/bin/chromium")
NO_GUARANTEE = "no formal privacy guarantee"
RUNS = ("dp-sgd", "refusal", "plain")
INSTITUTIONS = ("institution-0", "institution-1", "institution-2")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is absent: install Debian's chromium package "
                                                      "(scripts/setup.sh does where apt is available) to open the page"),
]


@dataclass(frozen=True)
class Federation:
    """Three finished runs of one federation, and where the coordinator's and the institutions' records are."""

    root: Path
    runs: Path  # output-dir: one folder per run
    sites: Path  # each institution's own folder: key, release log, privacy ledger, site.toml
    allow_list: Path
    coordinator_pub: Path

    def results(self, run: str) -> dict[str, Any]:
        return json.loads((self.runs / run / "results.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """The three runs, made once for the module: the same institutions (keys, release logs, privacy ledgers) and one
    coordinator key throughout, each institution setting its own budget in its site.toml before each run."""
    root = tmp_path_factory.mktemp("audit-page")
    home = root / "flwr-home"
    keys = provision_sites(root / "federation", 3)
    write_key_pair(Signer.generate("coordinator"), root / "federation")
    fed = Federation(root, root / "runs", Path(keys["sites-dir"]), Path(keys["allow-list"]),
                     root / "federation" / "coordinator.pub")
    shared = ["--set", f"output-dir={fed.runs}", "--set", f'allow-list="{fed.allow_list}"', "--set", f'sites-dir="{fed.sites}"',
              "--set", f'coordinator-key="{root / "federation" / "coordinator.key"}"']
    plan = [  # run, its settings, each institution's max-epsilon (None: no budget, as a plain run needs)
        ("dp-sgd", ["--set", 'privacy="dp-sgd"', "--set", 'teacher-models="scatter-linear"'], (4, 4, 4)),
        # institution-2 spent its 4 above; PATE's first answers cost about 14: it refuses both rounds
        ("refusal", ["--set", 'privacy="pate"', "--set", "pate-teachers=3", "--set", "pate-queries=200",
                     "--set", "pate-sigma=8.0"], (40, 40, 4)),
        ("plain", [], None),
    ]
    try:
        for run, settings, budgets in plan:
            for i, name in enumerate(INSTITUTIONS):
                site = fed.sites / name / "site.toml"
                site.unlink(missing_ok=True)
                if budgets is not None:
                    site.write_text(f"max-epsilon = {budgets[i]}\n", encoding="utf-8")
            result = fedstill("simulate", "digits-tiny", *shared, "--set", f'run-name="{run}"', *settings, home=home)
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        yield fed
    finally:
        assert local_superlinks(home) == [], "the launcher left a local SuperLink running"


@pytest.fixture(scope="module")
def report(federation: Federation) -> Path:
    """`fedstill audit report` over the three runs, with every release log and privacy ledger: its output folder."""
    out = federation.root / "report"
    logs = [arg for name in INSTITUTIONS for arg in ("-c", str(federation.sites / name / "release-log.jsonl"))]
    ledgers = {name: federation.sites / name / "privacy-ledger.json" for name in INSTITUTIONS}
    spent = ["--privacy-ledger", str(ledgers["institution-0"]),  # named by the release log beside it
             *[arg for name in INSTITUTIONS[1:] for arg in ("--privacy-ledger", f"{name}={ledgers[name]}")]]
    result = fedstill("audit", "report", *[str(federation.runs / run / "ledger.jsonl") for run in RUNS], *logs, *spent,
                      "--coordinator-key", str(federation.coordinator_pub), "--allow-list", str(federation.allow_list),
                      "--out", str(out), home=federation.root / "flwr-home")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


class Dom(HTMLParser):
    """The DOM Chromium dumped: each table cell's text with its table's class, its card's institution, its row's run."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: list[tuple[str, str | None, str | None, str, str]] = []  # (table, institution, run, class, text)
        self.banner = ""
        self._at: dict[str, Any] = {"table": "", "article": None, "run": None, "cell": None, "banner": False}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "article":
            self._at["article"] = values.get("data-institution")
        elif tag == "table":
            self._at["table"] = values.get("class") or ""
        elif tag == "tr":
            self._at["run"] = values.get("data-run") or values.get("data-institution")
        elif tag == "td":
            self._at["cell"] = (values.get("class") or "", [])
        elif values.get("id") == "overall":
            self._at["banner"] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._at["cell"] is not None:
            cls, text = self._at["cell"]
            self.cells.append((self._at["table"], self._at["article"], self._at["run"], cls, "".join(text).strip()))
            self._at["cell"] = None
        elif tag == "article":
            self._at["article"] = None
        elif tag == "p":
            self._at["banner"] = False

    def handle_data(self, data: str) -> None:
        if self._at["cell"] is not None:
            self._at["cell"][1].append(data)
        if self._at["banner"]:
            self.banner += data

    def rows(self, table: str, institution: str | None = None) -> dict[str | None, list[str]]:
        """Row key (its run, or its institution in the overview) -> the texts of its cells, for one table."""
        found: dict[str | None, list[str]] = {}
        for cell_table, article, key, _, text in self.cells:
            if cell_table == table and article == institution:
                found.setdefault(key, []).append(text)
        return found

    def facts(self, table: str, institution: str) -> dict[str, str]:
        texts = [text for cell_table, article, _, _, text in self.cells if cell_table == table and article == institution]
        return dict(zip(texts[::2], texts[1::2], strict=True))


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a local file, offline: no sandbox (tests may run as root), no network services."""
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_html_report_of_three_runs_reads_right_in_chromium(federation: Federation, report: Path) -> None:
    # Prepare
    page = report / "audit-report.html"
    screenshot = federation.root / "audit-report.png"

    # Execute: the DOM Chromium builds from the file, and what it paints
    dumped = chromium(page, federation.root / "chromium-dom", "--dump-dom")
    painted = chromium(page, federation.root / "chromium-shot", f"--screenshot={screenshot}", "--window-size=1280,2000",
                       "--hide-scrollbars")

    # Assert: every run verified
    assert dumped.returncode == 0 and "</html>" in dumped.stdout, dumped.stderr[-2000:]
    dom = Dom(dumped.stdout)
    assert dom.banner.startswith("VERIFIED: every signature")
    runs = dom.rows("runs")
    assert {run: cells[1] for run, cells in runs.items()} == {run: "verified" for run in RUNS}
    # the DP run: its mechanism, and each institution's epsilon as it attested it and as its privacy ledger gives it
    assert runs["dp-sgd"][5] == "dp-sgd" and runs["plain"][5] == NO_GUARANTEE and runs["refusal"][5] == "pate"
    for name in INSTITUTIONS:
        spent = federation.results("dp-sgd")["privacy"]["epsilon_final"][name]
        privacy = dom.rows("privacy-runs", name)
        assert privacy["dp-sgd"][1] == "dp-sgd" and privacy["dp-sgd"][3] == f"{spent:.4g}", privacy["dp-sgd"]
        assert privacy["dp-sgd"][5] == f"{spent:.4g}"  # its privacy ledger: the run alone
        # the plain run: no formal privacy guarantee, in every column, never epsilon 0
        assert privacy["plain"][1:6] == [NO_GUARANTEE, "2", NO_GUARANTEE, NO_GUARANTEE, NO_GUARANTEE]
    # the institution that refused: two refusals on its budget in the PATE run, named by its own claim
    turned_down = [c[4] for c in dom.cells if c[0] == "turned-down"]
    assert turned_down[:5] == ["refusal", "1", "institution-2 (claimed)", "refused by the institution", "privacy-budget"]
    assert turned_down[6:11] == ["refusal", "2", "institution-2 (claimed)", "refused by the institution", "privacy-budget"]
    assert len(turned_down) == 12
    overview = dom.rows("institutions")
    assert overview["institution-2"][:5] == ["institution-2", "3", "4", "0", "2"]  # runs, accepted, rejected, refused
    refusals = [cells for cells in dom.rows("refusals", "institution-2").values()]
    assert len(refusals) == 1 and refusals[0][0] == "refusal"  # one row key (the run) ...
    cells = [c for c in dom.cells if c[0] == "refusals" and c[1] == "institution-2"]
    assert [c[4] for c in cells if c[3] == "check"] == ["privacy-budget", "privacy-budget"]  # ... two rows
    reasons = [c[4] for c in cells if "PrivacyBudgetExceeded" in c[4]]
    assert len(reasons) == 2 and all("above max-epsilon 4 " in reason for reason in reasons), reasons
    assert "its own claim (unverified)" in [c[4] for c in cells]
    assert dom.rows("refusals", "institution-0") == {}
    # privacy across runs, from institution-0's own privacy ledger: the accountant's epsilon below the sum of the runs
    across = dom.facts("privacy-ledger", "institution-0")
    composed = float(across["epsilon composed by the accountant over its whole history"])
    basic = float(across["basic-composition bound (sum of each run's epsilon)"])
    assert 4 < composed < basic, across
    # the screenshot
    assert painted.returncode == 0 and screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), painted.stderr[-2000:]
    if target := os.environ.get("FEDSTILL_AUDIT_SCREENSHOT"):
        shutil.copyfile(screenshot, target)


def test_the_runs_name_institutions_and_the_refusal_by_its_claim(federation: Federation, report: Path) -> None:
    # Prepare
    refusal, plain = federation.results("refusal"), federation.results("plain")

    # Execute
    audit = json.loads((report / "audit-report.json").read_text(encoding="utf-8"))
    page = (federation.runs / "refusal" / "report.md").read_text(encoding="utf-8")

    # Assert: results.json names each node, the refusing one by its claim (it never signed anything in that run)
    for row in refusal["rounds"]:
        assert sorted(row["institutions"].values()) == ["institution-0", "institution-1"]
        assert list(row["institutions_claimed"].values()) == ["institution-2"]
        assert set(row["clients_rejected"]) == set(row["institutions_claimed"])
    assert [(r["institution_id"], r["institution_from"], r["check"]) for r in refusal["privacy"]["refusals"]] == [
        ("institution-2", "claim", "privacy-budget")] * 2
    assert plain["privacy"]["guarantee"] == "none" and plain["privacy"]["epsilon_max"] is None
    assert "| institution-2 (claimed) |" in page and "2 budget refusal(s)" in page
    # the JSON report: no epsilon for the plain run, the composition figures for institution-0
    inst = audit["institutions"]["institution-0"]
    assert inst["privacy_runs"]["plain"]["epsilon_sum"] is None and inst["privacy_runs"]["plain"]["guarantee"] == "none"
    assert inst["privacy_summary"]["runs_without_guarantee"] == ["plain"]
    ledger = inst["privacy_ledger"]
    assert [r["run"] for r in ledger["runs"]] == ["dp-sgd", "refusal"]
    assert ledger["epsilon_composed"] < ledger["epsilon_basic_composition"] == pytest.approx(sum(r["epsilon"] for r in ledger["runs"]))
    assert audit["institutions"]["institution-2"]["refusals"] == 2
