"""Loading the apps imports neither Opacus nor the parts of torch.distributed it drags in; the ClientApp of a run
without privacy imports no dp-accounting (nor SciPy), and the digits data set loads without sklearn.

Flower imports `client.client_app` (and `server.server_app`) in every app process it starts. Opacus
imports about 200 modules of `torch.distributed` (`_shard`, `fsdp`, `checkpoint`, `tensor`, ...);
while Flower loaded the ClientApp in a thread, that import once failed with `_DeadlockError:
deadlock detected by _ModuleLock('torch.distributed._shard._utils')` (issue 14). Opacus is now
imported only inside the DP-SGD functions (common/privacy/dpsgd.py).

What torch does by itself (torch 2.13): `import torch` already imports the package
`torch.distributed` and some 28 of its modules (c10d, device_mesh, rpc, algorithms.join, ...), but
not `torch.distributed._shard`. So the test asserts only what this project controls: that loading
the apps adds no `torch.distributed` module to those `import torch` loads, and no Opacus.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
import torch
by_torch = {m for m in sys.modules if m.startswith("torch.distributed")}
import client.client_app
from common.tasks.registry import load_split
load_split("digits", "", 500, 42)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"dp_accounting", "scipy", "sklearn"})
import server.server_app
print(json.dumps({
    "opacus": sorted(m for m in sys.modules if m == "opacus" or m.startswith("opacus.")),
    "added": sorted(m for m in sys.modules if m.startswith("torch.distributed") and m not in by_torch),
    "by_torch": sorted(by_torch),
    "client_heavy": heavy,
}))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """What the probe found loaded: a fresh interpreter, as Flower's app processes are."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_the_apps_imports_no_opacus_and_no_more_of_torch_distributed(loaded: dict[str, list[str]]) -> None:
    assert loaded["opacus"] == [], "an app imports Opacus at load time; import it inside the DP-SGD functions"
    assert loaded["added"] == [], f"loading the apps imports torch.distributed modules: {loaded['added'][:10]}"
    assert "torch.distributed._shard" not in loaded["by_torch"]  # torch alone does not: what the test relies on


def test_a_clientapp_without_privacy_imports_no_accounting_and_reads_digits_without_sklearn(
    loaded: dict[str, list[str]],
) -> None:
    # dp-accounting, SciPy and sklearn cost a deployed node's process seconds on every message
    assert loaded["client_heavy"] == [], "the ClientApp (or the digits loader) imports them at load time"
