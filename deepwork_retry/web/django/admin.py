"""The Django admin of the retry storage: projects, tasks and attempts, and retry actions.

Every row is shown read-only: a row changes only through the services, which
apply the core's rules (editing a status or a counter here would bypass them).
On tasks, two actions ask for a retry budget and a reason on an intermediate
page, then run through :class:`~deepwork_retry.RetryService` and report each
task's result:

- **Retry selected**: each task is retried by ``RetryService.retry`` (the
  person's username as the actor), under an idempotency key made for the
  submitted form, so posting the same form twice retries nothing twice;
- **Dry run retry**: ``RetryService.can_retry`` for each task; nothing changes.

Both need a staff user with the change permission on tasks. The service is
:func:`admin_service`'s (see its docstring for the settings it reads).

Lifecycle events are listed read-only by project, type and number; failed
event deliveries (to retry, or parked after their last try) are listed with
a **Replay selected parked deliveries** action (change permission on them),
which makes the parked ones due again with their tries reset.
"""

from __future__ import annotations

import uuid
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html, format_html_join
from django.utils.module_loading import import_string

from deepwork_retry._core.states import RetryBudget
from deepwork_retry._sync.services import RetryService
from deepwork_retry.exceptions import DeepworkError, IdempotencyConflict
from deepwork_retry.web.django import SETTING, get_api, models
from deepwork_retry.web.django.storage import DjangoStorage

__all__ = [
    "AttemptAdmin",
    "EventAdmin",
    "EventRetryAdmin",
    "ProjectAdmin",
    "RetryForm",
    "TaskAdmin",
    "admin_service",
]

_REASON_LENGTH = 1000


class _SentBefore(Exception):
    """This form's retry of the task was made already (the form was sent twice)."""


def _options() -> dict[str, Any]:
    options = getattr(settings, SETTING, None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"settings.{SETTING} must be a dict")
    return options


def admin_service() -> RetryService:
    """The retry service the admin's actions run through.

    In this order: ``DEEPWORK_RETRY["ADMIN_SERVICE"]`` (a ``RetryService``, a
    dotted path to one, or a callable returning one); the service of the
    served API (``DEEPWORK_RETRY["API"]`` or :func:`~deepwork_retry.web.django.mount`)
    when its storage is a :class:`DjangoStorage`; else a ``RetryService`` over
    ``DjangoStorage(using=DEEPWORK_RETRY.get("DATABASE", "default"))``, without
    a dispatcher (the outbox relay delivers). The service's storage must be a
    ``DjangoStorage``: the admin shows that storage's rows.
    """
    target = _options().get("ADMIN_SERVICE")
    if target is not None:
        found = import_string(target) if isinstance(target, str) else target
        if not isinstance(found, RetryService) and callable(found):
            found = found()
        if not isinstance(found, RetryService) or not isinstance(found.storage, DjangoStorage):
            raise ImproperlyConfigured(
                f"settings.{SETTING}['ADMIN_SERVICE'] must be a RetryService over a "
                "DjangoStorage (or name one, or a callable returning one)"
            )
        return found
    try:
        served = get_api().service
    except ImproperlyConfigured:
        served = None
    if isinstance(served, RetryService) and isinstance(served.storage, DjangoStorage):
        return served
    return RetryService(DjangoStorage(using=_options().get("DATABASE", DEFAULT_DB_ALIAS)))


def _alias() -> str:
    storage = admin_service().storage
    assert isinstance(storage, DjangoStorage)
    return storage.using


class RetryForm(forms.Form):  # type: ignore[misc]  # Django ships no type hints
    """What the retry actions ask for."""

    budget = forms.ChoiceField(
        choices=[
            (RetryBudget.ONE_MORE.value, "One more attempt"),
            (RetryBudget.FULL.value, "The full retry budget again"),
        ],
        initial=RetryBudget.ONE_MORE.value,
        help_text="How many automatic retries the task gets after this one.",
    )
    reason = forms.CharField(
        required=False,
        max_length=_REASON_LENGTH,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Kept in the attempt record.",
    )
    submission = forms.CharField(widget=forms.HiddenInput)
    """Makes the idempotency keys of this form's retries (a form posted twice retries once)."""


class _ReadOnly(admin.ModelAdmin):  # type: ignore[misc]
    """Rows shown, never added, edited or deleted here."""

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).using(_alias())

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.fields] + list(self.readonly_fields)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A row is never saved from a form; the model's change permission still
        # grants the actions (which ask with no row).
        return obj is None and bool(super().has_change_permission(request))


@admin.register(models.Project)
class ProjectAdmin(_ReadOnly):
    ordering = ("id",)
    list_display = ("id", "name", "status", "total", "blocked", "done", "percent")
    list_filter = ("status",)
    search_fields = ("id", "name")

    @admin.display(description="done %")  # type: ignore[untyped-decorator]  # no Django hints
    def percent(self, obj: models.Project) -> int:
        finished = obj.done + obj.skipped
        return 0 if obj.total <= 0 else (100 * finished) // obj.total


@admin.register(models.Attempt)
class AttemptAdmin(_ReadOnly):
    ordering = ("project", "task_id", "number")
    list_display = ("project", "task_id", "number", "trigger", "actor", "outcome", "dispatched_at")
    list_filter = ("trigger", "outcome")
    search_fields = ("task_id", "actor", "reason")


@admin.register(models.Task)
class TaskAdmin(_ReadOnly):
    ordering = ("project", "task_id")
    list_display = (
        "task_id",
        "project",
        "title",
        "status",
        "retry_count",
        "retries_left",
        "attempt",
        "updated_at",
    )
    list_filter = ("status", "project")
    search_fields = ("task_id", "title", "error_message")
    readonly_fields = ("history",)
    actions = ("retry_selected", "dry_run_retry")

    @admin.display(description="attempts")  # type: ignore[untyped-decorator]
    def history(self, obj: models.Task) -> str:
        rows = models.Attempt.objects.using(_alias()).filter(
            project_id=obj.project_id, task_id=obj.task_id
        )
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    a.number,
                    a.trigger,
                    *(v or "" for v in (a.actor, a.reason, a.outcome, a.error_message)),
                )
                for a in rows.order_by("number")
            ),
        )
        table: str = format_html(
            "<table><tr><th>#</th><th>trigger</th><th>actor</th><th>reason</th>"
            "<th>outcome</th><th>error</th></tr>{}</table>",
            body,
        )
        return table

    @admin.action(description="Retry selected tasks", permissions=["change"])  # type: ignore[untyped-decorator]
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse:
        return self._retry(request, queryset, dry_run=False)

    @admin.action(description="Dry run retry of selected tasks", permissions=["change"])  # type: ignore[untyped-decorator]
    def dry_run_retry(self, request: HttpRequest, queryset: QuerySet[Any]) -> HttpResponse:
        return self._retry(request, queryset, dry_run=True)

    def _retry(
        self, request: HttpRequest, queryset: QuerySet[Any], *, dry_run: bool
    ) -> HttpResponse:
        """The intermediate page, then (posted back with ``apply``) each task's result."""
        tasks = list(queryset.order_by("project_id", "task_id"))
        results: list[dict[str, Any]] | None = None
        if request.POST.get("apply"):
            form = RetryForm(request.POST)
            if form.is_valid():
                results = self._run(request, tasks, form.cleaned_data, dry_run=dry_run)
        else:
            form = RetryForm(initial={"submission": uuid.uuid4().hex})
        context = {
            **self.admin_site.each_context(request),
            "title": "Dry run retry" if dry_run else "Retry selected tasks",
            "opts": self.model._meta,
            "queryset": tasks,
            "form": form,
            "dry_run": dry_run,
            "action": "dry_run_retry" if dry_run else "retry_selected",
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "results": results,
            "retried": sum(1 for row in results or () if row["retried"]),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/deepwork_retry/task/retry.html", context)

    def _run(
        self,
        request: HttpRequest,
        tasks: list[models.Task],
        data: dict[str, Any],
        *,
        dry_run: bool,
    ) -> list[dict[str, Any]]:
        service = admin_service()
        actor = request.user.get_username()
        reason = data["reason"] or None
        results = []
        for task in tasks:
            pid, tid = task.project_id, task.task_id
            row: dict[str, Any] = {"project_id": pid, "task_id": tid}
            try:
                if dry_run:
                    check = service.can_retry(pid, tid)
                    row.update(retried=check.allowed, detail=check.reason or "")
                else:
                    key = f"admin:{data['submission']}:{task.pk}"
                    if service.storage.get_idempotency(key, now=service.clock.now()) is not None:
                        raise _SentBefore
                    done = service.retry(
                        pid,
                        tid,
                        actor=actor,
                        reason=reason,
                        budget=data["budget"],
                        idempotency_key=key,
                    )
                    row.update(
                        retried=True,
                        detail=f"attempt {done.task.attempt}, dispatch {done.dispatch.status}",
                    )
            except (_SentBefore, IdempotencyConflict):
                row.update(retried=False, detail="retried already when this form was first sent")
            except DeepworkError as exc:
                row.update(retried=False, detail=exc.detail)
            results.append(row)
        return results


@admin.register(models.Event)
class EventAdmin(_ReadOnly):
    """Lifecycle events, newest first; ``delivered at`` empty: still pending."""

    ordering = ("project", "-seq")
    list_display = ("project", "seq", "type", "task_id", "attempt", "at", "delivered_at")
    list_filter = ("type", "project")
    search_fields = ("task_id",)


@admin.register(models.EventRetry)
class EventRetryAdmin(_ReadOnly):
    """Failed deliveries of events to subscribers; parked ones can be replayed."""

    ordering = ("project", "seq", "subscriber")
    list_display = ("project", "seq", "subscriber", "tries", "retry_at", "parked", "last_error")
    list_filter = ("parked", "subscriber")
    search_fields = ("subscriber", "last_error")
    actions = ("replay_parked",)

    @admin.action(description="Replay selected parked deliveries", permissions=["change"])  # type: ignore[untyped-decorator]
    def replay_parked(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        service = admin_service()
        storage = service.storage
        assert isinstance(storage, DjangoStorage)
        chosen: dict[str, list[str]] = {}
        for row in queryset.filter(parked=True).order_by("subscriber", "project_id", "seq"):
            chosen.setdefault(row.subscriber, []).append(f"{row.project_id}:{row.seq}")
        now = service.clock.now()
        count = sum(
            storage.replay_parked(now=now, subscriber=subscriber, event_ids=ids)
            for subscriber, ids in chosen.items()
        )
        self.message_user(
            request, f"{count} parked deliveries are due again.", level=messages.SUCCESS
        )
