"""The data set of the tests of the reads across projects, and what Python makes of it.

Its ids put the encodings' orders to the test (ASCII case and trailing spaces,
the two- to four-byte UTF-8 sequences, the characters on either side of the
surrogates, where UTF-16 order and code point order part); the strategies draw
cursors (any text, lone surrogates and NUL included, which no storage holds),
project sets and error types. Every page a storage answers must be the one
Python computes from the data.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from deepwork_retry._core.model import Progress, Project, Task
from deepwork_retry._core.states import TaskStatus

IDS = [
    "a", "A", "a ", "a\n/b", "e", "é", "\u00ff", "\u0100", "\u07ff", "\u0800", "\ud7ff",
    "\ue000", "\uffff", "\U00010000", "\U0010ffff", "z", "a\t",
]  # fmt: skip
"""Ids whose order by code point differs from a collation's, a UTF-16 order's, or a
trailing-space-blind comparison's."""

STATUSES = list(TaskStatus)
ERRORS = [None, "E1", "E2", "é", "E1 "]


def _data() -> tuple[list[Project], list[Task]]:
    projects = [Project(id=pid, name=f"project {n}") for n, pid in enumerate(IDS)]
    tasks = []
    for n, pid in enumerate(IDS):
        for m, tid in enumerate(IDS):
            if (n + m) % 3 == 0:
                continue  # some ids in some projects only
            status = STATUSES[(n * 7 + m) % len(STATUSES)]
            error = ERRORS[(n + 2 * m) % len(ERRORS)] if status is TaskStatus.BLOCKED else None
            tasks.append(Task(id=tid, project_id=pid, status=status, error_type=error))
    return projects, tasks


PROJECTS, TASKS = _data()
BLOCKED = sorted(
    (t for t in TASKS if t.status is TaskStatus.BLOCKED), key=lambda t: (t.project_id, t.id)
)
assert len(BLOCKED) > 20


def fill(storage: Any) -> Any:
    for project in PROJECTS:
        storage.create_project(project)
    storage.add_tasks(TASKS)
    return storage


def progress(pid: str) -> Progress:
    return Progress.recount(pid, (t.status for t in TASKS if t.project_id == pid))


def expected_projects(projects: frozenset[str] | None, after: str | None) -> list[str]:
    return sorted(
        p.id
        for p in PROJECTS
        if (projects is None or p.id in projects) and (after is None or p.id > after)
    )


def expected_blocked(
    projects: frozenset[str] | None, error_type: str | None, after: tuple[str, str] | None
) -> list[tuple[str, str]]:
    return [
        (t.project_id, t.id)
        for t in BLOCKED
        if (projects is None or t.project_id in projects)
        and (error_type is None or t.error_type == error_type)
        and (after is None or (t.project_id, t.id) > after)
    ]


# Cursors: a stored id, one just beside it, or any other id (lone surrogates included,
# which the core accepts in an id and no SQL storage holds).
IDS_DRAWN = st.sampled_from(IDS)
NEAR = st.builds(
    lambda a, b: a + b, IDS_DRAWN, st.sampled_from(["", "\ud800", "\udfff", " ", "\U0010ffff"])
)
ANY_ID = st.text(min_size=1, max_size=4).filter(lambda text: "\x00" not in text)
TEXT = st.one_of(IDS_DRAWN, NEAR, ANY_ID)
SETS = st.one_of(st.none(), st.frozensets(st.one_of(IDS_DRAWN, NEAR, ANY_ID), max_size=6))
ERROR_TYPES = st.one_of(st.none(), st.sampled_from(ERRORS[1:]), ANY_ID, st.just("E\ud800"))
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
