"""Every error the library raises to its callers.

The web API has more of its own, about the HTTP request itself (its route,
method and body, a key still in use, an API the host has not configured);
they live in ``deepwork_retry/web/_http.py``, each with its status and code
in ``ERRORS`` there, and never leave the API, which answers each as an HTTP
response.

One root, :class:`DeepworkError`; each subclass also inherits the builtin it
behaves like (``LookupError`` for a missing row, ``ValueError`` for a bad
argument), so ``except LookupError`` in a host application keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepwork_retry._core.model import IdempotencyRecord


class DeepworkError(Exception):
    """Root of every error raised by deepwork_retry."""

    @property
    def detail(self) -> str:
        """The message shown to API clients (``{"detail": ...}``)."""
        return str(self)


class InvalidInput(DeepworkError, ValueError):
    """An argument does not have the form the library accepts."""


# -- lookups ---------------------------------------------------------------


class NotFound(DeepworkError, LookupError):
    """A project or task does not exist (or is not visible)."""

    def __init__(self, message: str, **ids: str) -> None:
        super().__init__(message)
        self.ids = ids

    def __str__(self) -> str:
        return str(self.args[0])


class ProjectNotFound(NotFound):
    def __init__(self, project_id: str) -> None:
        super().__init__("Project not found", project_id=project_id)
        self.project_id = project_id


class TaskNotFound(NotFound):
    def __init__(self, project_id: str, task_id: str) -> None:
        super().__init__("Task not found", project_id=project_id, task_id=task_id)
        self.project_id = project_id
        self.task_id = task_id


class AlreadyExists(DeepworkError, ValueError):
    """A project or task with this id is stored already."""


# -- state machine -----------------------------------------------------------


class InvalidTransition(DeepworkError, ValueError):
    """The task's state does not allow this event (a failed table lookup)."""

    def __init__(self, task_id: str, status: str, event: str, message: str | None = None) -> None:
        self.task_id = task_id
        self.status = status
        self.event = event
        super().__init__(
            message or f"Task {task_id!r} in status {status!r} does not accept event {event!r}"
        )


class TaskNotBlocked(InvalidTransition):
    """A manual retry of a task that is not ``blocked`` (HTTP 400)."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(
            task_id,
            status,
            "manual_retry",
            f"Can only retry tasks with status 'blocked', got '{status}'",
        )


class ProjectNotRunnable(DeepworkError):
    """The project's status does not accept retries (HTTP 409)."""

    def __init__(self, project_id: str, status: str) -> None:
        self.project_id = project_id
        self.status = status
        super().__init__(f"Cannot retry tasks in a '{status}' project")


class StaleAttempt(DeepworkError, ValueError):
    """An executor reported for an attempt that is no longer current."""

    def __init__(self, task_id: str, token: int, current: int) -> None:
        self.task_id = task_id
        self.token = token
        self.current = current
        super().__init__(
            f"Task {task_id!r}: attempt {token} is not current (current attempt is {current})"
        )


class VersionConflict(DeepworkError):
    """Storage found a different version than the plan expected.

    The services catch it, reload and decide again; it reaches a caller only
    when contention outlasts the service's retry limit.
    """

    def __init__(self, task_id: str, expected: int, found: int | None = None) -> None:
        self.task_id = task_id
        self.expected = expected
        self.found = found
        super().__init__(
            f"Task {task_id!r} changed concurrently (expected version {expected}, found {found})"
        )

    @property
    def detail(self) -> str:
        return "The task is busy; try again shortly"


class IdempotencyConflict(DeepworkError):
    """The idempotency key was recorded already, by this or another request."""

    def __init__(self, record: IdempotencyRecord) -> None:
        self.record = record
        super().__init__(f"Idempotency key {record.key!r} was used already")


class IdempotencyKeyReused(DeepworkError, ValueError):
    """The same idempotency key was sent for a different request (HTTP 422)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            "Idempotency-Key was already used for a different request; "
            "send a new key for a new request"
        )


# -- storage -------------------------------------------------------------------


STORAGE_DETAIL = "Storage is unavailable; try again later"
"""What clients are told of any storage failure; the message, for the logs, says more."""


class StorageError(DeepworkError):
    """Storage failed in a way the caller cannot fix by changing the request.

    Its message names what failed (a path, a host, the driver's words) for
    the logs; its :attr:`detail`, what API clients see, is always
    :data:`STORAGE_DETAIL`.
    """

    @property
    def detail(self) -> str:
        return STORAGE_DETAIL


class StorageUnavailable(StorageError, ConnectionError):
    """Storage cannot be reached or timed out; nothing was changed (HTTP 503)."""

    def __init__(self, message: str = "Storage is unavailable", *, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class StorageMissing(StorageUnavailable):
    """The database or schema does not exist, or lacks migrations, and the storage
    was opened without leave to create it (``create=False``, ``read_only=True``,
    :func:`~deepwork_retry.storage.postgres.check_migrated`). Nothing was created;
    ``deepwork-retry migrate`` creates it."""


class StorageNotOpen(StorageUnavailable):
    """A storage with an open step was used before it (HTTP 503, and an ERROR in the log).

    Nothing was changed. The message names the missing step, so that a setup
    mistake is not mistaken for an outage.
    """

    def __init__(self, storage: str, step: str) -> None:
        self.storage = storage
        self.step = step
        super().__init__(
            f"{storage} was not opened: call `{step}` (in your application's startup or "
            "lifespan) before serving requests"
        )


class StorageCorrupt(StorageError):
    """The stored data is not a deepwork_retry database, or is damaged."""


class StorageReadOnly(StorageError, PermissionError):
    """Storage can be read but not written."""


class OverviewNotKept(DeepworkError):
    """The storage has no cross-project reads (it is not a
    :class:`~deepwork_retry.ports.ProjectOverview`), so there is no overview to
    list (HTTP 501)."""

    def __init__(self, storage: str = "This server's storage") -> None:
        self.storage = storage
        super().__init__(f"{storage} offers no listing across projects")

    @property
    def detail(self) -> str:
        return "This server's storage offers no listing across projects"


# -- wiring --------------------------------------------------------------------------


class ConfigurationError(DeepworkError, TypeError):
    """Parts put together that cannot work together, such as a sync storage in an
    async service; raised when they are put together, naming what to use instead."""


# -- dispatch --------------------------------------------------------------------


class DispatchError(DeepworkError):
    """A dispatcher could not hand work to its executor."""


# -- web ---------------------------------------------------------------------------


class NotAuthenticated(DeepworkError):
    """No usable ``Authorization: Bearer`` header (HTTP 401)."""

    def __init__(self, message: str = "Not authenticated") -> None:
        super().__init__(message)


class InvalidToken(NotAuthenticated):
    """The bearer token is not valid (HTTP 401)."""

    def __init__(self) -> None:
        super().__init__("Invalid token")


def missing_extra(
    extra: str, module: str, exc: ImportError, *, needs: str | None = None
) -> ImportError:
    """An ImportError that names the extra to install.

    ``needs`` says what is missing when it is not the module ``exc`` names
    (a package that is installed but cannot load a library of its own).
    """
    what = needs if needs is not None else f"the optional dependency {exc.name!r}"
    err = ImportError(
        f"{module} needs {what}; install it with: pip install 'deepwork-retry[{extra}]'"
    )
    err.name = exc.name
    return err


__all__ = [
    "STORAGE_DETAIL",
    "AlreadyExists",
    "ConfigurationError",
    "DeepworkError",
    "DispatchError",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "InvalidInput",
    "InvalidToken",
    "InvalidTransition",
    "NotAuthenticated",
    "NotFound",
    "OverviewNotKept",
    "ProjectNotFound",
    "ProjectNotRunnable",
    "StaleAttempt",
    "StorageCorrupt",
    "StorageError",
    "StorageMissing",
    "StorageNotOpen",
    "StorageReadOnly",
    "StorageUnavailable",
    "TaskNotBlocked",
    "TaskNotFound",
    "VersionConflict",
    "missing_extra",
]
