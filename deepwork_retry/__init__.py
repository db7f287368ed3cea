"""deepwork_retry: a task-retry core with manual retries, outbox dispatch and adapters.

Importing this package imports no web framework, database driver or queue
client; those live in the adapter modules and their extras.
"""

from __future__ import annotations

from deepwork_retry._async.services import (
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncPruner,
    AsyncReaper,
    AsyncRetryService,
)
from deepwork_retry._core.machine import PROJECT_RULES, TRANSITIONS, RetryCheck, can_retry
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    ProjectSummary,
    Task,
)
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan
from deepwork_retry._core.policy import (
    Block,
    ExponentialBackoff,
    FixedBackoff,
    NoBackoff,
    RetryAt,
    RetryPolicy,
    TaskError,
)
from deepwork_retry._core.results import (
    BulkItem,
    BulkResult,
    ChangeResult,
    DispatchOutcome,
    RetryResult,
)
from deepwork_retry._core.retention import Pruned, PruneRule, Retention
from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskEvent,
    TaskStatus,
    Trigger,
)
from deepwork_retry._sync.services import (
    ExecutorService,
    OutboxRelay,
    Pruner,
    Reaper,
    RetryService,
)
from deepwork_retry.exceptions import (
    ConfigurationError,
    DeepworkError,
    InvalidTransition,
    OverviewNotKept,
    ProjectNotFound,
    ProjectNotRunnable,
    StaleAttempt,
    StorageNotOpen,
    StorageUnavailable,
    TaskNotBlocked,
    TaskNotFound,
)
from deepwork_retry.ports import (
    AsyncDispatcher,
    AsyncJoinsHostTransaction,
    AsyncProjectOverview,
    AsyncStorage,
    Clock,
    Dispatcher,
    JoinsHostTransaction,
    ProjectOverview,
    Storage,
    SystemClock,
)

__version__ = "0.1.0"

__all__ = [
    # services
    "RetryService",
    "AsyncRetryService",
    "ExecutorService",
    "AsyncExecutorService",
    "OutboxRelay",
    "AsyncOutboxRelay",
    "Reaper",
    "AsyncReaper",
    "Pruner",
    "AsyncPruner",
    # values
    "Project",
    "Task",
    "Attempt",
    "DispatchEntry",
    "Progress",
    "ProjectSummary",
    "IdempotencyRecord",
    "Plan",
    "ProjectPlan",
    "Applied",
    "RetryResult",
    "ChangeResult",
    "DispatchOutcome",
    "BulkItem",
    "BulkResult",
    "RetryCheck",
    # vocabularies
    "TaskStatus",
    "ProjectStatus",
    "TaskEvent",
    "Trigger",
    "RetryBudget",
    "Outcome",
    "BlockedReason",
    "DispatchState",
    # rules
    "TRANSITIONS",
    "PROJECT_RULES",
    "can_retry",
    "RetryPolicy",
    "ExponentialBackoff",
    "FixedBackoff",
    "NoBackoff",
    "RetryAt",
    "Block",
    "TaskError",
    "Retention",
    "PruneRule",
    "Pruned",
    # ports
    "Storage",
    "AsyncStorage",
    "Dispatcher",
    "AsyncDispatcher",
    "JoinsHostTransaction",
    "AsyncJoinsHostTransaction",
    "ProjectOverview",
    "AsyncProjectOverview",
    "Clock",
    "SystemClock",
    # errors
    "ConfigurationError",
    "DeepworkError",
    "InvalidTransition",
    "TaskNotBlocked",
    "ProjectNotFound",
    "TaskNotFound",
    "ProjectNotRunnable",
    "OverviewNotKept",
    "StaleAttempt",
    "StorageNotOpen",
    "StorageUnavailable",
    "__version__",
]
