"""Signed webhooks: the signature a receiver checks, POSTs to a real local receiver,
and failed deliveries retried, parked and replayed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from webhook_receiver import receiving

from deepwork_retry.events import Event, EventType
from deepwork_retry.exceptions import DeepworkError, InvalidInput
from deepwork_retry.webhooks import (
    Webhook,
    WebhookDeliveryError,
    WebhookSignatureError,
    sign,
    signature_header,
    verify,
)

SECRET = "whsec-test-3f9a1c"
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def blocked(seq: int = 1, task: str = "t1", project: str = "p1") -> Event:
    return Event(
        project_id=project,
        seq=seq,
        type=EventType.TASK_BLOCKED,
        task_id=task,
        attempt=3,
        at=AT,
        data={"reason": "budget_exhausted", "retries_exhausted": True, "error_message": "boom"},
    )


# -- the signature ----------------------------------------------------------------------

secrets_ = st.text(min_size=1, max_size=40)
bodies = st.binary(max_size=300).map(lambda b: json.dumps({"x": b.hex()}).encode())

_values = st.one_of(
    st.text(max_size=70),
    st.integers(0, 10**500).map(str),
    st.text(alphabet="0123456789abcdef", max_size=70),
    st.sampled_from(["100", "9" * 400, "1" * 5000, "\uff11\uff10\uff10",
                     "\u0661\u0660\u0660", "é" * 64, "é", sign(b"{}", SECRET, 100)]),
)  # fmt: skip
_fields = st.tuples(st.one_of(st.sampled_from(["t", "v1", "v2"]), st.text(max_size=3)), _values)
headers = st.one_of(
    st.text(max_size=200),
    st.lists(_fields.map("=".join), max_size=5).map(",".join),
)
"""Header text a sender might send: anything, and fields ``key=value`` of hostile values."""


@given(body=bodies, secret=secrets_, stamp=st.integers(0, 2**40))
def test_a_signed_body_verifies_and_any_altered_byte_does_not(
    body: bytes, secret: str, stamp: int
) -> None:
    """What :func:`signature_header` signs, :func:`verify` accepts at that time, and
    refuses once any one byte of the body changed."""
    header = signature_header(body, secret, timestamp=stamp)
    assert json.loads(body) == verify(body, header, secret, now=stamp)
    for i in range(len(body)):
        altered = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        with pytest.raises(WebhookSignatureError):
            verify(altered, header, secret, now=stamp)


@given(secret=secrets_, other=secrets_, stamp=st.integers(0, 2**40))
def test_another_secret_does_not_verify(secret: str, other: str, stamp: int) -> None:
    body = b'{"id":"p:1"}'
    header = signature_header(body, secret, timestamp=stamp)
    if other != secret:
        with pytest.raises(WebhookSignatureError, match="does not match"):
            verify(body, header, other, now=stamp)


@given(skew=st.integers(-10_000, 10_000), tolerance=st.integers(0, 1000))
def test_the_timestamp_must_be_within_the_tolerance_either_way(skew: int, tolerance: int) -> None:
    """A request signed ``skew`` seconds before the receiver's clock (or after it) is
    accepted exactly when ``|skew| <= tolerance``: a replayed request is refused."""
    body = b'{"id":"p:1"}'
    now = 1_800_000_000
    header = signature_header(body, SECRET, timestamp=now - skew)
    if abs(skew) <= tolerance:
        assert {"id": "p:1"} == verify(body, header, SECRET, now=now, tolerance=tolerance)
    else:
        with pytest.raises(WebhookSignatureError, match="tolerance"):
            verify(body, header, SECRET, now=now, tolerance=tolerance)


def test_rotation_signs_with_every_secret_and_either_verifies() -> None:
    """During a rotation each request carries one v1 per secret; a receiver that knows
    the old secret only, or the new one only, or both, accepts it."""
    body = b'{"id":"p:1"}'
    header = signature_header(body, ["new-secret", "old-secret"], timestamp=100)
    assert 2 == header.count("v1=")
    for known in ("new-secret", "old-secret", ["old-secret", "new-secret"]):
        assert {"id": "p:1"} == verify(body, header, known, now=100)
    with pytest.raises(WebhookSignatureError):
        verify(body, header, "third-secret", now=100)


@pytest.mark.parametrize(
    "header",
    [None, "", "garbage", "t=100", "v1=abc", "t=abc,v1=00", "t=100,t=101,v1=00", "t=-100,v1=00"],
)
def test_a_missing_or_malformed_header_is_refused(header: str | None) -> None:
    with pytest.raises(WebhookSignatureError):
        verify(b"{}", header, SECRET, now=100)


def test_the_signature_error_is_the_packages_own() -> None:
    assert issubclass(WebhookSignatureError, DeepworkError)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    """The documented recipe, computed here with hmac directly, is what is sent."""
    import hashlib
    import hmac

    body = b'{"a":1}'
    want = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert want == sign(body, SECRET, 1700000000)
    assert f"t=1700000000,v1={want}" == signature_header(body, SECRET, timestamp=1700000000)


# -- the webhook against a real receiver ------------------------------------------------


def test_a_webhook_posts_the_event_signed_and_the_receiver_verifies_it() -> None:
    with receiving(SECRET) as receiver:
        Webhook(receiver.url, SECRET)(blocked())
        assert ["p1:1"] == receiver.accepted_ids
        body, headers = receiver.requests[0]
        assert blocked().dumps().encode() == body
        assert ("p1:1", "task.blocked", "application/json") == (
            headers["Deepwork-Event-Id"],
            headers["Deepwork-Event-Type"],
            headers["Content-Type"],
        )
        assert blocked().to_json() == receiver.accepted[0]


def test_the_receiver_refuses_a_replayed_request() -> None:
    """The same request (body and signature) sent again after the tolerance is refused."""
    with receiving(SECRET) as receiver:
        Webhook(receiver.url, SECRET)(blocked())
        body, headers = receiver.requests[0]
        receiver.now = time.time() + 301
        assert 400 == receiver.handle(body, headers)
        assert ["p1:1"] == receiver.accepted_ids
        assert "tolerance" in receiver.refused[-1]


def test_the_receiver_refuses_an_altered_body_and_the_webhook_fails() -> None:
    """A body altered on the way does not verify: the receiver answers 400, which
    is a failed delivery for the webhook."""
    with receiving(SECRET) as receiver:
        Webhook(receiver.url, SECRET)(blocked())
        body, headers = receiver.requests[0]
        altered = body.replace(b'"boom"', b'"fine"')
        assert altered != body
        assert 400 == receiver.handle(altered, headers)
        with pytest.raises(WebhookDeliveryError, match="HTTP 400"):
            Webhook(receiver.url, "not-the-secret")(blocked(seq=2))
        assert ["p1:1"] == receiver.accepted_ids


def test_a_failing_answer_or_no_receiver_is_a_delivery_error_without_the_secret() -> None:
    with receiving(SECRET) as receiver:
        receiver.fail_next = 1
        hook = Webhook(receiver.url, SECRET)
        with pytest.raises(WebhookDeliveryError, match="HTTP 500") as failed:
            hook(blocked())
        assert SECRET not in str(failed.value)
        assert SECRET not in repr(hook)
        hook(blocked())
        assert ["p1:1"] == receiver.accepted_ids
        url = receiver.url
    with pytest.raises(WebhookDeliveryError, match="unreachable"):
        Webhook(url, SECRET, timeout=5)(blocked())


def test_a_redirect_is_a_failure_not_followed() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(307)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(WebhookDeliveryError, match="HTTP 307"):
            Webhook(f"http://127.0.0.1:{server.server_address[1]}/in", SECRET)(blocked())
    finally:
        server.shutdown()
        server.server_close()
    assert ["/in"] == hits


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "file:///etc/passwd", "example.com/hook", "javascript:alert(1)",
     "http:///nohost", ""],
)  # fmt: skip
def test_only_http_and_https_urls_are_accepted(url: str) -> None:
    with pytest.raises(InvalidInput, match="webhook URL"):
        Webhook(url, SECRET)


def test_names_and_messages_never_show_the_query() -> None:
    hook = Webhook("https://example.com:8443/in?token=tk-456", SECRET)
    assert "webhook:https://example.com:8443/in" == hook.subscriber
    shown = repr(hook)
    assert [] == [s for s in ("pw-123", "tk-456", SECRET) if s in shown]


def test_a_webhook_sends_only_its_types() -> None:
    with receiving(SECRET) as receiver:
        hook = Webhook(receiver.url, SECRET, types=[EventType.TASK_RETRIED])
        hook(blocked())
        assert [] == receiver.requests
    with pytest.raises(InvalidInput):
        Webhook("https://example.com", SECRET, types=["task.nope"])
    with pytest.raises(InvalidInput):
        Webhook("https://example.com", "")


# -- the receiver's snippet in docs/events.md -------------------------------------------


def docs_receiver() -> Callable[..., dict[str, Any]]:
    page = (Path(__file__).resolve().parent.parent / "docs" / "events.md").read_text()
    code = page.split("<!-- receiver-snippet -->", 1)[1].split("```python\n", 1)[1]
    namespace: dict[str, Any] = {}
    exec(code.split("```", 1)[0], namespace)
    fn: Callable[..., dict[str, Any]] = namespace["verify_deepwork"]
    return fn


def test_the_pages_stdlib_receiver_verifies_a_real_request_and_refuses_bad_ones() -> None:
    """The few lines of standard library in docs/events.md accept what a Webhook sent,
    under either secret of a rotation, and refuse an altered body and a replay."""
    check = docs_receiver()
    with receiving(["new", "old"]) as receiver:
        Webhook(receiver.url, ["new", "old"])(blocked())
        body, headers = receiver.requests[0]
    header = headers["Deepwork-Signature"]
    assert blocked().to_json() == check(body, header, "old")
    assert blocked().to_json() == check(body, header, "new")
    with pytest.raises(ValueError, match="bad signature"):
        check(body.replace(b"boom", b"fine"), header, "new")
    with pytest.raises(ValueError, match="bad signature"):
        check(body, header, "other")
    stamp = int(header.split(",")[0][2:])
    old = signature_header(body, "new", timestamp=stamp - 301)
    with pytest.raises(ValueError, match="replayed"):
        check(body, old, "new")


@given(header=headers)
def test_the_pages_stdlib_receiver_refuses_any_bad_header_with_a_value_error(
    header: str,
) -> None:
    """The page's receiver meets a hostile header with ValueError only: no StopIteration,
    TypeError, OverflowError, and no non-ASCII digits taken for a timestamp."""
    check = docs_receiver()
    with pytest.raises(ValueError, match=r"malformed|replayed|bad signature"):
        check(b"{}", header, SECRET)


@pytest.mark.parametrize(
    "header",
    ["v1=" + "0" * 64, "t=100,v1=é", "t=" + "9" * 400 + ",v1=00", "t=" + "1" * 5000 + ",v1=00",
     "", "t=1,t=2,v1=00"],
)  # fmt: skip
def test_the_pages_stdlib_receiver_refuses_known_bad_headers(header: str) -> None:
    check = docs_receiver()
    with pytest.raises(ValueError, match=r"malformed|replayed|bad signature"):
        check(b"{}", header, SECRET)
    stamp = int(time.time())
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in str(stamp))
    good = signature_header(b"{}", SECRET, timestamp=stamp)
    with pytest.raises(ValueError, match="malformed"):
        check(b"{}", good.replace(f"t={stamp}", f"t={fullwidth}"), SECRET)


# -- through the event relay: retried, parked, replayed ---------------------------------


def test_a_failing_receiver_is_retried_then_parked_then_replayed_and_delivered() -> None:
    """The receiver answers 500 to the first tries: the relay retries with backoff,
    parks the delivery after max_tries, and once replayed the receiver gets it; every
    other event got through at once and nothing arrived twice."""
    from deepwork_retry import ExecutorService, NoBackoff, RetryPolicy, TaskError
    from deepwork_retry.events import EventRelay, Hooks
    from deepwork_retry.storage.memory import MemoryStorage
    from deepwork_retry.testing.doubles import FakeClock

    clock = FakeClock()
    storage = MemoryStorage()
    ex = ExecutorService(storage, policy=RetryPolicy(backoff=NoBackoff()), clock=clock)
    ex.create_project("p")
    ex.add_task("p", "t1", max_retries=0)
    ex.assign("p", "t1")
    ex.start("p", "t1", 1)
    ex.fail("p", "t1", 1, TaskError(type="Boom", message="boom"))
    events = storage.events("p")
    blocked_ids = [e.id for e in events if e.type is EventType.TASK_BLOCKED]
    assert 1 == len(blocked_ids)
    with receiving(SECRET) as receiver:
        hooks = Hooks()
        hooks.add(Webhook(receiver.url, SECRET, types=["task.blocked"], max_tries=3))
        relay = EventRelay(storage, hooks, clock=clock)
        receiver.fail_next = 10
        relay.run_once()
        for _ in range(5):
            clock.advance(4000)
            relay.run_once()
        assert blocked_ids * 3 == receiver.failed
        parked = storage.parked_events()
        assert [(blocked_ids[0], f"webhook:{receiver.url}", 3)] == [
            (r.event.id, r.subscriber, r.tries) for r in parked
        ]
        assert "HTTP 500" in (parked[0].last_error or "")
        assert SECRET not in (parked[0].last_error or "")
        receiver.fail_next = 0
        assert 1 == storage.replay_parked(now=clock.now(), event_ids=blocked_ids)
        relay.run_once()
        assert blocked_ids == receiver.accepted_ids
        assert [] == storage.parked_events()
        relay.run_once()
        assert blocked_ids == receiver.accepted_ids


# -- what a sender may put in the header: a result or WebhookSignatureError, never a crash


@pytest.mark.parametrize(
    "header",
    [
        "t=" + "9" * 400 + ",v1=" + "0" * 64,  # OverflowError against a float clock
        "t=" + "1" * 5000 + ",v1=" + "0" * 64,  # int() digit limit: ValueError
        "t=\uff11\uff10\uff10,v1=" + "0" * 64,  # fullwidth digits, which int() takes
        "t=\u0661\u0660\u0660,v1=" + "0" * 64,  # Arabic-Indic digits
        "t=100,v1=é",  # non-ASCII signature: TypeError in compare_digest
        "t=100,v1=" + "é" * 64,
        "v1=" + "0" * 64,  # no timestamp
        "t=100,t=100,v1=" + "0" * 64,  # two timestamps
        "t=,v1=" + "0" * 64,
        "t= 100,v1=" + "0" * 64,
        "t=100\n,v1=" + "0" * 64,
        "",
        ",",
        "=",
        "t=100,v1=",
    ],
)
def test_a_hostile_header_is_only_ever_a_signature_error(header: str) -> None:
    for now in (100, 100.0, None):  # an int clock, a float one, the wall clock
        with pytest.raises(WebhookSignatureError):
            verify(b"{}", header, SECRET, now=now)


@given(header=headers)
def test_any_header_text_gives_a_result_or_a_signature_error(header: str) -> None:
    """Whatever text a sender puts in the header, verify returns the event or raises
    WebhookSignatureError: never another exception."""
    try:
        event = verify(b"{}", header, SECRET, now=100.0)
    except WebhookSignatureError:
        return
    assert {} == event
    assert "t=100" in header


def test_a_timestamp_is_at_most_fifteen_ascii_digits() -> None:
    body = b"{}"
    ok = signature_header(body, SECRET, timestamp=10**15 - 1)
    assert {} == verify(body, ok, SECRET, now=10**15 - 1)
    far = 10**15
    with pytest.raises(WebhookSignatureError, match="timestamp"):
        verify(body, signature_header(body, SECRET, timestamp=far), SECRET, now=far)


# -- URLs refused when the webhook is made; queries never shown --------------------------


@pytest.mark.parametrize(
    "url",
    ["https://example.com/in x", "https://example.com/in\tx", "https://example.com/in\n",
     "https://example.com/in?token=a b", "https://example.com/\x00", "https://example.com/\x7f",
     "https://exa\u200bmple.com/", " https://example.com/", "https://example.com/in\u2028"],
)  # fmt: skip
def test_urls_with_whitespace_or_control_characters_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput, match="whitespace or control"):
        Webhook(url, SECRET)


@pytest.mark.parametrize(
    "url",
    ["https://alice:pw-123@example.com/in?token=tk-456", "https://alice@example.com/in?token=tk-456",
     "https://:pw-123@example.com/in?token=tk-456"],
)  # fmt: skip
def test_urls_with_credentials_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(InvalidInput, match="credentials") as refused:
        Webhook(url, SECRET)
    assert [] == [s for s in ("pw-123", "tk-456", "alice") if s in str(refused.value)]


@pytest.mark.parametrize(
    "url",
    ["https://example.com:99999/in?token=tk-456", "https://[::1/in?token=tk-456",
     "https://example.com/é?token=tk-456", "https://example.com:0/in?token=tk-456"],
)  # fmt: skip
def test_other_bad_urls_are_invalid_input_without_the_query(url: str) -> None:
    with pytest.raises(InvalidInput, match="webhook URL") as refused:
        Webhook(url, SECRET)
    assert "tk-456" not in str(refused.value)


def test_a_delivery_error_never_holds_the_query() -> None:
    """An error raised inside the POST may quote the request's path and query (here
    http.client refusing a control character): the kept text leaves the query out."""
    with receiving(SECRET) as receiver:
        hook = Webhook(receiver.url + "?token=tk-456", SECRET)
        hook(blocked())
        assert ["p1:1"] == receiver.accepted_ids
        hook.url = receiver.url + "/in x?token=tk-456&x=\x01"
        with pytest.raises(WebhookDeliveryError) as failed:
            hook(blocked(seq=2))
    text = str(failed.value)
    assert "unreachable" in text
    assert "tk-456" not in text
    assert [] == [s for s in ("tk-456",) if s in repr(hook)]


def test_the_relay_keeps_and_logs_no_query_of_a_failing_webhook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from deepwork_retry import ExecutorService
    from deepwork_retry.events import EventRelay, Hooks
    from deepwork_retry.storage.memory import MemoryStorage

    storage = MemoryStorage()
    ex = ExecutorService(storage)
    ex.create_project("p")
    ex.add_task("p", "t1")
    assert storage.events("p")
    with receiving(SECRET) as receiver:
        hook = Webhook(receiver.url + "?token=tk-456", SECRET, max_tries=1)
        hook.url = receiver.url + "/in x?token=tk-456"
        hooks = Hooks()
        hooks.add(hook)
        with caplog.at_level("WARNING", logger="deepwork_retry"):
            EventRelay(storage, hooks).run_once()
    parked = storage.parked_events()
    assert parked
    assert "unreachable" in (parked[0].last_error or "")
    assert "tk-456" not in (parked[0].last_error or "")
    assert "unreachable" in caplog.text
    assert "tk-456" not in caplog.text


# -- the relay's message for a storage without the event log ----------------------------


def test_the_relay_says_a_storage_keeps_no_lifecycle_events() -> None:
    from deepwork_retry.events import AsyncEventRelay, EventRelay, Hooks
    from deepwork_retry.exceptions import ConfigurationError

    class NoEvents:
        def apply(self) -> None: ...

    for relay in (EventRelay, AsyncEventRelay):
        with pytest.raises(ConfigurationError) as refused:
            relay(NoEvents(), Hooks())  # type: ignore[arg-type]
        text = str(refused.value)
        assert "NoEvents does not keep them" in text
        assert "EventLog" in text
        assert "claim_events" not in text
