"""The peers' own virtual environments under ``benchmarks/.peers/`` (never imported here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parent / ".peers"

REQUIREMENTS = {
    "pocketpaw": ["pocketpaw==0.4.18"],
    "procrastinate": ["procrastinate==3.10.0", "psycopg[binary,pool]"],
    "rq": ["rq==2.12.0", "redis==8.1.0"],
    "huey": ["huey==3.5.4", "redis==8.1.0"],
}


def ensure(name: str) -> Path | str:
    """The peer's Python, installed on first use; a reason string if it cannot be had."""
    venv = PEERS / name
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    wanted = "\n".join(REQUIREMENTS[name])
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *REQUIREMENTS[name]],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not create its virtualenv: {type(exc).__name__}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        return f"pip install {' '.join(REQUIREMENTS[name])} failed: {last[:120]}"
    marker.write_text(wanted)
    return python
