"""The fault soak, bounded: every kind of fault once or more in about two minutes.

See :mod:`soak` for what runs and what is checked; ``scripts/soak --minutes N``
runs the same soak for longer. The servers are the soak's own (private
PostgreSQL, Redis and RabbitMQ on free ports), so it restarts nothing shared.
Set ``DEEPWORK_SOAK_SEED`` to repeat a fault schedule.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("celery")
pytest.importorskip("dramatiq")
pytest.importorskip("psycopg")
pytest.importorskip("httpx")

from private_services import ServiceUnavailable
from soak import FAULTS, Soak, SoakConfig

pytestmark = pytest.mark.slow

REQUIRE_SERVICES = os.environ.get("DEEPWORK_REQUIRE_SERVICES") == "1"


def cannot_run(reason: str) -> None:
    """Skip, or fail where every service is required (CI)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} and DEEPWORK_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(reason)


@pytest.mark.timeout(600)
def test_fault_soak_converges_with_nothing_lost_or_run_twice(tmp_path: Path) -> None:
    missing = [b for b in ("redis-server", "rabbitmq-server") if shutil.which(b) is None]
    if missing:
        cannot_run(f"the soak runs its own servers and needs {', '.join(missing)}")
    seed = os.environ.get("DEEPWORK_SOAK_SEED")
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line)

    config = SoakConfig(
        seconds=100.0,
        seed=None if seed is None else int(seed),
        fault_gap=(3.0, 7.0),
        workdir=tmp_path / "soak",
        log=log,
    )
    try:
        report = Soak(config).run()
    except ServiceUnavailable as exc:
        cannot_run(f"the soak cannot run its own servers here: {exc}")
    print(report.table())
    summary = f"\n{report.table()}\n\nlogs: {config.workdir}\n" + "\n".join(lines[-40:])
    assert [] == report.failures(), summary
    assert set(FAULTS) == {fault.kind for fault in report.faults}, summary
    assert report.answers, summary  # the load did retry tasks over HTTP
