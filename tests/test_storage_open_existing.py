"""Opening a storage without leave to create it: what exists is used, nothing is created.

``SQLiteStorage(create=False)`` and ``read_only=True``, and PostgreSQL's
``check_migrated``, are what the command line uses for every command but
``migrate``, so that a typo never leaves a new database or schema behind.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry._core.model import Project
from deepwork_retry.exceptions import StorageMissing, StorageUnavailable
from deepwork_retry.storage.sqlite import APPLICATION_ID, SQLiteStorage, migrations

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("read_only", [False, True], ids=["create-false", "read-only"])
def test_missing_sqlite_file_is_storage_missing_and_not_created(
    tmp_path: Path, read_only: bool
) -> None:
    """A missing file opened without leave to create raises StorageMissing; nothing appears."""
    with pytest.raises(StorageMissing, match="does not exist"):
        SQLiteStorage(tmp_path / "typo.db", create=False, read_only=read_only)
    with pytest.raises(StorageMissing, match="does not exist"):
        SQLiteStorage(tmp_path / "no-such-dir" / "typo.db", create=False, read_only=read_only)
    assert {} == _listing(tmp_path)


@pytest.mark.parametrize("read_only", [False, True], ids=["create-false", "read-only"])
def test_sqlite_file_without_schema_is_refused_untouched(tmp_path: Path, read_only: bool) -> None:
    """An empty file is not given a schema (nor a WAL header) when opened with create=False."""
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StorageMissing, match="no deepwork_retry schema"):
        SQLiteStorage(empty, create=False, read_only=read_only)
    assert {"empty.db": b""} == _listing(tmp_path)


def test_sqlite_file_lacking_migrations_is_refused_unchanged(tmp_path: Path) -> None:
    """A database at an older schema version is not upgraded by create=False; it names the fix."""
    import sqlite3

    path = tmp_path / "old.db"
    first = migrations()[0]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(first[2])
    conn.execute(f"PRAGMA user_version = {first[0]}")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.close()
    before = _listing(tmp_path)
    with pytest.raises(StorageMissing, match="lacks schema migrations 0002"):
        SQLiteStorage(path, create=False)
    assert before == _listing(tmp_path)


def test_existing_database_opens_for_writing_with_create_false(tmp_path: Path) -> None:
    """create=False opens a migrated database as usual: reads and writes work."""
    path = tmp_path / "ok.db"
    SQLiteStorage(path).close()
    storage = SQLiteStorage(path, create=False)
    try:
        storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
        assert "p" == storage.get_project("p").id
    finally:
        storage.close()


def test_storage_missing_is_storage_unavailable() -> None:
    """Code that handles StorageUnavailable (a web adapter's 503) handles StorageMissing too."""
    assert issubclass(StorageMissing, StorageUnavailable)


@settings(max_examples=25, deadline=None)
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20))
def test_no_file_name_is_created_without_leave(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    """Whatever the name, opening a missing database with create=False leaves the folder empty."""
    folder = tmp_path_factory.mktemp("names")
    if name in (".", ".."):
        return
    with pytest.raises(StorageMissing):
        SQLiteStorage(folder / name, create=False)
    assert [] == list(folder.iterdir())


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.mark.postgres
def test_check_migrated_names_what_is_missing_and_creates_nothing(postgres_dsn: str) -> None:
    """check_migrated raises StorageMissing for a missing schema and leaves it missing;
    after migrate it passes."""
    import psycopg
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import check_migrated, migrate

    def exists(schema: str) -> bool:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
        return row == (1,)

    with schema_dropped_after(postgres_dsn, "chk") as schema:
        with pytest.raises(StorageMissing, match=f"schema '{schema}' does not exist"):
            check_migrated(postgres_dsn, schema=schema)
        assert False is exists(schema)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        with pytest.raises(StorageMissing, match="no deepwork_retry tables"):
            check_migrated(postgres_dsn, schema=schema)
        migrate(postgres_dsn, schema=schema)
        check_migrated(postgres_dsn, schema=schema)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DELETE FROM {schema}.schema_migrations WHERE number > 1")
        with pytest.raises(StorageMissing, match="lacks migrations 0002"):
            check_migrated(postgres_dsn, schema=schema)


def test_check_migrated_of_an_unreachable_server_is_unavailable_not_missing() -> None:
    """A server that cannot be reached is StorageUnavailable (try later), not StorageMissing."""
    pytest.importorskip("psycopg")
    from deepwork_retry.storage.postgres import check_migrated

    with pytest.raises(StorageUnavailable) as caught:
        check_migrated("postgresql://postgres@127.0.0.1:1/test", schema="deepwork")
    assert not isinstance(caught.value, StorageMissing)
