"""The `fedstill` command line run in a subprocess, offline, with its own Flower home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from simulations.launcher import OFFLINE_ENV

PROJECT = Path(__file__).resolve().parents[2]


def fedstill(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli.main", *args], capture_output=True, text=True,
        env=env, cwd=PROJECT, timeout=timeout,
    )
