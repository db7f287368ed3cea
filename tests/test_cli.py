"""The deepwork-retry command: help, retry and blocked on a real SQLite file."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepwork_retry import __version__
from deepwork_retry.cli import MEANING, ExitCode, build_parser, main
from deepwork_retry.demo import create_demo_project
from deepwork_retry.storage.sqlite import SQLiteStorage

ROOT = Path(__file__).resolve().parent.parent


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
    """Retrying a done task exits 4 (refused by a rule) and prints the API's detail message."""
    assert ExitCode.REFUSED == main(["retry", "proj-ops", "task-1", "--db", db])
    assert "error: Can only retry tasks with status 'blocked', got 'done'\n" == (
        capsys.readouterr().err
    )


def test_unknown_project_fails_cleanly(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown project exits 3 (not found) with 'Project not found', no traceback."""
    assert ExitCode.NOT_FOUND == main(["blocked", "nope", "--db", db])
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

    from deepwork_retry.storage._postgres_sql import migrations
    from deepwork_retry.storage.postgres import PostgresStorage

    with schema_dropped_after(postgres_dsn, "cli") as schema:
        assert 0 == main(["migrate", "--dsn", postgres_dsn, "--schema", schema])
        every = [m.number for m in migrations()]
        assert f"applied migrations: {every}\n" == capsys.readouterr().out
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


# -- nothing created but by migrate -------------------------------------------------------

STORAGE_COMMANDS = [
    ["blocked", "proj-ops"],
    ["retry", "proj-ops", "task-3"],
    ["reap"],
]


@pytest.mark.parametrize("command", STORAGE_COMMANDS, ids=lambda c: c[0])
def test_a_mistyped_database_is_reported_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A command given a file that does not exist exits 6, names the migrate command that
    would create it, and leaves no file behind."""
    typo = tmp_path / "typo.db"
    assert ExitCode.NO_DATABASE == main([*command, "--db", str(typo)])
    err = capsys.readouterr().err
    assert (f"error: Cannot open SQLite database {str(typo)!r}", True) == (
        err.split(" read-only")[0].split(" without")[0],
        err.endswith(f"; create it with: deepwork-retry migrate --db {typo}\n"),
    )
    assert [] == list(tmp_path.iterdir())


def test_read_commands_open_sqlite_read_only_and_write_commands_do_not_create(db: str) -> None:
    """`blocked` opens the file read-only; `retry` and `reap` open it writable, never creating."""
    from deepwork_retry.cli import build_parser, open_storage

    reader = open_storage(build_parser().parse_args(["blocked", "p", "--db", db]), write=False)
    writer = open_storage(build_parser().parse_args(["retry", "p", "t", "--db", db]), write=True)
    try:
        assert isinstance(reader, SQLiteStorage)
        assert isinstance(writer, SQLiteStorage)
        assert ((True, False), (False, False)) == (
            (reader.read_only, reader.create),
            (writer.read_only, writer.create),
        )
    finally:
        reader.close()
        writer.close()


def test_migrate_creates_the_sqlite_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`migrate --db` is the one command that creates a database (and its folder); the others
    then use it."""
    path = str(tmp_path / "data" / "new.db")
    assert ExitCode.OK == main(["migrate", "--db", path])
    assert ExitCode.NOT_FOUND == main(["blocked", "p1", "--db", path])
    assert "error: Project not found\n" == capsys.readouterr().err


def _schemas(dsn: str, name: str) -> list[str]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = %s", (name,))
        return [row[0] for row in rows]


@pytest.mark.postgres
@pytest.mark.parametrize("command", STORAGE_COMMANDS, ids=lambda c: c[0])
def test_a_mistyped_schema_is_reported_and_not_created(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`--schema typo` exits 6 naming the migrate command, and PostgreSQL has no such schema."""
    from pg_support import schema_dropped_after

    with schema_dropped_after(postgres_dsn, "typo") as schema:
        code = main([*command, "--dsn", postgres_dsn, "--schema", schema])
        assert (ExitCode.NO_DATABASE, []) == (code, _schemas(postgres_dsn, schema))
        assert (
            f"error: PostgreSQL schema {schema!r} does not exist; create it with: "
            f"deepwork-retry migrate --dsn {postgres_dsn} --schema {schema}\n"
        ) == capsys.readouterr().err


@pytest.mark.postgres
def test_deepwork_schema_is_honoured_by_every_command(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $DEEPWORK_DSN and $DEEPWORK_SCHEMA set, migrate, blocked, retry and reap all use
    that schema."""
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import PostgresStorage

    with schema_dropped_after(postgres_dsn, "env") as schema:
        monkeypatch.setenv("DEEPWORK_DSN", postgres_dsn)
        monkeypatch.setenv("DEEPWORK_SCHEMA", schema)
        assert ExitCode.OK == main(["migrate"])
        assert [schema] == _schemas(postgres_dsn, schema)
        storage = PostgresStorage(postgres_dsn, schema=schema, migrate=False)
        try:
            create_demo_project(storage, "proj-env")
        finally:
            storage.close()
        capsys.readouterr()
        assert ExitCode.OK == main(["blocked", "proj-env"])
        tasks = json.loads(capsys.readouterr().out)["tasks"]
        assert ["task-3", "task-7"] == [t["id"] for t in tasks]
        assert ExitCode.OK == main(["retry", "proj-env", "task-3"])
        assert "assigned" == json.loads(capsys.readouterr().out)["task"]["status"]
        assert ExitCode.OK == main(["reap"])


@pytest.mark.postgres
def test_an_unreachable_server_is_one_line_and_exit_5() -> None:
    """A PostgreSQL server that refuses connections: exit 5 and one error line, none of the
    connection pool's retry warnings."""
    out = subprocess.run(
        [sys.executable, "-m", "deepwork_retry", "blocked", "p",
         "--dsn", "postgresql://postgres@127.0.0.1:1/test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ExitCode.UNAVAILABLE == out.returncode
    assert 1 == len(out.stderr.splitlines()), out.stderr
    assert out.stderr.startswith("error: PostgreSQL is unavailable: ")


def test_schema_without_postgres_is_a_usage_error(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--schema` with an SQLite file is refused as a usage error (exit 2), not ignored."""
    monkeypatch.delenv("DEEPWORK_DSN", raising=False)
    with pytest.raises(SystemExit) as caught:
        main(["blocked", "proj-ops", "--db", db, "--schema", "x"])
    assert ExitCode.USAGE == caught.value.code
    assert "--schema applies to PostgreSQL only" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["blocked", "p", "--limit", "0"], ["reap", "--lease", "-1"]])
def test_invalid_values_are_usage_errors(argv: list[str]) -> None:
    """Out-of-range values are refused by the parser with exit 2 before any storage is opened."""
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--db", "never-opened.db"])
    assert ExitCode.USAGE == caught.value.code


# -- help, version, exit codes ---------------------------------------------------------------


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    found = [("deepwork-retry", parser)]
    for action in parser._actions:  # argparse has no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            found += sorted(action.choices.items())
    return found


def test_every_argument_and_option_has_help() -> None:
    """Each argument and option of every command says what it is for in --help."""
    missing = [
        (name, action.dest)
        for name, parser in _parsers()
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert [] == missing


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the package's version and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert (0, f"deepwork-retry {__version__}\n") == (caught.value.code, capsys.readouterr().out)


def test_exit_codes_are_distinct_and_documented() -> None:
    """Each exit status is printed in the help and listed, with the same meaning, in the
    README's Operating section."""
    help_text = build_parser().format_help()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    operating = readme.split("## Operating", 1)[1].split("\n## ", 1)[0]
    assert len({c.value for c in ExitCode}) == len(ExitCode)
    assert [] == [c for c in ExitCode if f"\n  {c.value}  " not in help_text]
    rows = {f"| {c.value} | {MEANING[c]} |" for c in ExitCode}
    assert set() == rows - set(operating.splitlines())


@pytest.mark.postgres
def test_the_storage_modules_migrate_honours_deepwork_schema(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m deepwork_retry.storage.postgres migrate --dsn …` migrates $DEEPWORK_SCHEMA."""
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import main as storage_main

    with schema_dropped_after(postgres_dsn, "mod") as schema:
        monkeypatch.setenv("DEEPWORK_SCHEMA", schema)
        assert 0 == storage_main(["migrate", "--dsn", postgres_dsn])
        assert [schema] == _schemas(postgres_dsn, schema)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("StorageMissing", ExitCode.NO_DATABASE),
        ("StorageUnavailable", ExitCode.UNAVAILABLE),
        ("ProjectNotFound", ExitCode.NOT_FOUND),
        ("TaskNotFound", ExitCode.NOT_FOUND),
        ("TaskNotBlocked", ExitCode.REFUSED),
        ("ProjectNotRunnable", ExitCode.REFUSED),
        ("InvalidTransition", ExitCode.REFUSED),
        ("InvalidInput", ExitCode.USAGE),
        ("StorageCorrupt", ExitCode.FAILED),
        ("StorageReadOnly", ExitCode.FAILED),
        ("DeepworkError", ExitCode.FAILED),
    ],
)
def test_each_error_has_its_exit_status(error: str, expected: ExitCode) -> None:
    """The library's errors end the command with the status of their kind."""
    from deepwork_retry import exceptions
    from deepwork_retry.cli import exit_code

    kind = getattr(exceptions, error)
    assert expected == exit_code(kind.__new__(kind))


def test_every_library_error_has_an_exit_status() -> None:
    """No error of the library falls outside the table (each maps to a documented status)."""
    from deepwork_retry import exceptions
    from deepwork_retry.cli import exit_code

    kinds = [
        getattr(exceptions, name)
        for name in exceptions.__all__
        if isinstance(getattr(exceptions, name), type)
    ]
    assert [] == [k for k in kinds if exit_code(k.__new__(k)) not in MEANING]
