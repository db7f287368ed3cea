"""The deepwork-retry command: help, retry and blocked on a real SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepwork_retry.cli import main
from deepwork_retry.demo import create_demo_project
from deepwork_retry.storage.sqlite import SQLiteStorage


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "ops.db")
    storage = SQLiteStorage(path)
    create_demo_project(storage, "proj-ops")
    storage.close()
    return path


def test_help_lists_every_command() -> None:
    """`python -m deepwork_retry --help` names serve, retry, blocked, migrate and reap."""
    out = subprocess.run(
        [sys.executable, "-m", "deepwork_retry", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [True] * 5 == [
        name in out.stdout for name in ("serve", "retry", "blocked", "migrate", "reap")
    ]


def test_blocked_lists_the_blocked_tasks(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`blocked PROJECT` prints the project's blocked tasks as JSON, ordered by id."""
    assert 0 == main(["blocked", "proj-ops", "--db", db])
    data = json.loads(capsys.readouterr().out)
    assert ["task-3", "task-7"] == [t["id"] for t in data["tasks"]]


def test_retry_retries_and_records_the_operator(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`retry PROJECT TASK` commits the retry and records actor, reason and budget."""
    code = main(
        ["retry", "proj-ops", "task-7", "--db", db, "--actor", "ops", "--reason", "access restored",
         "--budget", "full"]
    )  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert (0, "assigned", 1) == (code, data["task"]["status"], data["task"]["retry_count"])
    storage = SQLiteStorage(db)
    last = storage.attempts("proj-ops", "task-7")[-1]
    storage.close()
    assert ("ops", "access restored", "full") == (last.actor, last.reason, last.budget)


def test_retry_of_a_task_that_is_not_blocked_fails_with_the_contract_message(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Retrying a done task exits 1 and prints the API's detail message."""
    assert 1 == main(["retry", "proj-ops", "task-1", "--db", db])
    assert "error: Can only retry tasks with status 'blocked', got 'done'\n" == (
        capsys.readouterr().err
    )


def test_unknown_project_fails_cleanly(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown project exits 1 with 'Project not found', no traceback."""
    assert 1 == main(["blocked", "nope", "--db", db])
    assert "error: Project not found\n" == capsys.readouterr().err


def test_reap_with_nothing_expired(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`reap` on a database with no expired lease reports zero."""
    assert 0 == main(["reap", "--db", db])
    assert "reaped 0 attempt(s)\n" == capsys.readouterr().out


def test_migrate_and_retry_on_postgres(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`migrate --dsn` creates the schema once; `retry --dsn` then works on that database."""
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import PostgresStorage

    with schema_dropped_after(postgres_dsn, "cli") as schema:
        assert 0 == main(["migrate", "--dsn", postgres_dsn, "--schema", schema])
        assert "applied migrations: [1, 2, 3, 4]\n" == capsys.readouterr().out
        assert 0 == main(["migrate", "--dsn", postgres_dsn, "--schema", schema])
        assert "applied migrations: none (up to date)\n" == capsys.readouterr().out
        storage = PostgresStorage(postgres_dsn, schema=schema)
        try:
            create_demo_project(storage, "proj-pg")
        finally:
            storage.close()
        assert 0 == main(["retry", "proj-pg", "task-3", "--dsn", postgres_dsn, "--schema", schema])
        data = json.loads(capsys.readouterr().out)
        assert ("assigned", 2, 1) == (
            data["task"]["status"], data["task"]["retry_count"], data["task"]["max_retries"]
        )  # fmt: skip
