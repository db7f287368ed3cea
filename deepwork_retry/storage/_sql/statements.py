"""Every statement the SQL engine runs, rendered once per dialect from the shared columns.

:class:`Statements` writes each statement in SQLite's parameter style and hands
it to :meth:`Dialect.sql <deepwork_retry.storage._sql.dialect.Dialect.sql>`;
where dialects differ in shape the :class:`~deepwork_retry.storage._sql.dialect.Dialect`'s
hooks (``upsert``, ``insert_ignore``, ``limited``, ``lock``) spell it. Rules are
rendered from the core: the manual retry from :data:`effects.MANUAL_RETRY
<deepwork_retry._core.effects.MANUAL_RETRY>` (:func:`retry`), the outbox and
retention states from :mod:`deepwork_retry._core.retention`, the statuses from
:class:`~deepwork_retry._core.states.TaskStatus`.

The parameters of each statement are listed beside it; the engine
(:mod:`.engine`) passes them in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from deepwork_retry._core import effects, machine, retention
from deepwork_retry._core.model import Task
from deepwork_retry._core.states import DispatchState, RetryBudget, TaskStatus
from deepwork_retry.storage._sql import codec, common
from deepwork_retry.storage._sql.dialect import Dialect

COUNTERS = ("total", *common.STATUSES)
"""The project's progress counters, in the order the statements read them."""
ATTEMPT_COLUMN = {"trigger": "triggered_by"}
"""Attempt fields whose column has another name (``trigger`` is a keyword)."""
ATTEMPT_COLUMNS = tuple(ATTEMPT_COLUMN.get(c, c) for c in common.ATTEMPT_COLUMNS)
IN_CHUNK = 500
"""Ids per ``IN (...)`` list, well below every dialect's bound on parameters."""
INT64_MAX = 2**63 - 1

PENDING = common.literal(DispatchState.PENDING)
DEFERRED = common.literal(DispatchState.DEFERRED)
DELIVERED = common.literal(DispatchState.DELIVERED)
AWAITING_START = common.literal(retention.AWAITING_START)
"""Only a task still awaiting its start has its delivered entry handed out again."""
RUNNING = common.literal(TaskStatus.IN_PROGRESS)

assert COUNTERS == ("total", "inbox", "assigned", "in_progress", "review", "done", "blocked",
                    "skipped")  # fmt: skip


def marks(columns: tuple[str, ...] | list[str]) -> str:
    return ", ".join("?" for _ in columns)


def prefixed(columns: tuple[str, ...], prefix: str) -> str:
    return common.cols(columns, prefix)


class Statements:
    """The statements of one dialect (see the module's documentation).

    A dialect whose spelling of one statement differs beyond the hooks of
    :class:`~deepwork_retry.storage._sql.dialect.Dialect` subclasses this and
    overrides that attribute or method (set it after ``super().__init__``).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = d = dialect
        q, lock = d.sql, d.lock
        task, project = common.TASK_COLUMNS, common.PROJECT_COLUMNS
        entry = common.ENTRY_COLUMNS
        idem = tuple(d.identifier(c) for c in common.IDEM_COLUMNS)
        key_col = d.identifier("key")
        self.task_cols = common.cols(task)
        self.project_width = len(project)

        # -- setup: project (id) -> row; project row; task (project, id) -> row; task rows
        self.project_exists = q(f"SELECT 1 FROM projects WHERE id = ?{lock}")
        self.insert_project = q(
            f"INSERT INTO projects ({common.cols(project)}) VALUES ({marks(project)})"
        )
        self.task_exists = q(f"SELECT 1 FROM tasks WHERE project_id = ? AND id = ?{lock}")
        self.insert_task = q(f"INSERT INTO tasks ({common.cols(task)}) VALUES ({marks(task)})")
        # (project, blocker, task)
        self.insert_dep = q(d.insert_ignore("task_deps", ("project_id", "blocker_id", "task_id")))

        # -- reads
        self.project = q(f"SELECT {common.cols(project)} FROM projects WHERE id = ?")
        self.project_locked = q(f"SELECT {common.cols(project)} FROM projects WHERE id = ?{lock}")
        self.task = q(f"SELECT {common.cols(task)} FROM tasks WHERE project_id = ? AND id = ?")
        # (task id, project id): the project and one of its tasks (task columns NULL if missing)
        self.load = q(
            f"SELECT {prefixed(project, 'p.')}, {prefixed(task, 't.')} "
            "FROM projects AS p LEFT JOIN tasks AS t ON t.project_id = p.id AND t.id = ? "
            "WHERE p.id = ?"
        )
        # (project, blocker)
        self.dependants = q(
            f"SELECT {prefixed(task, 't.')} FROM task_deps AS d JOIN tasks AS t "
            "ON t.project_id = d.project_id AND t.id = d.task_id "
            "WHERE d.project_id = ? AND d.blocker_id = ? ORDER BY d.task_id"
        )
        self.progress = q(f"SELECT {', '.join(COUNTERS)} FROM projects WHERE id = ?")
        # (project, task)
        self.attempts = q(
            f"SELECT {common.cols(ATTEMPT_COLUMNS)} FROM attempts "
            "WHERE project_id = ? AND task_id = ? ORDER BY number"
        )
        # (project, task, last attempt)
        self.dispatches = q(
            f"SELECT {common.cols(entry)} FROM outbox WHERE project_id = ? AND task_id = ? "
            "AND attempt BETWEEN 1 AND ? ORDER BY attempt"
        )
        # (project)
        self.deferred = q(
            f"SELECT {common.cols(entry)} FROM outbox WHERE project_id = ? "
            f"AND state = {DEFERRED} ORDER BY seq"
        )

        # -- writes
        # (project, task)
        self.version = q(f"SELECT version FROM tasks WHERE project_id = ? AND id = ?{lock}")
        # (project)
        self.project_version = q(f"SELECT version FROM projects WHERE id = ?{lock}")
        # (task columns but the ids..., project, task, expected version): the compare-and-set,
        # the write itself, taking effect only at the expected version
        self.update_task = q(
            f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in task[2:])} "
            "WHERE project_id = ? AND id = ? AND version = ?"
        )
        # (project) per (old, new) status: one task moving between two statuses
        self.shift = {
            (old.value, new.value): q(
                f"UPDATE projects SET {old.value} = {old.value} - 1, "
                f"{new.value} = {new.value} + 1 WHERE id = ?"
            )
            for old in TaskStatus
            for new in TaskStatus
            if old is not new
        }
        # ... and the project's version and counters after it (with RETURNING, one statement)
        self.shift_returning = {
            key: q(f"{sql} RETURNING version, {', '.join(COUNTERS)}")
            for key, sql in self.shift.items()
        }
        self.counters = q(
            f"SELECT version, {', '.join(COUNTERS)}, event_seq FROM projects WHERE id = ?"
        )
        # (events made, project) per (old, new) status: the shift, numbering the move's
        # events too (the project's last event number is then read after it)
        numbering = {
            (old.value, new.value): (
                f"UPDATE projects SET {old.value} = {old.value} - 1, "
                f"{new.value} = {new.value} + 1, event_seq = event_seq + ?1 WHERE id = ?2"
            )
            for old in TaskStatus
            for new in TaskStatus
            if old is not new
        }
        self.shift_events = {key: q(sql) for key, sql in numbering.items()}
        # ... and the project's version, counters and last event number after it
        self.shift_events_returning = {
            key: q(f"{sql} RETURNING version, {', '.join(COUNTERS)}, event_seq")
            for key, sql in numbering.items()
        }
        self.next_pending_seq = (
            f"COALESCE((SELECT pending_seq FROM outbox WHERE state = {PENDING} "
            "ORDER BY pending_seq DESC LIMIT 1), 0) + 1"
        )
        # (entry columns): made pending after every pending entry; or with no position
        self.insert_pending = q(
            f"INSERT INTO outbox ({common.cols(entry)}, pending_seq) "
            f"VALUES ({marks(entry)}, {self.next_pending_seq})"
        )
        self.insert_entry = q(
            f"INSERT INTO outbox ({common.cols(entry)}, pending_seq) VALUES ({marks(entry)}, NULL)"
        )
        # (attempt columns..., project, task, attempts before it): only if it is the next one
        self.insert_next_attempt = q(
            f"INSERT INTO attempts ({common.cols(ATTEMPT_COLUMNS)}) "
            f"SELECT {marks(ATTEMPT_COLUMNS)}{d.from_nothing} "
            "WHERE (SELECT COUNT(*) FROM attempts WHERE project_id = ? AND task_id = ?) = ?"
        )
        # (project, task, number)
        self.attempt = q(
            f"SELECT {common.cols(ATTEMPT_COLUMNS)} FROM attempts "
            f"WHERE project_id = ? AND task_id = ? AND number = ?{lock}"
        )
        # (started, finished, outcome, error type, error message, project, task, number)
        self.update_attempt = q(
            "UPDATE attempts SET started_at = ?, finished_at = ?, outcome = ?, error_type = ?, "
            "error_message = ? WHERE project_id = ? AND task_id = ? AND number = ?"
        )
        self.next_pending = q(
            f"SELECT pending_seq FROM outbox WHERE state = {PENDING} "
            f"ORDER BY pending_seq DESC LIMIT 1{lock}"
        )
        # (project, task, attempt)
        self.entry = q(
            f"SELECT seq, {common.cols(entry)} FROM outbox "
            f"WHERE project_id = ? AND task_id = ? AND attempt = ?{lock}"
        )
        # (claimed until, pending position, seq)
        self.release = q(
            f"UPDATE outbox SET state = {PENDING}, claimed_until = ?, pending_seq = ? WHERE seq = ?"
        )
        # (status, name, created, updated, version, id)
        self.update_project = q(
            "UPDATE projects SET status = ?, name = ?, created_at = ?, updated_at = ?, "
            "version = ? WHERE id = ?"
        )

        # -- outbox
        # (now, now, limit)
        self.claimable = q(
            f"SELECT seq, {common.cols(entry)} FROM outbox WHERE state = {PENDING} "
            "AND available_at <= ? AND (claimed_until IS NULL OR claimed_until <= ?) "
            f"ORDER BY pending_seq LIMIT ?{lock}"
        )
        # (until, seq)
        self.claim = q("UPDATE outbox SET claimed_until = ? WHERE seq = ?")
        # (now, project, task, attempt)
        self.mark_delivered = q(
            f"UPDATE outbox SET state = {DELIVERED}, delivered_at = ?, tries = tries + 1, "
            "claimed_until = NULL, pending_seq = NULL "
            f"WHERE project_id = ? AND task_id = ? AND attempt = ? AND state = {PENDING}"
        )
        # (error, retry at, project, task, attempt)
        self.mark_failed = q(
            "UPDATE outbox SET tries = tries + 1, last_error = ?, available_at = ?, "
            "claimed_until = NULL "
            f"WHERE project_id = ? AND task_id = ? AND attempt = ? AND state = {PENDING}"
        )
        # (delivered before, limit): driven by the assigned tasks (few), not by the
        # delivered entries (all history)
        self.stale = q(
            f"SELECT o.seq, {prefixed(entry, 'o.')} FROM tasks AS t JOIN outbox AS o "
            "ON o.project_id = t.project_id AND o.task_id = t.id AND o.attempt = t.attempt "
            f"WHERE t.status = {AWAITING_START} AND o.state = {DELIVERED} "
            "AND o.delivered_at <= ? "
            f"ORDER BY o.delivered_at, o.project_id, o.task_id, o.attempt LIMIT ?{lock}"
        )
        # (now, error, pending position, seq)
        self.redeliver = q(
            f"UPDATE outbox SET state = {PENDING}, available_at = ?, claimed_until = NULL, "
            "last_error = ?, pending_seq = ? WHERE seq = ?"
        )
        # (now, limit)
        self.expired_leases = q(
            f"SELECT {common.cols(task)} FROM tasks WHERE status = {RUNNING} "
            "AND lease_expires_at <= ? ORDER BY lease_expires_at, project_id, id LIMIT ?"
        )

        # -- lifecycle events (deepwork_retry._core.events)
        ev, er = common.EVENT_COLUMNS, common.EVENT_RETRY_COLUMNS
        # (events made, project): the project's numbering moved on; its last number after
        bump = "UPDATE projects SET event_seq = event_seq + ? WHERE id = ?"
        self.bump_events = q(bump)
        self.bump_events_returning = q(f"{bump} RETURNING event_seq")
        self.event_seq = q(f"SELECT event_seq FROM projects WHERE id = ?{lock}")
        # (project, after, limit)
        self.events = q(
            f"SELECT {common.cols(ev)} FROM events WHERE project_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?"
        )
        # (now): the pending events out with a caller (their tasks' later events wait, so
        # that each task's events go in order); locked, as every read a write acts on
        # (a subquery would be a plain read: on MySQL, of an older snapshot)
        self.held_events = q(
            "SELECT project_id, task_id, seq FROM events "
            f"WHERE delivered_at IS NULL AND claimed_until > ?{lock}"
        )
        # (now, limit): pending events not claimed (or whose claim expired), in order
        pending = (
            f"SELECT {common.cols(ev)} FROM events WHERE delivered_at IS NULL "
            "AND (claimed_until IS NULL OR claimed_until <= ?1)"
        )
        self.claimable_events = q(f"{pending} ORDER BY project_id, seq LIMIT ?2{lock}")
        # (now, after project, after seq, limit): the next page of them
        self.claimable_events_after = q(
            f"{pending} AND (project_id > ?2 OR (project_id = ?2 AND seq > ?3)) "
            f"ORDER BY project_id, seq LIMIT ?4{lock}"
        )
        # (until, project, seq)
        self.claim_event = q("UPDATE events SET claimed_until = ? WHERE project_id = ? AND seq = ?")
        # (now, project, seq)
        self.settle_event = q(
            "UPDATE events SET delivered_at = ?, claimed_until = NULL "
            "WHERE project_id = ? AND seq = ? AND delivered_at IS NULL"
        )
        # (failed delivery columns)
        self.upsert_event_retry = q(d.upsert("event_retries", er, "project_id, seq, subscriber"))
        retry_with_event = (
            f"SELECT {common.cols(er, 'r.')}, {common.cols(ev, 'e.')} FROM event_retries AS r "
            "JOIN events AS e ON e.project_id = r.project_id AND e.seq = r.seq "
        )
        # (now, limit)
        self.claimable_retries = q(
            f"{retry_with_event}WHERE r.parked = 0 AND r.retry_at <= ?1 "
            "AND (r.claimed_until IS NULL OR r.claimed_until <= ?1) "
            f"ORDER BY r.retry_at, r.project_id, r.seq, r.subscriber LIMIT ?2{lock}"
        )
        key3 = "WHERE project_id = ? AND seq = ? AND subscriber = ?"
        # (until, project, seq, subscriber)
        self.claim_retry = q(f"UPDATE event_retries SET claimed_until = ? {key3}")
        # (project, seq, subscriber)
        self.retry_delivered = q(f"DELETE FROM event_retries {key3}")
        # (retry at, error, project, seq, subscriber)
        self.retry_again = q(
            "UPDATE event_retries SET tries = tries + 1, retry_at = ?, last_error = ?, "
            f"claimed_until = NULL {key3}"
        )
        # (error, project, seq, subscriber)
        self.retry_parked = q(
            "UPDATE event_retries SET tries = tries + 1, last_error = ?, parked = 1, "
            f"claimed_until = NULL {key3}"
        )
        # ([subscriber,] limit)
        self.parked = {
            by_subscriber: q(
                f"{retry_with_event}WHERE r.parked = 1"
                f"{' AND r.subscriber = ?' if by_subscriber else ''} "
                "ORDER BY e.at, r.project_id, r.seq, r.subscriber LIMIT ?"
            )
            for by_subscriber in (False, True)
        }
        # (now[, subscriber][, project, seq])
        self.replay = {
            (by_subscriber, by_event): q(
                "UPDATE event_retries SET parked = 0, tries = 0, retry_at = ?, "
                "claimed_until = NULL WHERE parked = 1"
                f"{' AND subscriber = ?' if by_subscriber else ''}"
                f"{' AND project_id = ? AND seq = ?' if by_event else ''}"
            )
            for by_subscriber in (False, True)
            for by_event in (False, True)
        }

        # -- idempotency
        # (key)
        self.idem = q(f"SELECT {common.cols(idem)} FROM idempotency WHERE {key_col} = ?")
        self.idem_locked = q(
            f"SELECT {common.cols(idem)} FROM idempotency WHERE {key_col} = ?{lock}"
        )
        # (idempotency columns)
        self.insert_idem = q(
            f"INSERT INTO idempotency ({common.cols(idem)}) VALUES ({marks(idem)})"
        )
        self.upsert_idem = q(d.upsert("idempotency", idem, key_col))
        # (key, project, task, now, expires): reserve a key unless a record that has not
        # expired holds it (then nothing is written); an expired record gives its key up
        self.reserve_idem = (
            q(
                d.upsert(
                    "idempotency", idem, key_col,
                    values=["?1", "?2", "?3", "?4", "NULL", "NULL", "?5"],
                    only_if="expires_at <= ?4",
                )
            )
            if d.conditional_upsert
            else ""  # a locked read and a plain upsert instead (see Engine._reserve)
        )  # fmt: skip

        # -- retention: the prune rule (deepwork_retry._core.retention) rendered;
        # each (cutoff, batch)
        finished = ", ".join(sorted(common.literal(s) for s in retention.FINISHED))
        self.prune = (
            q(
                f"DELETE FROM idempotency WHERE {key_col} IN ("
                + d.limited(
                    f"SELECT {key_col} FROM idempotency WHERE expires_at <= ?1 "
                    "ORDER BY expires_at LIMIT ?2"
                )
                + ")"
            ),
            q(
                "DELETE FROM outbox WHERE seq IN ("
                + d.limited(
                    "SELECT o.seq FROM outbox AS o "
                    f"WHERE o.state = {common.literal(retention.PRUNED_ENTRY_STATE)} "
                    "AND o.delivered_at <= ?1 "
                    "AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.project_id = o.project_id "
                    f"AND t.id = o.task_id AND t.status = {AWAITING_START} "
                    "AND t.attempt = o.attempt) "
                    "ORDER BY o.delivered_at LIMIT ?2"
                )
                + ")"
            ),
            q(
                "DELETE FROM attempts WHERE (project_id, task_id, number) IN ("
                + d.limited(
                    "SELECT a.project_id, a.task_id, a.number FROM attempts AS a "
                    "JOIN tasks AS t ON t.project_id = a.project_id AND t.id = a.task_id "
                    "WHERE a.dispatched_at <= ?1 AND t.updated_at <= ?1 "
                    f"AND t.status IN ({finished}) ORDER BY a.dispatched_at LIMIT ?2"
                )
                + ")"
            ),
            # events delivered (to every subscriber) before the cutoff (PruneRule.removes_event)
            q(
                "DELETE FROM events WHERE (project_id, seq) IN ("
                + d.limited(
                    "SELECT e.project_id, e.seq FROM events AS e "
                    "WHERE e.delivered_at IS NOT NULL AND e.delivered_at <= ?1 "
                    "AND NOT EXISTS (SELECT 1 FROM event_retries AS r "
                    "WHERE r.project_id = e.project_id AND r.seq = e.seq) "
                    "ORDER BY e.delivered_at LIMIT ?2"
                )
                + ")"
            ),
        )
        self._retry: dict[effects.Move, RetrySQL] = {}
        self._tasks_in: dict[tuple[int, bool], str] = {}
        self._list_tasks: dict[tuple[bool, str | None], str] = {}
        self._add_counts: dict[tuple[str, ...], str] = {}
        self._list_projects: dict[tuple[int, str | None], str] = {}
        self._blocked: dict[tuple[int, bool, str | None, str | None], str] = {}
        self._insert_events: dict[int, str] = {}

    # -- statements whose shape depends on the call -------------------------------------
    def tasks_in(self, count: int, *, locked: bool = False) -> str:
        """(project, ``count`` task ids): those tasks."""
        key = (count, locked)
        sql = self._tasks_in.get(key)
        if sql is None:
            sql = self._tasks_in[key] = self.dialect.sql(
                f"SELECT {self.task_cols} FROM tasks WHERE project_id = ? "
                f"AND id IN ({', '.join('?' for _ in range(count))})"
                f"{self.dialect.lock if locked else ''}"
            )
        return sql

    def list_tasks(self, by_status: bool, after: str | None) -> str:
        """(project[, status][, after bound], limit): a page of tasks, ``after`` the
        comparison of the bound (``>``, ``>=``) or ``None``."""
        sql = self._list_tasks.get((by_status, after))
        if sql is not None:
            return sql
        where = "project_id = ?"
        if by_status:
            where += " AND status = ?"
        if after is not None:
            assert after in (">", ">=")
            where += f" AND id {after} ?"
        sql = self._list_tasks[(by_status, after)] = self.dialect.sql(
            f"SELECT {self.task_cols} FROM tasks WHERE {where} ORDER BY id LIMIT ?"
        )
        return sql

    def list_projects(self, count: int, after: str | None) -> str:
        """([``count`` project ids...][, after bound], limit): a page of projects with
        their counters (:data:`COUNTERS`, after the project's columns), by id; ``count``
        0 reads every project, ``after`` is the comparison of the bound or ``None``."""
        key = (count, after)
        sql = self._list_projects.get(key)
        if sql is not None:
            return sql
        where = []
        if count:
            where.append(f"id IN ({', '.join('?' for _ in range(count))})")
        if after is not None:
            assert after in (">", ">=")
            where.append(f"id {after} ?")
        sql = self._list_projects[key] = self.dialect.sql(
            f"SELECT {common.cols(common.PROJECT_COLUMNS)}, {', '.join(COUNTERS)} "
            f"FROM projects{' WHERE ' + ' AND '.join(where) if where else ''} "
            "ORDER BY id LIMIT ?"
        )
        return sql

    def blocked_tasks(
        self, count: int, by_error: bool, after_project: str | None, after_task: str | None
    ) -> str:
        """([``count`` project ids...][, error type][, after project[, after task]], limit):
        a page of blocked tasks across projects, by (project, id), from the index of
        blocked tasks; ``count`` 0 reads every project. ``after_project`` is the
        comparison of the project bound alone (no stored project equals it), or ``"="``
        when the page follows a stored pair: ``after_task`` then compares the task bound.
        """
        key = (count, by_error, after_project, after_task)
        sql = self._blocked.get(key)
        if sql is not None:
            return sql
        d = self.dialect
        where = [f"status = {common.literal(TaskStatus.BLOCKED)}"]  # the partial index's
        n = 0

        def mark() -> str:
            nonlocal n
            n += 1
            return f"?{n}"

        if count:
            where.append(f"project_id IN ({', '.join(mark() for _ in range(count))})")
        if by_error:
            where.append(f"{d.exact('error_type')} = {mark()}")
        if after_project == "=":
            assert after_task in (">", ">=")
            pid, tid = mark(), mark()
            if d.row_values:
                where.append(f"(project_id, id) {after_task} ({pid}, {tid})")
            else:
                where.append(
                    f"(project_id > {pid} OR (project_id = {pid} AND id {after_task} {tid}))"
                )
        elif after_project is not None:
            assert after_project in (">", ">=")
            assert after_task is None
            where.append(f"project_id {after_project} {mark()}")
        sql = self._blocked[key] = d.sql(
            f"SELECT {self.task_cols} FROM tasks{d.blocked_index} WHERE {' AND '.join(where)} "
            f"ORDER BY project_id, id LIMIT {mark()}"
        )
        return sql

    def add_counts(self, statuses: tuple[str, ...]) -> str:
        """(count of all, count per status..., project): tasks added to a project."""
        sql = self._add_counts.get(statuses)
        if sql is None:
            assert all(s in common.STATUSES for s in statuses)
            sets = ", ".join(f"{s} = {s} + ?" for s in statuses)
            sql = self._add_counts[statuses] = self.dialect.sql(
                f"UPDATE projects SET total = total + ?, {sets} WHERE id = ?"
            )
        return sql

    def insert_events(self, count: int) -> str:
        """(event columns of each of ``count`` events): one statement for a move's events."""
        sql = self._insert_events.get(count)
        if sql is None:
            row = f"({marks(common.EVENT_COLUMNS)})"
            sql = self._insert_events[count] = self.dialect.sql(
                f"INSERT INTO events ({common.cols(common.EVENT_COLUMNS)}) "
                f"VALUES {', '.join(row for _ in range(count))}"
            )
        return sql

    def retry(self, move: effects.Move) -> RetrySQL:
        """The one-step manual retry's statements for ``move`` (rendered once per move)."""
        found = self._retry.get(move)
        if found is None:
            found = self._retry[move] = render_retry(self, move)
        return found


# -- the manual retry in one transaction ------------------------------------------------
# Rendered from the core, never restated: the move's effects are the data of
# effects.MANUAL_RETRY (the task's new values, the attempt record), the states
# it leaves and reaches come from machine.TRANSITIONS, the project states that
# accept a retry and those that dispatch now from machine.PROJECT_RULES. A
# storage renders the move it is given when it is made; a test holds the result
# equal to the core's decision applied by the general path.
#
# The statements avoid RETURNING, which costs SQLite more (a buffered result
# table per execution) than one SELECT of the changed rows afterwards.

ACCEPTING = frozenset(s.value for s in machine.ACCEPTS_RETRY)
DISPATCHING = frozenset(s.value for s in machine.DISPATCHES)


@attrs.frozen
class RetrySQL:
    """The one-step retry's statements for one move, and the decoder of what it reads."""

    sources: tuple[str, ...]
    update: dict[str, str]
    """Per state the move leaves: the task changed as the core changes it, only from
    that state. Parameters: 1 the budget is ``full``, 2 now, 3 project id, 4 task id."""
    shift: dict[str, str]
    """Per state the move leaves: the project's counters moved along (project id)."""
    shift_events: dict[str, str]
    """As :attr:`shift`, numbering events too: 1 events made, 2 project id."""
    read: str
    """After the changes (1 project id, 2 task id): the project's status and counters,
    the task's columns the move did not set to a value known beforehand, its attempt
    records counted, the last pending outbox position and the project's last event
    number."""
    count_at: int
    decode: Callable[..., Task]
    """The task after the move, from :attr:`read`'s row and what the move set."""
    insert_pending: str
    """1 project, 2 task, 3 number, 4 now, 5 claimed until, 6 pending position, 7 trace."""
    insert_deferred: str
    """1 project, 2 task, 3 number, 4 now, 5 trace."""
    insert_attempt: str
    """1 project, 2 task, 3 number, 4 now, 5 actor, 6 reason, 7 budget."""


def _reads(expr: effects.Expr) -> set[str]:
    """The task fields ``expr`` reads."""
    if isinstance(expr, (effects.Field, effects.Plus)):
        return {expr.name}
    if isinstance(expr, effects.ByBudget):
        return _reads(expr.full) | _reads(expr.one_more)
    return set()


def sequential(move: effects.Move) -> effects.Move:
    """``move`` with its task effects ordered so that, where an ``UPDATE`` assigns left to
    right and later expressions see the new values (MySQL), each field is read before it
    is assigned; a ``ValueError`` when no order can (two fields reading each other)."""
    left = list(move.task)
    ordered: list[tuple[str, effects.Expr]] = []
    while left:
        for i, (name, _expr) in enumerate(left):
            if not any(name in _reads(e) for n, e in left if n != name):
                ordered.append(left.pop(i))
                break
        else:
            raise ValueError(f"no order of assignments keeps every old value: {left}")
    return attrs.evolve(move, task=tuple(ordered))


def render_retry(statements: Statements, move: effects.Move) -> RetrySQL:
    q = statements.dialect.sql
    if statements.dialect.sequential_set:
        move = sequential(move)
    target = move.target.value
    sources = tuple(s.value for s in move.sources)
    change = common.set_clause(move, common.Spelling(column=str, now="?2", full="?1"))
    # Python's ints have no bound; SQLite's would turn REAL instead of failing.
    bounded = "".join(
        f" AND {name} <= {INT64_MAX - delta}" for name, delta in move.increments().items()
    )
    update = {
        source: q(
            f"UPDATE tasks SET {change} WHERE project_id = ?3 AND id = ?4 "
            f"AND status = {common.literal(source)}{bounded}"
        )
        for source in sources
    }
    read_back = common.read_back(move)
    task_at = 1 + len(COUNTERS)
    read = q(
        f"SELECT p.status, {common.cols(COUNTERS, 'p.')}, {common.cols(read_back, 't.')}, "
        "(SELECT COUNT(*) FROM attempts WHERE project_id = ?1 AND task_id = ?2), "
        f"(SELECT pending_seq FROM outbox WHERE state = {PENDING} "
        "ORDER BY pending_seq DESC LIMIT 1), p.event_seq "
        "FROM projects AS p, tasks AS t WHERE p.id = ?1 AND t.project_id = ?1 AND t.id = ?2"
    )
    given, consts = common.known_values(move, now="now")
    decode = common.compile_decoder(
        Task,
        read=common.at(read_back, task_at),
        codec=codec.TASK_CODEC,
        helpers={**codec.HELPERS, **consts},
        given={"project_id": "project_id", "id": "task_id", **given},
        signature="row, project_id, task_id, now",
    )
    spelling = common.Spelling(
        column=str, now="?4", full=f"?7 = {common.literal(RetryBudget.FULL)}",
        args={"actor": "?5", "reason": "?6", "budget": "?7"},
    )  # fmt: skip
    fields = common.ATTEMPT_COLUMNS[3:]
    record = common.record_values(move, spelling, fields)
    available = common.render(dict(move.attempt)["available_at"], spelling)
    insert_attempt = q(
        f"INSERT INTO attempts (project_id, task_id, number, "
        f"{common.cols(ATTEMPT_COLUMN.get(f, f) for f in fields)}) "
        f"VALUES (?1, ?2, ?3, {', '.join(record)})"
    )
    entry = (
        f"INSERT INTO outbox ({common.cols(common.ENTRY_COLUMNS)}, pending_seq) VALUES (?1, ?2, ?3"
    )
    return RetrySQL(
        sources=sources,
        update=update,
        shift={source: statements.shift[(source, target)] for source in sources},
        shift_events={source: statements.shift_events[(source, target)] for source in sources},
        read=read,
        count_at=task_at + len(read_back),
        decode=decode,
        insert_pending=q(f"{entry}, {PENDING}, {available}, ?4, ?5, 0, NULL, NULL, ?7, ?6)"),
        insert_deferred=q(f"{entry}, {DEFERRED}, {available}, ?4, NULL, 0, NULL, NULL, ?5, NULL)"),
        insert_attempt=insert_attempt,
    )
