"""An institution's list of the app bundles (FABs) allowed to run on its node, and the check of one bundle.

A Flower app travels to a SuperNode as one FAB: a zip built reproducibly (fixed dates, sorted
files) by `flwr build` / `flwr run`, identified by the sha256 of its bytes (the FAB hash). An
institution pins the versions it has reviewed in its own file, passed to `fedstill supernode
--approved-apps`:

    # approved-apps.toml: the app bundles this institution lets run next to its data
    sha256 = [
        "3f2a...",   # fedstill 0.1.0, reviewed 2026-12-01
    ]

`fedstill app-hash PATH` prints the FAB hash of an app folder (what `flwr run PATH` would submit);
with `--approve FILE` it also adds the hash to the list (`approve`), keeping the file's comments.
The node's runner (simulations/deploy/runner.py) hashes the bytes it received and calls
`check_bundle` before the bundle is unpacked: a bundle not listed is refused and none of its files
is written or imported. Messages name hashes only, never the node's local paths: they travel to
the coordinator.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, FedstillError
from common.files import atomic_write_text

HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEADER = "# app bundles (FAB sha256) this institution lets run on its node"
SHA256_LIST = re.compile(r"^[ \t]*sha256[ \t]*=[ \t]*\[", re.MULTILINE)  # where the list of hashes opens


class AppNotApproved(FedstillError):
    """A run's app bundle is not on the institution's approved list: its code does not run here."""


@dataclass(frozen=True)
class ApprovedApps:
    """The FAB hashes (lowercase hex sha256) an institution approves."""

    sha256: frozenset[str]

    @classmethod
    def load(cls, path: Path) -> ApprovedApps:
        """Read an approved-apps file; every problem names the file and the fix."""
        if not path.is_file():
            raise ConfigError(f"approved-apps file {path} not found; write the app hashes this institution "
                              f"approves there (sha256 = [\"...\"]; `fedstill app-hash APP --approve {path}` adds one)")
        return cls.parse(path, path.read_bytes())

    @classmethod
    def parse(cls, path: Path, data: bytes, allow_empty: bool = False) -> ApprovedApps:
        """The hashes in `data`, the bytes of the approved-apps file `path`."""
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"approved-apps file {path} is not valid TOML ({error}); "
                              f"write sha256 = [\"<64 hex digits>\", ...]") from None
        unknown = sorted(set(raw) - {"sha256"})
        if unknown:
            raise ConfigError(f"approved-apps file {path} has unknown keys {unknown}; the only key is sha256 "
                              f"(a list of FAB hashes)")
        hashes = raw.get("sha256")
        if allow_empty and hashes in (None, []):
            return cls(frozenset())
        if not isinstance(hashes, list) or not hashes:
            raise ConfigError(f"approved-apps file {path} approves no app: sha256 must be a non-empty list of "
                              f"FAB hashes (`fedstill app-hash APP` prints one)")
        bad = [h for h in hashes if not isinstance(h, str) or not HEX64.match(h.lower())]
        if bad:
            raise ConfigError(f"approved-apps file {path}: {len(bad)} entries of sha256 are not 64 hex digits "
                              f"(first: {str(bad[0])[:80]!r}); copy the hash `fedstill app-hash APP` prints")
        return cls(frozenset(h.lower() for h in hashes))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(f'    "{h}",\n' for h in sorted(self.sha256))
        atomic_write_text(path, f"{HEADER}\nsha256 = [\n{lines}]\n")


def approve(path: Path, digest: str, note: str = "") -> bool:
    """Add FAB hash `digest` to the approved-apps file `path` (created if absent), keeping its other lines and
    comments; False when it is listed already (the file is left as it was)."""
    digest = digest.lower()
    if not HEX64.match(digest):
        raise ConfigError(f"{digest[:80]!r} is not a FAB hash (64 hex digits); `fedstill app-hash APP` prints one")
    comment = f"  # {note}" if note and note.isprintable() else ""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, f'{HEADER}\nsha256 = [\n    "{digest}",{comment}\n]\n')
        return True
    if not path.is_file():
        raise ConfigError(f"approved-apps file {path} is a folder; give the path of a .toml file")
    data = path.read_bytes()
    before = ApprovedApps.parse(path, data, allow_empty=True)
    if digest in before.sha256:
        return False
    text = data.decode("utf-8")
    opening, entry = SHA256_LIST.search(text), f'\n    "{digest}",{comment}'
    if opening:  # newest first, right after "sha256 = [": the rest of the file is left as it was
        updated = text[:opening.end()] + entry + text[opening.end():]
    else:
        updated = text + ("\n" if text and not text.endswith("\n") else "") + f"sha256 = [{entry}\n]\n"
    try:
        ok = ApprovedApps.parse(path, updated.encode("utf-8"), allow_empty=True).sha256 == before.sha256 | {digest}
    except ConfigError:
        ok = False
    if not ok:
        raise ConfigError(f"cannot add to approved-apps file {path} without rewriting it; add \"{digest}\", to its sha256 "
                          "list by hand")
    atomic_write_text(path, updated)
    return True


def fab_hash(content: bytes) -> str:
    """Flower's FAB hash: the sha256 of the bundle's bytes, lowercase hex."""
    return hashlib.sha256(content).hexdigest()


def app_fab(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` builds and submits (Flower's own builder, reproducible)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def check_bundle(content: bytes, claimed_hash: str, approved: ApprovedApps) -> str:
    """Raise AppNotApproved unless the bytes received are an approved bundle; return their hash.

    The hash is computed here from the bytes that will be unpacked: the hash the SuperLink names
    for the run is only compared with it, never trusted.
    """
    actual = fab_hash(content)
    if claimed_hash and claimed_hash.lower() != actual:
        raise AppNotApproved(f"refused: the app bundle's bytes hash to {actual} but the run names {claimed_hash}; "
                             f"nothing of it ran on this node")
    if actual not in approved.sha256:
        raise AppNotApproved(f"refused: app not approved by this institution (bundle sha256 {actual}); nothing "
                             f"of it ran on this node. To run it here, the institution reviews it and adds the "
                             f"hash to its approved-apps file")
    return actual
