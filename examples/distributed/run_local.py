"""Run the whole topology on this machine: web, relay, reaper and a Celery worker.

    python run_local.py

Each component is its own process, as it would be on its own machine; they
share only the database and the broker. Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DEEPWORK_TOKENS", "example-token=alice")
    env.setdefault("DEEPWORK_DB", str(HERE / "deepwork-example.db"))
    commands = {
        "web": [sys.executable, "app.py", "web"],
        "relay": [sys.executable, "app.py", "relay"],
        "reaper": [sys.executable, "app.py", "reaper"],
        "worker": [str(BIN / "celery"), "-A", "app", "worker", "-c", "2", "--loglevel=INFO"],
    }
    if env.get("DEEPWORK_DSN"):
        schema = env.get("DEEPWORK_SCHEMA", "deepwork")
        migrate = [str(BIN / "deepwork-retry"), "migrate", "--schema", schema]
        subprocess.run(migrate, env=env, cwd=HERE, check=True)
    procs = {
        name: subprocess.Popen(argv, env=env, cwd=HERE, start_new_session=True)
        for name, argv in commands.items()
    }
    time.sleep(3)
    subprocess.run([sys.executable, "app.py", "seed"], env=env, cwd=HERE, check=False)
    print("API on http://127.0.0.1:8000/api/deep-work (token: example-token); Ctrl-C stops")
    try:
        while all(proc.poll() is None for proc in procs.values()):
            time.sleep(1)
        print("a component exited; stopping the others")
    except KeyboardInterrupt:
        pass
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
