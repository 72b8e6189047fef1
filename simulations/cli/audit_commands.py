"""`fedstill keygen` and `fedstill audit verify|report`: institution identities and compliance checks."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from common.audit.keys import (
    PASSPHRASE_ENV,
    Signer,
    check_name,
    decode_public,
    load_allow_list,
    write_allow_list,
    write_key_pair,
)
from common.errors import AuditError, ConfigError, FedstillError
from simulations.cli.console import console, fail

audit_app = typer.Typer(help="Verify ledgers and release logs; build compliance reports.", no_args_is_help=True)


def keygen(
    name: str = typer.Argument(..., help="Institution id (or 'coordinator'): letters, digits, '.', '_', '-'."),
    out: Path = typer.Option(Path("keys"), "--out", "-o", help="Folder for NAME.key (0600) and NAME.pub."),
    passphrase_env: str = typer.Option("", help="Encrypt the private key with the passphrase in this environment variable "
                                       f"(e.g. {PASSPHRASE_ENV})."),
    allow_list: Path = typer.Option(None, help="Also add the public key to this allow-list TOML (created if missing)."),
) -> None:
    """Make an Ed25519 key pair for an institution (or the coordinator)."""
    try:
        signer = Signer.generate(check_name(name))
        passphrase = None
        if passphrase_env:
            if not os.environ.get(passphrase_env):
                raise ConfigError(f"--passphrase-env {passphrase_env}: that environment variable is empty or unset")
            passphrase = os.environ[passphrase_env].encode("utf-8")
        private, public = write_key_pair(signer, out, passphrase)
        if allow_list is not None:
            entries = load_allow_list(allow_list) if allow_list.exists() else {}
            if name in entries:
                raise ConfigError(f"{allow_list} already lists {name!r}; remove that line first to replace its key")
            write_allow_list(allow_list, {**entries, name: signer.public})
    except FedstillError as error:
        fail(error)
    console.print(f"private key {private} (mode 0600{', encrypted' if passphrase else ''}); public key {public}")
    console.print(f"allow-list line:  \"{name}\" = \"{signer.public}\"", soft_wrap=True)
    if allow_list is not None:
        console.print(f"added to {allow_list}")


@audit_app.command()
def verify(
    ledger: Path = typer.Argument(..., help="The coordinator's ledger.jsonl (in the run folder), or an audit bundle."),
    client_log: list[Path] = typer.Option([], "--client-log", "-c", help="An institution's release-log.jsonl to cross-check (repeatable)."),
    coordinator_key: Path = typer.Option(None, help="The coordinator's public key file (.pub) you trust; pins the ledger's signer."),
    allow_list: Path = typer.Option(None, help="The allow-list of institution keys you trust (default: the one the ledger recorded)."),
    quorum: int = typer.Option(None, min=0, help="Cosignatures the final tree head needs (default: every institution "
                                                 "present at the end of the run; 0 accepts an unwitnessed record)."),
) -> None:
    """Check every signature, hash link and sequence number, the institutions' cosignatures of the ledger, and
    cross-check their release logs (heads cosigned, receipts, releases)."""
    import tempfile

    from common.audit.bundle import is_bundle, unpack
    from common.audit.verify import verify_ledger

    try:
        pinned = _read_public(coordinator_key) if coordinator_key else None
        keys = load_allow_list(allow_list) if allow_list else None
        with tempfile.TemporaryDirectory() as scratch:
            if is_bundle(ledger):
                unpacked = unpack(ledger, Path(scratch))
                console.print(f"audit bundle {escape(str(ledger))}: {len(unpacked.release_logs)} release log(s)", soft_wrap=True)
                if pinned is None and unpacked.coordinator_key:
                    console.print("[yellow]note[/]: coordinator key taken from the bundle; pass --coordinator-key with "
                                  "a copy you trust", soft_wrap=True)
                ledger, client_log = unpacked.ledger, [*unpacked.release_logs, *client_log]
                pinned, keys = pinned or unpacked.coordinator_key, keys if keys is not None else unpacked.allow_list
            result = verify_ledger(ledger, coordinator_key=pinned, allow_list=keys, client_logs=client_log, quorum=quorum)
    except FedstillError as error:
        fail(error)
    for name, count in result.checked.items():
        console.print(f"read {count} entries of {escape(str(name))}")
    for note in result.notes:
        console.print(f"[yellow]note[/]: {escape(note)}", soft_wrap=True)
    for problem in result.problems:
        console.print(f"[red]FAIL[/] {escape(str(problem))}", soft_wrap=True)
    if not result.ok:
        console.print(f"[red]{len(result.problems)} problem(s)[/]: the record cannot be trusted as it stands")
        raise typer.Exit(code=1)
    console.print("[green]OK[/]: every signature, hash link and sequence number holds"
                  + (f"; {len(client_log)} release log(s) match the ledger" if client_log else ""))


@audit_app.command()
def bundle(
    run_dir: Path = typer.Argument(..., help="The run folder (it holds ledger.jsonl and results.json)."),
    client_log: list[Path] = typer.Option([], "--client-log", "-c", help="An institution's release-log.jsonl to include (repeatable)."),
    out: Path = typer.Option(None, "--out", "-o", help="The bundle file (default: RUN_DIR/audit-bundle.json)."),
) -> None:
    """Write one file with the run's ledger, results, allow-list, coordinator key and the release logs given:
    `fedstill audit verify BUNDLE` checks it anywhere, with no network and nothing from the coordinator's machine."""
    from common.audit.bundle import write_bundle

    target = out if out is not None else run_dir / "audit-bundle.json"
    try:
        written = write_bundle(run_dir, client_log, target)
    except FedstillError as error:
        fail(error)
    console.print(f"wrote {escape(str(target))}: ledger of {written['ledger'].count(chr(10))} entries, "
                  f"{len(written['release_logs'])} release log(s)", soft_wrap=True)


@audit_app.command()
def report(
    ledgers: list[Path] = typer.Argument(..., metavar="LEDGER...", help="Coordinator ledgers (ledger.jsonl), one per run."),
    client_log: list[Path] = typer.Option([], "--client-log", "-c", help="An institution's release-log.jsonl to cross-check (repeatable)."),
    coordinator_key: Path = typer.Option(None, help="The coordinator's public key file (.pub) you trust; pins every ledger's signer."),
    allow_list: Path = typer.Option(None, help="The allow-list of institution keys you trust (default: the one each ledger recorded)."),
    privacy_ledger: list[str] = typer.Option([], "--privacy-ledger", "-p", metavar="[NAME=]PATH",
                                             help="An institution's privacy-ledger.json, for its privacy across runs (repeatable). "
                                                  "NAME=PATH names the institution; a bare PATH takes it from the "
                                                  "release-log.jsonl beside it."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for audit-report.json/.md/.html and plots (default: the first "
                             "ledger's folder)."),
) -> None:
    """Verify runs and report, per institution, what it released: rounds, bytes, data categories, privacy, refusals,
    rejections, witnessed checkpoints; as JSON, Markdown and one self-contained HTML page."""
    from common.audit.report import build_report, write_report
    from common.audit.report_privacy import privacy_ledger_arguments

    try:
        pinned = _read_public(coordinator_key) if coordinator_key else None
        keys = load_allow_list(allow_list) if allow_list else None
        spent = privacy_ledger_arguments(privacy_ledger)
        result = build_report(ledgers, client_log, coordinator_key=pinned, allow_list=keys, privacy_ledgers=spent)
        paths = write_report(result, out if out is not None else ledgers[0].parent)
    except FedstillError as error:
        fail(error)
    for ledger in result["ledgers"]:
        status = "[green]verified[/]" if ledger["ok"] else f"[red]NOT VERIFIED[/] ({len(ledger['problems'])} problem(s))"
        console.print(f"{escape(ledger['path'])} ({escape(ledger['run'])}): {status}", soft_wrap=True)
        for problem in ledger["problems"][:5]:
            console.print(f"  [red]FAIL[/] {escape(problem)}", soft_wrap=True)
        if len(ledger["problems"]) > 5:
            console.print(f"  ... and {len(ledger['problems']) - 5} more (see the report)")
    for name, inst in result["institutions"].items():
        ledger = inst.get("privacy_ledger")
        spent_text = (f"; epsilon across runs {ledger['epsilon_composed']:.4g} (basic composition "
                      f"{ledger['epsilon_basic_composition']:.4g})" if ledger else
                      "; no formal privacy guarantee" if inst["privacy_summary"]["no_guarantee"] else "")
        console.print(f"{escape(name)}: {len(inst['runs'])} run(s), {sum(len(r) for r in inst['rounds'].values())} round(s), "
                      f"{inst['releases_accepted']} accepted, {inst['releases_rejected']} rejected"
                      + (f" ({inst['refusals']} refused by the institution)" if inst.get("refusals") else "")
                      + f", {inst['bytes_sent']:,} bytes sent" + escape(spent_text), soft_wrap=True)
    for path in paths:
        console.print(f"wrote {escape(str(path))}", soft_wrap=True)
    if not result["verified"]:
        console.print("[red]the report is marked NOT VERIFIED[/]: the record cannot be trusted as it stands")
        raise typer.Exit(code=1)


def _read_public(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"coordinator key {path} not found (the run folder holds coordinator.pub)")
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        decode_public(text, str(path))
    except AuditError as error:
        raise ConfigError(str(error)) from None
    return text
