"""The Django admin of the storage, through Django's test client: the retry and dry-run
actions with their intermediate page, per-task results, idempotency and permissions."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings
from django_support import PREFIX

from deepwork_retry import ExecutorService, RetryBudget, TaskError
from deepwork_retry.web.django import models
from deepwork_retry.web.django.storage import DjangoStorage

CHANGELIST = "/admin/deepwork_retry/task/"
PASSWORD = "not-a-real-password"


@pytest.fixture(autouse=True)
def _admin_on(alias: str) -> Iterator[None]:
    """The admin shows the storage on ``alias``; users live in the default database."""
    User.objects.all().delete()
    with override_settings(DEEPWORK_RETRY={"PREFIX": PREFIX, "DATABASE": alias}):
        yield


def user(name: str, *, staff: bool = True, perms: tuple[str, ...] = ("change_task",)) -> User:
    created = User.objects.create_user(name, password=PASSWORD, is_staff=staff)
    for codename in perms:
        created.user_permissions.add(
            Permission.objects.get(content_type__app_label="deepwork_retry", codename=codename)
        )
    return created


def logged_in(
    name: str, *, staff: bool = True, perms: tuple[str, ...] = ("change_task",)
) -> Client:
    user(name, staff=staff, perms=perms)
    client = Client()
    assert client.login(username=name, password=PASSWORD)
    return client


def tasks(storage: DjangoStorage) -> dict[str, int]:
    """Project ``p``: ``b1``, ``b2`` blocked, ``fresh`` in the inbox; their row keys."""
    executor = ExecutorService(storage)
    executor.create_project("p")
    for tid in ("b1", "b2"):
        executor.add_task("p", tid, max_retries=0)
        executor.assign("p", tid)
        executor.start("p", tid, token=1)
        executor.fail("p", tid, 1, TaskError(type="Timeout", message="timed out"))
    executor.add_task("p", "fresh")
    rows = models.Task.objects.using(storage.using).filter(project_id="p")
    return dict(rows.values_list("task_id", "pk"))


def run_action(client: Client, action: str, pks: list[int], **form: str) -> str:
    """Choose ``action`` for ``pks``, then send the intermediate page's form; the result page."""
    page = client.post(CHANGELIST, {"action": action, "_selected_action": pks})
    assert 200 == page.status_code
    html = page.content.decode()
    assert 'name="budget"' in html
    assert 'name="reason"' in html
    submission = re.search(r'name="submission" value="([0-9a-f]+)"', html)
    assert submission is not None
    data = {
        "action": action,
        "_selected_action": pks,
        "apply": "yes",
        "budget": "one_more",
        "reason": "",
        "submission": submission.group(1),
        **form,
    }
    done = client.post(CHANGELIST, data)
    assert 200 == done.status_code
    return str(done.content.decode())


def rows(html: str) -> dict[str, tuple[str, str]]:
    """The result table: task id -> (result, detail)."""
    found = re.findall(
        r"<tr class=\"\w+\">\s*<td>[^<]*</td><td>([^<]*)</td>"
        r"\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>",
        html,
    )
    return {tid: (result, detail) for tid, result, detail in found}


def test_staff_sees_the_tasks(storage: DjangoStorage) -> None:
    """A staff user with the change permission lists the tasks and opens one, read-only."""
    pks = tasks(storage)
    client = logged_in("staff")
    listing = client.get(CHANGELIST)
    assert 200 == listing.status_code
    assert "b1" in listing.content.decode()
    assert "fresh" in listing.content.decode()
    page = client.get(f"{CHANGELIST}{pks['b1']}/change/")
    assert 200 == page.status_code
    assert 'name="status"' not in page.content.decode()  # nothing to edit
    assert "timed out" in page.content.decode()


def test_dry_run_reports_each_task_and_changes_nothing(storage: DjangoStorage) -> None:
    """The dry run says which tasks would be retried and why the others would not."""
    pks = tasks(storage)
    before = storage.list_tasks("p")
    html = run_action(logged_in("staff"), "dry_run_retry", list(pks.values()))
    found = rows(html)
    assert "would retry" == found["b1"][0] == found["b2"][0]
    assert "refused" == found["fresh"][0]
    assert "inbox" in found["fresh"][1]
    assert before == storage.list_tasks("p")


def test_retry_goes_through_the_service_and_reports_each_task(storage: DjangoStorage) -> None:
    """Retry selected retries the blocked tasks with the budget, reason and actor given,
    refuses the others with the rule's reason, and a second post retries nothing again."""
    pks = tasks(storage)
    client = logged_in("alice")
    html = run_action(client, "retry_selected", list(pks.values()), budget="full", reason="fixed")
    found = rows(html)
    assert ("retried", "retried", "refused") == (found["b1"][0], found["b2"][0], found["fresh"][0])
    assert "attempt 2" in found["b1"][1]
    _, task = storage.load("p", "b1")
    assert ("assigned", 1, 0) == (task.status.value, task.retry_count, task.retries_left)
    last = storage.attempts("p", "b1")[-1]
    assert ("alice", "fixed", RetryBudget.FULL) == (last.actor, last.reason, last.budget)
    assert "inbox" == storage.load("p", "fresh")[1].status.value


def test_the_same_form_sent_twice_retries_once(storage: DjangoStorage) -> None:
    """The form's idempotency keys make a repeated post retry nothing a second time."""
    pks = tasks(storage)
    client = logged_in("alice")
    page = client.post(CHANGELIST, {"action": "retry_selected", "_selected_action": [pks["b1"]]})
    submission = re.search(r'name="submission" value="([0-9a-f]+)"', page.content.decode())
    assert submission is not None
    data = {
        "action": "retry_selected",
        "_selected_action": [pks["b1"]],
        "apply": "yes",
        "budget": "one_more",
        "submission": submission.group(1),
    }
    first = rows(client.post(CHANGELIST, data).content.decode())
    again = rows(client.post(CHANGELIST, data).content.decode())
    assert "retried" == first["b1"][0]
    assert ("refused", "retried already when this form was first sent") == again["b1"]
    assert 1 == storage.load("p", "b1")[1].retry_count


def test_a_bad_budget_is_asked_again(storage: DjangoStorage) -> None:
    """An unknown budget shows the form again with its error; nothing is retried."""
    pks = tasks(storage)
    html = run_action(logged_in("staff"), "retry_selected", [pks["b1"]], budget="forever")
    assert "Select a valid choice" in html
    assert "blocked" == storage.load("p", "b1")[1].status.value


def test_without_staff_or_permission_the_actions_are_refused(storage: DjangoStorage) -> None:
    """A user who is not staff is sent to the login page; a staff user with only the view
    permission cannot run the action; the task stays blocked either way."""
    pks = tasks(storage)
    outsider = logged_in("outsider", staff=False)
    refused = outsider.post(
        CHANGELIST, {"action": "retry_selected", "_selected_action": [pks["b1"]]}
    )
    assert 302 == refused.status_code
    assert "/admin/login/" in refused["Location"]
    viewer = logged_in("viewer", perms=("view_task",))
    assert 200 == viewer.get(CHANGELIST).status_code
    data = {
        "action": "retry_selected",
        "_selected_action": [pks["b1"]],
        "apply": "yes",
        "budget": "one_more",
        "submission": "0" * 32,
    }
    answer = viewer.post(CHANGELIST, data)
    assert "Retry selected" not in viewer.get(CHANGELIST).content.decode()
    assert 200 == answer.status_code  # the list again: no such action for this user
    assert "blocked" == storage.load("p", "b1")[1].status.value


def test_csrf_is_enforced(storage: DjangoStorage) -> None:
    """A post without Django's CSRF token is refused, as for any admin form."""
    pks = tasks(storage)
    user("staff")
    client = Client(enforce_csrf_checks=True)
    assert client.login(username="staff", password=PASSWORD)
    data = {"action": "retry_selected", "_selected_action": [pks["b1"]], "apply": "yes",
            "budget": "one_more", "submission": "0" * 32}  # fmt: skip
    assert 403 == client.post(CHANGELIST, data).status_code
    assert "blocked" == storage.load("p", "b1")[1].status.value


# -- lifecycle events ------------------------------------------------------------------


def parked_deliveries(storage: DjangoStorage) -> None:
    """Project ``p``'s first two events, each parked for ``hook``; the second also due
    again for ``web`` (not parked)."""
    from datetime import timedelta

    from deepwork_retry._core.events import EventRetry

    tasks(storage)
    now = ExecutorService(storage).clock.now()
    events = storage.claim_events(now=now, limit=2, claimed_until=now + timedelta(seconds=30))
    failures = [
        EventRetry(event=e, subscriber="hook", tries=5, retry_at=now, parked=True, last_error="x")
        for e in events
    ]
    failures.append(
        EventRetry(event=events[1], subscriber="web", tries=1, retry_at=now, last_error="503")
    )
    storage.settle_events(events, now=now, failures=failures)


def test_events_are_listed_read_only(storage: DjangoStorage) -> None:
    tasks(storage)
    client = logged_in("ann", perms=("view_event",))
    page = client.get("/admin/deepwork_retry/event/?type__exact=task.blocked")
    assert 200 == page.status_code
    shown = re.findall(r'<td class="field-type">([^<]*)</td>', page.content.decode())
    assert shown == ["task.blocked", "task.blocked"]  # b1's and b2's
    row = models.Event.objects.using(storage.using).order_by("seq").first()
    assert row is not None
    detail = client.get(f"/admin/deepwork_retry/event/{row.pk}/change/")
    assert 200 == detail.status_code
    assert 'name="_save"' not in detail.content.decode()
    assert 403 == client.post(f"/admin/deepwork_retry/event/{row.pk}/delete/").status_code


def test_replaying_parked_deliveries(storage: DjangoStorage) -> None:
    parked_deliveries(storage)
    retries = models.EventRetry.objects.using(storage.using)
    pks = list(retries.filter(seq=2).values_list("pk", flat=True))  # hook (parked), web
    client = logged_in("ann", perms=("view_eventretry", "change_eventretry"))
    done = client.post(
        "/admin/deepwork_retry/eventretry/",
        {"action": "replay_parked", "_selected_action": pks},
        follow=True,
    )
    assert 200 == done.status_code
    assert "1 parked deliveries are due again." in done.content.decode()
    assert [(r.event.seq, r.subscriber) for r in storage.parked_events()] == [(1, "hook")]
    replayed = retries.get(seq=2, subscriber="hook")
    assert (replayed.parked, replayed.tries) == (False, 0)
    assert retries.get(seq=2, subscriber="web").tries == 1  # not parked: left as it was


def test_replaying_needs_the_change_permission(storage: DjangoStorage) -> None:
    parked_deliveries(storage)
    pks = list(models.EventRetry.objects.using(storage.using).values_list("pk", flat=True))
    client = logged_in("bob", perms=("view_eventretry",))
    client.post(
        "/admin/deepwork_retry/eventretry/",
        {"action": "replay_parked", "_selected_action": pks},
        follow=True,
    )
    assert len(storage.parked_events()) == 2
