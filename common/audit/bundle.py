"""An audit bundle: one file holding everything `fedstill audit verify` needs about one run, verifiable anywhere.

The bundle carries the coordinator's ledger, the run's allow-list and coordinator public key as the
run recorded them, its results.json audit section, and each institution's release log given (with the
heads it cosigned and its receipts). Verifying a bundle needs no network and nothing from the
coordinator's machine. What it cannot carry is trust: an auditor still pins the coordinator key and
the allow-list from a source of their own (`--coordinator-key`, `--allow-list`); without them the
bundle's copies are used and the verification says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.audit.keys import load_allow_list
from common.errors import ConfigError
from common.files import PRIVATE, atomic_write_text, private_folder

BUNDLE_KIND = "fedstill/audit-bundle/v1"
LEDGER, RESULTS, ALLOW_LIST, COORDINATOR_PUB = "ledger.jsonl", "results.json", "allow-list.toml", "coordinator.pub"


@dataclass(frozen=True)
class Unpacked:
    """A bundle written out as files: the ledger in its run folder, the release logs, and the run's keys."""

    ledger: Path
    release_logs: list[Path]
    allow_list: dict[str, str] | None
    coordinator_key: str | None


def write_bundle(run_dir: Path, release_logs: list[Path], out: Path) -> dict[str, Any]:
    """Gather run folder `run_dir` (ledger, results.json, allow-list and coordinator key when present) and the
    release logs into `out`, written atomically; returns what it holds."""
    ledger = run_dir / LEDGER
    if not ledger.is_file():
        raise ConfigError(f"{run_dir} holds no {LEDGER}: give the run folder")
    missing = [str(p) for p in release_logs if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"not found: {', '.join(missing)}; give each institution's release-log.jsonl")
    logs: dict[str, str] = {}
    for path in release_logs:
        text = Path(path).read_text(encoding="utf-8")
        name = _institution(text) or Path(path).parent.name
        if name in logs:
            raise ConfigError(f"two release logs of {name!r} given; give each institution's log once")
        logs[name] = text
    results = run_dir / RESULTS
    audit = json.loads(results.read_text(encoding="utf-8")).get("audit") if results.is_file() else None
    allow_list = _allow_list(run_dir)
    pub = run_dir / COORDINATOR_PUB
    bundle = {
        "kind": BUNDLE_KIND, "run": run_dir.name, "ledger": ledger.read_text(encoding="utf-8"), "results_audit": audit,
        "allow_list": allow_list, "coordinator_key": pub.read_text(encoding="ascii").strip() if pub.is_file() else None,
        "release_logs": logs,
    }
    atomic_write_text(out, json.dumps(bundle, sort_keys=True) + "\n", mode=PRIVATE)
    return bundle


def is_bundle(path: Path) -> bool:
    """Whether `path` is an audit bundle (a JSON object of kind BUNDLE_KIND), not a ledger."""
    try:
        with Path(path).open("rb") as handle:
            start = handle.read(64).lstrip()
    except OSError:
        return False
    return start.startswith(b"{") and _kind(path) == BUNDLE_KIND


def unpack(path: Path, into: Path) -> Unpacked:
    """Write a bundle's ledger, results and release logs under folder `into`, as a run folder and site folders."""
    try:
        bundle = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a readable audit bundle (JSON); make it with `fedstill audit bundle`") from None
    if not isinstance(bundle, dict) or bundle.get("kind") != BUNDLE_KIND or not isinstance(bundle.get("ledger"), str) \
            or not isinstance(bundle.get("release_logs"), dict):
        raise ConfigError(f"{path} is not an audit bundle of kind {BUNDLE_KIND}; make it with `fedstill audit bundle`")
    run = into / _safe(str(bundle.get("run") or "run"))
    private_folder(run)
    atomic_write_text(run / LEDGER, bundle["ledger"], mode=PRIVATE)
    if isinstance(bundle.get("results_audit"), dict):
        atomic_write_text(run / RESULTS, json.dumps({"audit": bundle["results_audit"]}), mode=PRIVATE)
    logs = []
    for name, text in sorted(bundle["release_logs"].items()):
        folder = into / "sites" / _safe(str(name))
        private_folder(folder)
        atomic_write_text(folder / "release-log.jsonl", str(text), mode=PRIVATE)
        logs.append(folder / "release-log.jsonl")
    allow_list = bundle.get("allow_list")
    key = bundle.get("coordinator_key")
    return Unpacked(run / LEDGER, logs, allow_list if isinstance(allow_list, dict) else None, key if isinstance(key, str) else None)


def _kind(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None


def _institution(text: str) -> str | None:
    first = text.split("\n", 1)[0]
    try:
        name = json.loads(first)["body"].get("institution_id")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _allow_list(run_dir: Path) -> dict[str, str] | None:
    """The run's allow-list: the file beside the run folder when there is one, else what the ledger recorded."""
    for path in (run_dir / ALLOW_LIST, run_dir.parent / ALLOW_LIST):
        if path.is_file():
            return load_allow_list(path)
    first = (run_dir / LEDGER).read_text(encoding="utf-8").split("\n", 1)[0]
    try:
        recorded = json.loads(first)["body"].get("allow_list")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _safe(name: str) -> str:
    """A bundle's names become folder names: nothing that leaves the folder."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    return cleaned or "unnamed"
