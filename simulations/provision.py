"""Identities for a simulated federation: what each institution and the coordinator would set up themselves.

In a real federation each institution runs `fedstill keygen` and sends its public key to the
coordinator, who lists it in the allow-list. A simulation does the same on one machine: one key pair
per simulated institution in `<run folder>/sites/institution-<i>/` (with the institution's own
`site.toml`: its privacy budget), and `<run folder>/allow-list.toml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.release import SITE_CONFIG, simulated_institution, site_folder
from common.audit.keys import Signer, write_allow_list, write_key_pair
from simulations.scenarios import to_toml

SITES = "sites"
ALLOW_LIST = "allow-list.toml"


def provision_sites(run_dir: Path, num_clients: int, site: dict[str, Any] | None = None) -> dict[str, Any]:
    """Make keys and the allow-list for `num_clients` simulated institutions, and write each one's own
    settings (`site`: its privacy budget, `max-epsilon` and `delta`, with per-institution values under
    `site["institutions"][name]`) into its `site.toml`; return the run-config overrides."""
    sites = Path(run_dir) / SITES
    institutions = {}
    for partition_id in range(num_clients):
        signer = Signer.generate(simulated_institution(partition_id))
        folder = site_folder(sites, partition_id)
        write_key_pair(signer, folder, overwrite=True)
        own = {k: v for k, v in (site or {}).items() if k != "institutions"}
        own.update((site or {}).get("institutions", {}).get(signer.name, {}))
        if own:
            (folder / SITE_CONFIG).write_text(to_toml(own), encoding="utf-8")
        institutions[signer.name] = signer.public
    allow_list = Path(run_dir) / ALLOW_LIST
    write_allow_list(allow_list, institutions)
    return {"allow-list": str(allow_list), "sites-dir": str(sites)}
