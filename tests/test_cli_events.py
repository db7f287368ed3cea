"""The ``events`` commands on a real SQLite file and a real local webhook receiver:
the relay POSTs signed events, a failing receiver's delivery is parked, listed,
replayed, and then delivered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from webhook_receiver import receiving

from deepwork_retry import ExecutorService, TaskError
from deepwork_retry.cli import ExitCode, main
from deepwork_retry.events import EventType
from deepwork_retry.ports import EventLog
from deepwork_retry.storage.sqlite import SQLiteStorage

pytestmark = pytest.mark.skipif(
    not hasattr(SQLiteStorage, "claim_events"),
    reason="needs the SQLite storage's event log (merged separately)",
)

SECRET = "cli-secret-5d1e"


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DEEPWORK_WEBHOOK_SECRET", SECRET)
    path = str(tmp_path / "events.db")
    storage = SQLiteStorage(path)
    assert isinstance(storage, EventLog)
    ex = ExecutorService(storage)
    ex.create_project("p")
    ex.add_task("p", "t1", max_retries=0)
    ex.assign("p", "t1")
    ex.start("p", "t1", 1)
    ex.fail("p", "t1", 1, TaskError(type="Boom", message="boom"))
    storage.close()
    return path


def blocked_ids(db: str) -> list[str]:
    storage = SQLiteStorage(db)
    try:
        return [e.id for e in storage.events("p") if e.type is EventType.TASK_BLOCKED]
    finally:
        storage.close()


def test_relay_park_list_replay_deliver(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    [blocked] = blocked_ids(db)
    with receiving(SECRET) as receiver:
        relay = ["events", "relay", "--db", db, "--webhook", receiver.url, "--once",
                 "--type", "task.blocked", "--max-tries", "1"]  # fmt: skip
        receiver.fail_next = 100
        assert ExitCode.OK == main(relay)
        assert [blocked] == receiver.failed
        capsys.readouterr()

        assert ExitCode.OK == main(["events", "parked", "--db", db])
        parked = json.loads(capsys.readouterr().out)["parked"]
        assert [(blocked, f"webhook:{receiver.url}", 1)] == [
            (p["event"]["id"], p["subscriber"], p["tries"]) for p in parked
        ]
        assert "HTTP 500" in parked[0]["last_error"]
        assert ExitCode.OK == main(["events", "parked", "--db", db, "--table"])
        assert (
            f"{blocked}\ttask.blocked\tt1\twebhook:{receiver.url}\t1\t" in capsys.readouterr().out
        )
        assert ExitCode.OK == main(["events", "parked", "--db", db, "--subscriber", "nobody"])
        assert [] == json.loads(capsys.readouterr().out)["parked"]

        receiver.fail_next = 0
        assert ExitCode.OK == main(["events", "replay", "--db", db, "--event", "p:999"])
        assert "replayed 0" in capsys.readouterr().out
        assert ExitCode.OK == main(["events", "replay", "--db", db, "--event", blocked])
        assert "replayed 1" in capsys.readouterr().out
        assert ExitCode.OK == main(relay)
        assert "handled 1 " in capsys.readouterr().out
        assert [blocked] == receiver.accepted_ids
        assert ExitCode.OK == main(["events", "parked", "--db", db])
        assert [] == json.loads(capsys.readouterr().out)["parked"]
        assert ExitCode.OK == main(relay)  # nothing left: nothing sent again
        assert [blocked] == receiver.accepted_ids


def test_relay_sends_every_event_signed_once(db: str) -> None:
    storage = SQLiteStorage(db)
    every = [e.id for e in storage.events("p")]
    storage.close()
    with receiving(SECRET) as receiver:
        assert ExitCode.OK == main(["events", "relay", "--db", db, "--webhook", receiver.url,
                                    "--once"])  # fmt: skip
        assert every == receiver.accepted_ids
        assert [] == receiver.refused


def test_relay_refuses_a_missing_secret_and_a_bad_url(
    db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ExitCode.USAGE == main(["events", "relay", "--db", db, "--webhook", "ftp://x/y"])
    assert "http://" in capsys.readouterr().err
    monkeypatch.delenv("DEEPWORK_WEBHOOK_SECRET")
    assert ExitCode.USAGE == main(["events", "relay", "--db", db, "--webhook", "http://x/y"])
    assert "DEEPWORK_WEBHOOK_SECRET" in capsys.readouterr().err


def test_events_commands_open_an_existing_database_only(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.db")
    for command in (["events", "parked"], ["events", "replay"]):
        assert ExitCode.NO_DATABASE == main([*command, "--db", missing])
    assert not Path(missing).exists()


def test_relay_names_webhooks_that_differ_only_in_their_query(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two URLs that differ only in their query share a shown name: the second is kept
    under ``#2``; both receive every event, and their failures are parked apart."""
    [blocked] = blocked_ids(db)
    with receiving(SECRET) as receiver:
        first, second = receiver.url + "?to=a", receiver.url + "?to=b"
        relay = ["events", "relay", "--db", db, "--webhook", first, "--webhook", second,
                 "--once", "--type", "task.blocked", "--max-tries", "1"]  # fmt: skip
        receiver.fail_next = 100
        assert ExitCode.OK == main(relay)
        assert [blocked, blocked] == receiver.failed
    capsys.readouterr()
    assert ExitCode.OK == main(["events", "parked", "--db", db])
    parked = json.loads(capsys.readouterr().out)["parked"]
    assert sorted([f"webhook:{receiver.url}", f"webhook:{receiver.url}#2"]) == sorted(
        p["subscriber"] for p in parked
    )
    assert all("to=a" not in p["last_error"] and "to=b" not in p["last_error"] for p in parked)


def test_relay_refuses_one_url_given_twice(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = "http://127.0.0.1:9/in?token=tk-456"
    assert ExitCode.USAGE == main(["events", "relay", "--db", db, "--webhook", url,
                                   "--webhook", url, "--once"])  # fmt: skip
    err = capsys.readouterr().err
    assert "twice" in err
    assert "tk-456" not in err


@pytest.mark.parametrize(
    "event_id",
    ["p", "p:", ":1", "p:0", "p:-1", "p:x", "p:1.5", "p:\uff11", "p: 1", "p:" + "9" * 40],
)
def test_replay_refuses_a_malformed_event_id(
    db: str, event_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["events", "replay", "--db", db, "--event", event_id])
    assert ExitCode.USAGE == exited.value.code
    assert "PROJECT:SEQ" in capsys.readouterr().err


def test_replay_takes_a_project_with_colons_and_a_leading_zero(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last colon splits the id; ``p:01`` names event 1 of ``p``."""
    [blocked] = blocked_ids(db)
    project, _, seq = blocked.rpartition(":")
    with receiving(SECRET) as receiver:
        receiver.fail_next = 100
        assert ExitCode.OK == main(["events", "relay", "--db", db, "--webhook", receiver.url,
                                    "--once", "--max-tries", "1"])  # fmt: skip
    capsys.readouterr()
    assert ExitCode.OK == main(["events", "replay", "--db", db, "--event", "a:b:1"])
    assert "replayed 0" in capsys.readouterr().out
    assert ExitCode.OK == main(["events", "replay", "--db", db, "--event", f"{project}:0{seq}"])
    assert "replayed 1" in capsys.readouterr().out
