"""End to end, POST /retry to the executor's start.

In-process thread and asyncio dispatchers; relay-only on PostgreSQL
(LISTEN/NOTIFY) and SQLite (polling).

Every comparison runs four kinds of process at most, all started here: a
uvicorn server for the library and one for its floor (``dispatch_server.py
web``), and for the relay paths a relay process for each
(``dispatch_server.py relay``). The client sends one request at a time over a
kept-alive connection (``http.client``), each retrying a distinct blocked
task, and waits for both the answer and the executor's ``start`` mark before
the next. The processes write their marks (``commit``, ``dispatch``,
``start``, with ``time.monotonic()``) to a named pipe that the client reads
outside the timed path. Rounds alternate between the library and the floor.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _fixtures import add_blocked
from _harness import Figure, Row, percentile, unavailable
from suite_http import TOKEN, free_port, wait_port

HERE = Path(__file__).resolve().parent
GROUP = "dispatch"
PATH = "/api/deep-work/projects/p/tasks/%s/retry"
LIB_SCHEMA, FLOOR_SCHEMA = "bench_dispatch_lib", "bench_dispatch_floor"
RELAY_TARGET_MS = 50.0
GOLDEN = (5**0.5 - 1) / 2
USED: dict[str, int] = {}
"""Tasks already retried in each store: every comparison takes tasks nobody retried."""


class Marks:
    """The named pipe every process writes its marks to, read without blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # A writer of our own: the pipe never reads as closed between servers.
        self._keep = os.open(path, os.O_WRONLY)
        self.buffer = b""
        self.seen: dict[tuple[str, str], float] = {}

    def _drain(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        self.buffer += os.read(self.fd, 1 << 16)
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            kind, task, at = line.decode().split()
            self.seen[(kind, task)] = float(at)

    def wait(self, kind: str, task: str, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while (kind, task) not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} mark for {task} within {timeout:g}s")
            self._drain(left)
        return self.seen.pop((kind, task))

    def take(self, kind: str, task: str) -> float | None:
        self._drain(0)
        return self.seen.pop((kind, task), None)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._keep)
        self.path.unlink(missing_ok=True)


class Proc:
    """A process of ``dispatch_server.py`` in its own session (stopped with its group)."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "dispatch_server.py"), *argv],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            cwd=HERE,
            start_new_session=True,
        )

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.handle.close()


class Side:
    """One side of a comparison: its web server (and relay), its tasks, its samples."""

    def __init__(
        self,
        label: str,
        web: str,
        store: str,
        marks: Marks,
        logs: Path,
        relay: tuple[str, float] | None = None,
    ) -> None:
        self.figure = Figure(label, "us")
        self.procs: list[Proc] = []
        self.marks = marks
        self.store = store
        self.next = USED.get(store, 0)
        self.splits: dict[str, list[float]] = {
            "answer": [],
            "send_to_commit": [],
            "send_to_enter": [],
            "enter_to_commit": [],
            "commit_to_dispatch": [],
            "dispatch_to_start": [],
            "commit_to_start": [],
        }
        self.port = free_port()
        try:
            self._start(web, store, logs, relay)
        except BaseException:
            for proc in reversed(self.procs):
                proc.stop()
            raise
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Length": "0"}
        self.last_body = b""
        # A relay that polls: each request at its own phase of the interval, else a
        # sequential client falls into step with the polls and always waits one full
        # interval. The phases are a Weyl sequence (k times the golden ratio, modulo 1):
        # spread evenly over the interval for any number of requests, the same on both sides.
        self.jitter = relay[1] if relay is not None and store.startswith("sqlite") else 0.0
        self.sent = 0

    def _start(self, web: str, store: str, logs: Path, relay: tuple[str, float] | None) -> None:
        fifo = str(self.marks.path)
        tag = f"{web}-{store.split(':')[0]}"
        if relay is not None:
            kind, poll = relay
            proc = Proc(["relay", kind, store, fifo, str(poll)], logs / f"dispatch-relay-{tag}.log")
            self.procs.append(proc)
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.marks.wait("ready", f"relay-{kind}", timeout=0.5)
                    break
                except TimeoutError:
                    if proc.proc.poll() is not None:
                        raise RuntimeError(
                            f"relay exited with {proc.proc.returncode}: see {proc.log.name}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise
        web_proc = Proc(
            ["web", web, store, fifo, str(self.port), TOKEN], logs / f"dispatch-web-{tag}.log"
        )
        self.procs.append(web_proc)
        wait_port(self.port, web_proc.proc, 60)

    def one(self, record: bool) -> None:
        task = f"t{self.next:07d}"
        self.next += 1
        marks = self.marks
        if self.jitter:
            time.sleep(self.jitter * ((0.5 + self.sent * GOLDEN) % 1.0))
        self.sent += 1
        t0 = time.monotonic()
        self.conn.request("POST", PATH % task, headers=self.headers)
        reply = self.conn.getresponse()
        body = reply.read()
        t1 = time.monotonic()
        if reply.status != 200:
            raise RuntimeError(f"retry of {task} answered {reply.status}: {body[:200]!r}")
        self.last_body = body
        start = marks.wait("start", task)
        commit = marks.take("commit", task)
        dispatch = marks.take("dispatch", task)
        enter = marks.take("enter", task)
        if not record:
            return
        self.figure.samples.append((start - t0) * 1e6)
        self.splits["answer"].append((t1 - t0) * 1e6)
        if enter is not None and commit is not None:
            self.splits["send_to_enter"].append((enter - t0) * 1e6)
            self.splits["enter_to_commit"].append((commit - enter) * 1e6)
        if commit is not None:
            self.splits["send_to_commit"].append((commit - t0) * 1e6)
            self.splits["commit_to_start"].append((start - commit) * 1e6)
            if dispatch is not None:
                self.splits["commit_to_dispatch"].append((dispatch - commit) * 1e6)
        if dispatch is not None:
            self.splits["dispatch_to_start"].append((start - dispatch) * 1e6)

    def round(self, count: int) -> None:
        for _ in range(count):
            self.one(True)

    def finish(self) -> None:
        extra = self.figure.extra
        extra["tasks_used"] = self.next
        for name, values in self.splits.items():
            if values:
                extra[f"{name}_us"] = values
                extra[f"{name}_median_us"] = percentile(values, 50)
                extra[f"{name}_p99_us"] = percentile(values, 99)

    def stop(self) -> None:
        USED[self.store] = self.next
        self.conn.close()
        for proc in reversed(self.procs):
            proc.stop()


def compare(lib: Side, ref: Side, rounds: int, per_round: int, warmup: int) -> None:
    for side in (lib, ref):
        for _ in range(warmup):
            side.one(False)
    for r in range(rounds):
        for side in (lib, ref) if r % 2 == 0 else (ref, lib):
            if side.jitter:
                # The other side's round let this relay's polls drift: one request
                # (not counted) puts the next one's phase back in step with its poll.
                side.one(False)
            side.round(per_round)
    lib.finish()
    ref.finish()
    for side in (lib, ref):
        side.figure.extra.update(rounds=rounds, per_round=per_round, warmup=warmup)


# -- stores ----------------------------------------------------------------------------------
def sqlite_stores(scratch: Path, tasks: int) -> tuple[str, str]:
    """A library file (the demo's settings) and a floor file, each with ``tasks`` tasks."""
    from deepwork_retry.storage.sqlite import SQLiteStorage

    lib_path, floor_path = scratch / "dispatch-lib.db", scratch / "dispatch-floor.db"
    for path in (lib_path, floor_path):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    storage = SQLiteStorage(lib_path)
    add_blocked(storage, "p", tasks)
    storage.close()
    conn = sqlite3.connect(floor_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, n INTEGER NOT NULL,"
        " seq INTEGER)"
    )
    conn.execute("CREATE INDEX jobs_by_state ON jobs (state, seq)")
    conn.executemany(
        "INSERT INTO jobs VALUES (?, 'blocked', 0, NULL)", [(f"t{i:07d}",) for i in range(tasks)]
    )
    conn.close()
    return f"sqlite:{lib_path}", f"sqlite:{floor_path}"


def pg_reachable(tries: int = 4) -> str | None:
    """``None`` when PostgreSQL answers; a server short of connections gets a few tries."""
    from suite_pg import reachable

    why = reachable()
    for _ in range(tries - 1):
        if why is None:
            break
        time.sleep(5)
        why = reachable()
    return why


def pg_stores(tasks: int) -> tuple[str, str]:
    import psycopg
    from suite_pg import drop_schema, dsn, pg_storage

    storage = pg_storage(LIB_SCHEMA)
    add_blocked(storage, "p", tasks)
    storage.close()
    drop_schema(FLOOR_SCHEMA)
    s = f'"{FLOOR_SCHEMA}"'
    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(
            f"CREATE TABLE {s}.jobs (id text PRIMARY KEY, state text NOT NULL,"
            " n integer NOT NULL, seq bigint)"
        )
        conn.execute(f"CREATE INDEX jobs_by_state ON {s}.jobs (state, seq)")
        conn.execute(f"CREATE SEQUENCE {s}.seq")
        conn.execute(
            f"INSERT INTO {s}.jobs SELECT 't' || lpad(x::text, 7, '0'), 'blocked', 0, NULL"
            " FROM generate_series(0, %s - 1) AS x",
            (tasks,),
        )
        for schema in (LIB_SCHEMA, FLOOR_SCHEMA):
            conn.execute(
                f'ANALYZE "{schema}".tasks' if schema == LIB_SCHEMA else f"ANALYZE {s}.jobs"
            )
    return f"pg:{LIB_SCHEMA}", f"pg:{FLOOR_SCHEMA}"


def drop_pg() -> None:
    from suite_pg import drop_schema

    for schema in (LIB_SCHEMA, FLOOR_SCHEMA):
        drop_schema(schema)


# -- rows ------------------------------------------------------------------------------------
SPLIT_NAMES = {
    "answer": "HTTP answer",
    "send_to_commit": "send → commit",
    "send_to_enter": "send → storage call",
    "enter_to_commit": "storage call → commit",
    "commit_to_dispatch": "commit → dispatch",
    "dispatch_to_start": "dispatch → start",
    "commit_to_start": "commit → start",
}


def split_rows(
    name: str, lib: Side, ref: Side, parts: list[str], rename: dict[str, str] | None = None
) -> list[Row]:
    names = {**SPLIT_NAMES, **(rename or {})}
    rows = []
    for part in parts:
        a, b = lib.splits[part], ref.splits[part]
        if not a or not b:
            continue
        rows.append(
            Row(
                GROUP,
                f"  {name}: {names[part]}",
                Figure(lib.figure.label, "us", list(a)),
                Figure(ref.figure.label, "us", list(b)),
                target="report",
            )
        )
    return rows


def direct(
    name: str, dispatcher: str, store: tuple[str, str], marks: Marks, logs: Path, sizes: Any
) -> list[Row]:
    rounds, per_round, warmup = sizes
    lib_store, floor_store = store
    label = "SQLite FULL" if lib_store.startswith("sqlite") else "PostgreSQL"
    hand = {
        "threads": "ThreadPoolExecutor.submit",
        "asyncio": "loop.create_task",
    }[dispatcher]
    lib = ref = None
    try:
        lib = Side(
            f"Starlette adapter, {name}, {label}", f"lib-{dispatcher}", lib_store, marks, logs
        )
        ref = Side(
            f"bare Starlette: one-row UPDATE ({label}), {hand}",
            f"floor-{dispatcher}",
            floor_store,
            marks,
            logs,
        )
        compare(lib, ref, rounds, per_round, warmup)
        if b'"dispatched"' not in lib.last_body:
            raise RuntimeError(f"the library did not dispatch: {lib.last_body[:200]!r}")
    finally:
        for side in (lib, ref):
            if side is not None:
                side.stop()
    title = f"POST /retry → start: {name}, {label}"
    row = Row(
        GROUP,
        title,
        lib.figure,
        ref.figure,
        target="≤ 1.2x",
        bound=1.2,
        note=f"sequential, {rounds}x{per_round} per side",
    )
    parts = [
        "answer",
        "send_to_enter",
        "enter_to_commit",
        "commit_to_dispatch",
        "dispatch_to_start",
    ]
    return [row, *split_rows(f"{name}, {label}", lib, ref, parts)]


def relay(
    name: str, store: tuple[str, str], poll: float, marks: Marks, logs: Path, sizes: Any
) -> list[Row]:
    rounds, per_round, warmup = sizes
    lib_store, floor_store = store
    pg = lib_store.startswith("pg")
    lib = ref = None
    try:
        lib = Side(
            f"Starlette adapter, no dispatcher; AsyncOutboxRelay process "
            f"({'LISTEN/NOTIFY' if pg else f'poll {poll:g}s'})",
            "lib-none",
            lib_store,
            marks,
            logs,
            relay=("lib", poll),
        )
        ref = Side(
            "bare Starlette: one-row UPDATE"
            + (
                " + NOTIFY; psycopg LISTEN + SKIP LOCKED claim" if pg else f"; poll {poll:g}s claim"
            ),
            "floor-none",
            floor_store,
            marks,
            logs,
            relay=("floor", poll),
        )
        compare(lib, ref, rounds, per_round, warmup)
        if b'"pending"' not in lib.last_body:
            raise RuntimeError(f"the library did not leave the entry: {lib.last_body[:200]!r}")
    finally:
        for side in (lib, ref):
            if side is not None:
                side.stop()
    for side in (lib, ref):
        side.figure.extra["poll_interval_s"] = poll
    parts = ["answer", "commit_to_dispatch", "dispatch_to_start"]
    if pg:
        row = Row(
            GROUP,
            f"POST /retry → start: {name}",
            lib.figure,
            ref.figure,
            target=f"p99 < {RELAY_TARGET_MS:g} ms",
            bound=1.0,
            ratio_override=lib.figure.p99 / (RELAY_TARGET_MS * 1000),
            note=(
                f"ratio = library p99 / {RELAY_TARGET_MS:g} ms; median vs floor "
                f"{lib.figure.median / ref.figure.median:.2f}x; sequential, {rounds}x{per_round}"
            ),
        )
    else:
        row = Row(
            GROUP,
            f"POST /retry → start: {name}",
            lib.figure,
            ref.figure,
            target="report",
            note=f"poll_interval {poll:g}s on both sides; sequential, {rounds}x{per_round}",
        )
    rename = {"commit_to_dispatch": "commit → claimed (wake-up, claim)"}
    return [row, *split_rows(name, lib, ref, parts, rename)]


def wal_pages(scratch: Path, count: int) -> list[Row]:
    """Pages each commit appends to the WAL: a retry of the library against the floor's UPDATE.

    On SQLite ``FULL`` every commit ends with one ``fdatasync`` of the WAL; what
    it costs grows with what the commit wrote. No checkpoint runs meanwhile
    (``count`` commits stay below the 1000-page auto-checkpoint).
    """
    import struct
    from datetime import datetime, timezone

    from deepwork_retry import RetryBudget
    from deepwork_retry.storage.sqlite import SQLiteStorage

    store = scratch / "dispatch-wal"
    store.mkdir(exist_ok=True)
    lib_store, floor_store = (
        s.partition(":")[2] for s in sqlite_stores(store, count)
    )  # fmt: skip
    figures = []
    for path, label in (
        (lib_store, "library retry_blocked"),
        (floor_store, "floor one-row UPDATE"),
    ):
        check = sqlite3.connect(path, isolation_level=None)
        page = int(check.execute("PRAGMA page_size").fetchone()[0])
        check.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        wal = Path(f"{path}-wal")
        figure = Figure(label, "pages")
        sizes = [wal.stat().st_size if wal.exists() else 0]
        if path == lib_store:
            storage = SQLiteStorage(path)
            now = datetime.now(timezone.utc)
            for i in range(count):
                storage.retry_blocked(
                    "p", f"t{i:07d}", now=now, actor=None, reason=None,
                    budget=RetryBudget.ONE_MORE, claimed_until=now, idempotency_key=None,
                    idempotency_expires_at=None,
                )  # fmt: skip
                sizes.append(wal.stat().st_size)
            storage.close()
        else:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA synchronous = FULL")
            for i in range(count):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "UPDATE jobs SET state = 'ready', n = n + 1, seq = ? WHERE id = ?",
                    (i, f"t{i:07d}"),
                )
                conn.execute("COMMIT")
                sizes.append(wal.stat().st_size)
            conn.close()
        header = 32 if sizes[0] == 0 else 0
        figure.samples = [
            (b - a - (header if n == 0 else 0)) / (page + 24)
            for n, (a, b) in enumerate(itertools.pairwise(sizes))
        ]
        # Which table or index each appended page belongs to (dbstat names the b-trees).
        data = wal.read_bytes()
        owners: dict[int, str] = {}
        with contextlib.suppress(sqlite3.Error):
            owners = dict(check.execute("SELECT pageno, name FROM dbstat").fetchall())
        per_tree: dict[str, int] = {}
        offset = 32
        while offset + 24 <= len(data):
            number = struct.unpack(">I", data[offset : offset + 4])[0]
            tree = owners.get(number, "?")
            per_tree[tree] = per_tree.get(tree, 0) + 1
            offset += 24 + page
        figure.extra.update(
            commits=count,
            page_size=page,
            wal_frames_per_tree_per_commit={k: v / count for k, v in sorted(per_tree.items())},
        )
        check.close()
        figures.append(figure)
    return [
        Row(
            GROUP,
            "  SQLite FULL: WAL pages appended per commit (fsynced at once)",
            figures[0],
            figures[1],
            target="report",
            note=f"{count} commits each; per table and index in the JSON",
        )
    ]


def guarded(name: str, target: str, build: Any, *args: Any) -> list[Row]:
    """``build(*args)``'s rows, or one unavailable row saying why it could not run."""
    try:
        rows: list[Row] = build(*args)
    except Exception as exc:  # noqa: BLE001 - any failure makes the comparison unavailable
        return [
            unavailable(
                GROUP, f"POST /retry → start: {name}", f"{type(exc).__name__}: {exc}"[:160], target
            )
        ]
    return rows


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    started = time.monotonic()
    # (rounds, requests per round and side, warm-up requests per side)
    if quick:
        direct_sizes, relay_sizes, slow_sizes = (4, 15, 10), (4, 10, 5), None
    else:
        direct_sizes, relay_sizes, slow_sizes = (8, 40, 20), (8, 25, 10), (2, 5, 2)
    per_direct = direct_sizes[0] * direct_sizes[1] + direct_sizes[2]
    per_relay = relay_sizes[0] * relay_sizes[1] + relay_sizes[2]
    tasks = 2 * per_direct + 2 * per_relay + 100
    rows: list[Row] = []
    USED.clear()
    marks = Marks(scratch / "dispatch-marks.fifo")
    try:
        sqlite = sqlite_stores(scratch, tasks)
        for dispatcher, name in (
            ("threads", "ThreadPoolDispatcher"),
            ("asyncio", "AsyncioDispatcher"),
        ):
            rows += guarded(
                f"{name}, SQLite FULL",
                "≤ 1.2x",
                direct,
                name,
                dispatcher,
                sqlite,
                marks,
                logs,
                direct_sizes,
            )
        rows += guarded("WAL pages", "report", wal_pages, scratch, 50)
        for poll, sizes in ((0.05, relay_sizes), (1.0, slow_sizes)):
            title = f"relay-only, SQLite, poll {poll:g} s"
            if sizes is None:
                continue
            rows += guarded(title, "report", relay, title, sqlite, poll, marks, logs, sizes)
        if slow_sizes is None:
            rows.append(
                unavailable(GROUP, "POST /retry → start: relay-only, SQLite, poll 1.0 s",
                            "full run only (about 1 s a request)", "report")
            )  # fmt: skip
        why = pg_reachable()
        pg = None
        if why is None:
            try:
                pg = pg_stores(tasks)
            except Exception as exc:  # noqa: BLE001 - reported in the rows
                why = f"setting up failed: {type(exc).__name__}: {exc}"[:160]
        if pg is not None:
            try:
                rows += guarded(
                    "ThreadPoolDispatcher, PostgreSQL", "≤ 1.2x",
                    direct, "ThreadPoolDispatcher", "threads", pg, marks, logs, direct_sizes,
                )  # fmt: skip
                title = "relay-only, PostgreSQL, LISTEN/NOTIFY"
                rows += guarded(
                    title, f"p99 < {RELAY_TARGET_MS:g} ms",
                    relay, title, pg, 1.0, marks, logs, relay_sizes,
                )  # fmt: skip
            finally:
                for _ in range(6):  # the server may be short of connections a moment
                    try:
                        drop_pg()
                        break
                    except Exception:  # noqa: BLE001 - tried again
                        time.sleep(5)
        else:
            assert why is not None
            rows.append(unavailable(GROUP, "POST /retry → start: ThreadPoolDispatcher, PostgreSQL",
                                    why, "≤ 1.2x"))  # fmt: skip
            rows.append(unavailable(GROUP, "POST /retry → start: relay-only, PostgreSQL",
                                    why, f"p99 < {RELAY_TARGET_MS:g} ms"))  # fmt: skip
    finally:
        marks.close()
    elapsed = time.monotonic() - started
    for row in rows:
        if row.library is not None:
            row.library.extra["group_seconds"] = elapsed
    return rows
