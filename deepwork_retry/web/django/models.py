"""The tables of :class:`~deepwork_retry.web.django.storage.DjangoStorage`, as Django models.

They hold what every other storage holds (projects with their progress
counters, tasks, the dependency index, attempt records, the dispatch outbox,
idempotency records, lifecycle events and their failed deliveries), in
tables named ``deepwork_retry_*`` and created by this app's migrations
(``python manage.py migrate deepwork_retry``).

Rows are written only through the storage, which applies the core's plans;
the admin shows them read-only and changes tasks through the services.
Ids are the library's own (a project's ``id``, a task's ``task_id`` within its
project); the other tables have a surrogate ``seq`` key.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from django.db import models

from deepwork_retry._core.events import EventType
from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)

ID_LENGTH = 255
"""The longest id (:data:`deepwork_retry._core.inputs.MAX_ID_LENGTH`)."""


def _choices(members: Iterable[enum.Enum]) -> list[tuple[str, str]]:
    return [(m.value, m.value.replace("_", " ")) for m in members]


class Project(models.Model):  # type: ignore[misc]  # Django ships no type hints
    id = models.CharField(primary_key=True, max_length=ID_LENGTH)
    status = models.CharField(max_length=32, choices=_choices(ProjectStatus))
    name = models.TextField(blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    version = models.BigIntegerField()
    # Progress counters, changed in the same transaction as every task move.
    total = models.BigIntegerField(default=0)
    inbox = models.BigIntegerField(default=0)
    assigned = models.BigIntegerField(default=0)
    in_progress = models.BigIntegerField(default=0)
    review = models.BigIntegerField(default=0)
    done = models.BigIntegerField(default=0)
    blocked = models.BigIntegerField(default=0)
    skipped = models.BigIntegerField(default=0)
    event_seq = models.BigIntegerField(default=0)
    """The ``seq`` of the project's last lifecycle event (bumped with each move)."""

    class Meta:
        db_table = "deepwork_retry_project"

    def __str__(self) -> str:
        return str(self.id)


class Task(models.Model):  # type: ignore[misc]
    seq = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(
        Project, on_delete=models.PROTECT, related_name="tasks", db_column="project_id"
    )
    task_id = models.CharField("task id", max_length=ID_LENGTH)
    title = models.TextField(blank=True)
    status = models.CharField(max_length=32, choices=_choices(TaskStatus))
    retry_count = models.BigIntegerField()
    max_retries = models.BigIntegerField()
    retries_left = models.BigIntegerField()
    error_message = models.TextField(null=True, blank=True)
    error_type = models.TextField(null=True, blank=True)
    blocked_reason = models.CharField(
        max_length=32, null=True, blank=True, choices=_choices(BlockedReason)
    )
    blocked_by = models.JSONField(default=list)
    attempt = models.BigIntegerField()
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    version = models.BigIntegerField()
    metadata = models.JSONField(default=dict)

    class Meta:
        db_table = "deepwork_retry_task"
        constraints = [
            models.UniqueConstraint(fields=["project", "task_id"], name="deepwork_retry_task_key")
        ]
        indexes = [
            models.Index(
                fields=["project", "status", "task_id"], name="deepwork_retry_task_status"
            ),
            models.Index(fields=["status", "lease_expires_at"], name="deepwork_retry_task_lease"),
        ]

    def __str__(self) -> str:
        return f"{self.project_id}/{self.task_id}"


class TaskDependency(models.Model):  # type: ignore[misc]
    """``task_id`` waits for ``blocker_id`` (an index of ``Task.blocked_by``)."""

    seq = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, db_column="project_id")
    blocker_id = models.CharField(max_length=ID_LENGTH)
    task_id = models.CharField(max_length=ID_LENGTH)

    class Meta:
        db_table = "deepwork_retry_task_dependency"
        constraints = [
            models.UniqueConstraint(
                fields=["project", "blocker_id", "task_id"], name="deepwork_retry_dependency_key"
            )
        ]


class Attempt(models.Model):  # type: ignore[misc]
    seq = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, db_column="project_id")
    task_id = models.CharField("task id", max_length=ID_LENGTH)
    number = models.BigIntegerField()
    trigger = models.CharField(max_length=32, choices=_choices(Trigger))
    dispatched_at = models.DateTimeField()
    available_at = models.DateTimeField()
    actor = models.TextField(null=True, blank=True)
    reason = models.TextField(null=True, blank=True)
    budget = models.CharField(max_length=32, null=True, blank=True, choices=_choices(RetryBudget))
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=32, null=True, blank=True, choices=_choices(Outcome))
    error_type = models.TextField(null=True, blank=True)
    error_message = models.TextField(null=True, blank=True)

    class Meta:
        db_table = "deepwork_retry_attempt"
        constraints = [
            models.UniqueConstraint(
                fields=["project", "task_id", "number"], name="deepwork_retry_attempt_key"
            )
        ]
        indexes = [models.Index(fields=["dispatched_at"], name="deepwork_retry_attempt_age")]

    def __str__(self) -> str:
        return f"{self.project_id}/{self.task_id} #{self.number}"


class OutboxEntry(models.Model):  # type: ignore[misc]
    seq = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, db_column="project_id")
    task_id = models.CharField(max_length=ID_LENGTH)
    attempt = models.BigIntegerField()
    state = models.CharField(max_length=32, choices=_choices(DispatchState))
    available_at = models.DateTimeField()
    created_at = models.DateTimeField()
    claimed_until = models.DateTimeField(null=True, blank=True)
    tries = models.BigIntegerField(default=0)
    last_error = models.TextField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    pending_seq = models.BigIntegerField(null=True, blank=True)
    """Claim order: the order in which entries were made pending."""
    trace = models.TextField(null=True, blank=True)
    """The W3C trace context the worker's attempt continues (``None`` without telemetry)."""

    class Meta:
        db_table = "deepwork_retry_outbox"
        verbose_name_plural = "outbox entries"
        constraints = [
            models.UniqueConstraint(
                fields=["project", "task_id", "attempt"], name="deepwork_retry_outbox_key"
            )
        ]
        indexes = [
            models.Index(fields=["state", "pending_seq"], name="deepwork_retry_outbox_pending"),
            models.Index(fields=["state", "delivered_at"], name="deepwork_retry_outbox_sent"),
        ]


class IdempotencyRecord(models.Model):  # type: ignore[misc]
    key = models.TextField(primary_key=True)
    project_id = models.CharField(max_length=ID_LENGTH)
    task_id = models.CharField(max_length=ID_LENGTH)
    created_at = models.DateTimeField()
    status_code = models.IntegerField(null=True, blank=True)
    body = models.TextField(null=True, blank=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "deepwork_retry_idempotency"


class Event(models.Model):  # type: ignore[misc]
    """A lifecycle event (:class:`deepwork_retry._core.events.Event`), numbered per project.

    ``(project, seq)`` is its id; ``delivered_at`` ``NULL`` means pending. The
    surrogate ``id`` key is Django's (its admin has no composite keys).
    """

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, db_column="project_id")
    seq = models.BigIntegerField()
    type = models.CharField(max_length=32, choices=_choices(EventType))
    task_id = models.CharField("task id", max_length=ID_LENGTH, null=True, blank=True)
    attempt = models.BigIntegerField(null=True, blank=True)
    at = models.DateTimeField()
    data = models.TextField(default="{}")
    """The event's data as JSON text (:func:`deepwork_retry._core.events.data_text`)."""
    delivered_at = models.DateTimeField(null=True, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "deepwork_retry_event"
        constraints = [
            models.UniqueConstraint(fields=["project", "seq"], name="deepwork_retry_event_key")
        ]
        indexes = [
            models.Index(
                fields=["project", "seq"],
                condition=models.Q(delivered_at__isnull=True),
                name="deepwork_retry_event_pending",
            ),
            models.Index(fields=["delivered_at"], name="deepwork_retry_event_sent"),
        ]

    def __str__(self) -> str:
        return f"{self.project_id}:{self.seq}"


class EventRetry(models.Model):  # type: ignore[misc]
    """A subscriber's failed delivery of the event ``(project, seq)``: due again at
    ``retry_at``, or ``parked`` after the subscriber's limit."""

    id = models.BigAutoField(primary_key=True)
    project = models.ForeignKey(Project, on_delete=models.PROTECT, db_column="project_id")
    seq = models.BigIntegerField()
    subscriber = models.CharField(max_length=ID_LENGTH)
    tries = models.BigIntegerField()
    retry_at = models.DateTimeField()
    last_error = models.TextField(null=True, blank=True)
    parked = models.BooleanField(default=False)
    claimed_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "deepwork_retry_event_retry"
        verbose_name = "event delivery retry"
        constraints = [
            models.UniqueConstraint(
                fields=["project", "seq", "subscriber"], name="deepwork_retry_event_retry_key"
            )
        ]
        indexes = [
            models.Index(fields=["parked", "retry_at"], name="deepwork_retry_event_due"),
        ]

    def __str__(self) -> str:
        return f"{self.project_id}:{self.seq} to {self.subscriber}"


__all__ = [
    "Attempt",
    "Event",
    "EventRetry",
    "IdempotencyRecord",
    "OutboxEntry",
    "Project",
    "Task",
    "TaskDependency",
]
