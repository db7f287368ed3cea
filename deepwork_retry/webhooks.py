"""Signed webhooks: a subscriber that POSTs each lifecycle event to a URL.

A :class:`Webhook` is a listener (register it on a
:class:`~deepwork_retry.events.Hooks` with ``hooks.add(webhook)``): the
event relay calls it after the commit, and it POSTs
:meth:`Event.dumps() <deepwork_retry._core.events.Event.dumps>` as JSON with
three headers:

- ``Deepwork-Event-Id``: the event's id (``project_id:seq``), to deduplicate on;
- ``Deepwork-Event-Type``: its type (``task.blocked`` …);
- ``Deepwork-Signature``: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``,
  one ``v1`` per secret while a secret is being rotated.

An answer other than 2xx (a redirect included) or a network error is a
failure: the relay tries again with backoff and parks the delivery after its
limit (``deepwork-retry events parked`` / ``events replay``). A receiver
checks a request with :func:`verify`, which refuses an altered body, a wrong
secret, and a timestamp outside its tolerance (a replayed request).

Only the standard library is used (``urllib.request``); the async relay
runs the POST in a worker thread. Secrets never appear in a repr, a log
record or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from deepwork_retry import __version__
from deepwork_retry._core.events import Event, EventType
from deepwork_retry.exceptions import DeepworkError, InvalidInput

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_TYPE_HEADER",
    "SIGNATURE_HEADER",
    "TOLERANCE",
    "Webhook",
    "WebhookDeliveryError",
    "WebhookSignatureError",
    "sign",
    "signature_header",
    "verify",
]

SIGNATURE_HEADER = "Deepwork-Signature"
EVENT_ID_HEADER = "Deepwork-Event-Id"
EVENT_TYPE_HEADER = "Deepwork-Event-Type"

TOLERANCE = 300
"""Seconds a signature's timestamp may be off the receiver's clock (either way)."""

_READ_LIMIT = 64 * 1024
"""Bytes of a receiver's answer read (and dropped) before the connection is closed."""


class WebhookSignatureError(DeepworkError, ValueError):
    """A webhook request whose signature is missing, malformed, wrong, or too old
    (or too far in the future): refuse the request."""


class WebhookDeliveryError(DeepworkError):
    """A POST that the receiver did not accept (an answer other than 2xx, or a
    network error); the relay retries it."""


def _secrets(secret: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    items = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    keys = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in items]
    if not keys or not all(keys):
        raise InvalidInput("a webhook secret must be a non-empty string")
    return keys


def sign(body: bytes | str, secret: str | bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` under ``secret``."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    key = _secrets(secret)[0]
    return hmac.new(key, f"{int(timestamp)}.".encode("ascii") + data, hashlib.sha256).hexdigest()


def signature_header(
    body: bytes | str, secret: str | bytes | Sequence[str | bytes], *, timestamp: int
) -> str:
    """The ``Deepwork-Signature`` value: ``t=…`` and one ``v1=…`` per secret."""
    parts = [f"t={int(timestamp)}"]
    parts += [f"v1={sign(body, key, timestamp)}" for key in _secrets(secret)]
    return ",".join(parts)


_STAMP_DIGITS = 15
"""At most this many digits in a signature's timestamp (exact as a float, never an overflow)."""

_SIGNATURE = re.compile(r"[0-9a-f]{64}")


def _parse(header: str | None) -> tuple[int, list[bytes]]:
    """The timestamp and the well-formed ``v1`` signatures (as bytes) of a header.

    Anything a sender put in the header either parses or raises
    :class:`WebhookSignatureError`: the timestamp is one to
    :data:`_STAMP_DIGITS` ASCII digits, and a ``v1`` that is not 64 hex
    digits is no signature.
    """
    if not header or not isinstance(header, str):
        raise WebhookSignatureError("missing signature header")
    stamps: list[str] = []
    signatures: list[bytes] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise WebhookSignatureError("malformed signature header")
        if key == "t":
            stamps.append(value)
        elif key == "v1" and _SIGNATURE.fullmatch(value):
            signatures.append(value.encode("ascii"))
    if len(stamps) != 1 or not re.fullmatch(rf"[0-9]{{1,{_STAMP_DIGITS}}}", stamps[0]):
        raise WebhookSignatureError("signature header needs exactly one timestamp t=")
    if not signatures:
        raise WebhookSignatureError("signature header has no v1 signature")
    return int(stamps[0]), signatures


def verify(
    body: bytes,
    header: str | None,
    secret: str | bytes | Sequence[str | bytes],
    *,
    tolerance: float = TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a webhook request and return its event as a dict (:meth:`Event.to_json`).

    ``body`` is the request body exactly as received (bytes), ``header``
    the ``Deepwork-Signature`` header, ``secret`` the shared secret (or
    several, while rotating). Raises :class:`WebhookSignatureError` when the
    header is missing or malformed, no signature matches the body under any
    secret, or the timestamp is more than ``tolerance`` seconds away from
    ``now`` (by default the current time): a replayed request. Deduplicate
    on the result's ``"id"``.
    """
    if not isinstance(body, (bytes, bytearray)):
        raise WebhookSignatureError("the body must be the raw bytes received")
    stamp, signatures = _parse(header)
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance:
        raise WebhookSignatureError("signature timestamp outside the tolerance (replayed?)")
    expected = [sign(bytes(body), key, stamp).encode("ascii") for key in _secrets(secret)]
    if not any(hmac.compare_digest(want, got) for want in expected for got in signatures):
        raise WebhookSignatureError("signature does not match the body")
    try:
        event = json.loads(bytes(body))
    except ValueError:
        raise WebhookSignatureError("the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookSignatureError("the body is not a JSON object")
    return event


def _shown(url: str) -> str:
    """``url`` without credentials, query or fragment: what names and messages show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _check_url(url: object) -> None:
    """Refuse a URL a webhook could not POST to, or that holds credentials; the
    message never repeats the URL (its query may hold a token)."""
    if not isinstance(url, str):
        raise InvalidInput("a webhook URL must be a string")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise InvalidInput(
            "a webhook URL must not contain whitespace or control characters (percent-encode them)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # a port out of range raises ValueError
    except ValueError:
        raise InvalidInput("a webhook URL must have a valid host and port") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(
            "a webhook URL must start with http:// or https://; "
            f"got the scheme {parts.scheme[:20] or 'none'!r}"
        )
    if not parts.hostname or port == 0:
        raise InvalidInput("a webhook URL must name a host (and a port other than 0)")
    if "@" in parts.netloc:
        raise InvalidInput(
            "a webhook URL must not hold credentials (user:password@); "
            "send them in a header (headers=) instead"
        )
    if not (parts.path + parts.query).isascii():
        raise InvalidInput("a webhook URL's path and query must be ASCII (percent-encode them)")


def _scrubbed(text: str, url: str) -> str:
    """``text`` (an exception's) without ``url``'s query or fragment, raw or quoted."""
    parts = urllib.parse.urlsplit(url)
    for hidden in (parts.query, parts.fragment):
        if hidden:
            for form in {hidden, repr(hidden)[1:-1], urllib.parse.unquote(hidden)}:
                text = text.replace(form, "…")
    return text


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than 2xx: a failure, never followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Webhook:
    """A subscriber that POSTs each event it hears to ``url``, signed with ``secret``.

    ``secret`` may be several secrets while one is rotated: every request
    carries one signature per secret. ``types`` limits the event types sent
    (by default every one); ``name`` is the subscriber name failed
    deliveries are kept under (by default ``webhook:`` and the URL without
    its query); ``timeout`` bounds each request in seconds; ``max_tries``
    overrides the relay's limit before a delivery is parked.
    """

    def __init__(
        self,
        url: str,
        secret: str | bytes | Sequence[str | bytes],
        *,
        name: str | None = None,
        types: EventType | str | Iterable[EventType | str] | None = None,
        timeout: float = 10,
        max_tries: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        _check_url(url)
        if not timeout > 0:
            raise InvalidInput("timeout must be a positive number of seconds")
        if max_tries is not None and max_tries < 1:
            raise InvalidInput("max_tries must be at least 1")
        self.url = url
        self._secrets = _secrets(secret)
        self.subscriber = name or f"webhook:{_shown(url)}"
        if isinstance(types, (EventType, str)):
            types = (types,)
        try:
            self.event_types = None if types is None else frozenset(EventType(t) for t in types)
        except ValueError as exc:
            raise InvalidInput(f"unknown event type: {exc}") from None
        self.timeout = float(timeout)
        self.max_tries = max_tries
        self.headers = dict(headers or {})
        self._opener = urllib.request.build_opener(_NoRedirect())

    def __repr__(self) -> str:
        return f"Webhook({_shown(self.url)!r}, secret=<hidden>, name={self.subscriber!r})"

    def request(self, event: Event, *, timestamp: int | None = None) -> urllib.request.Request:
        """The signed POST of ``event``."""
        body = event.dumps().encode("utf-8")
        stamp = int(time.time()) if timestamp is None else int(timestamp)
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "User-Agent": f"deepwork-retry/{__version__}",
            EVENT_ID_HEADER: event.id,
            EVENT_TYPE_HEADER: event.type.value,
            SIGNATURE_HEADER: signature_header(body, self._secrets, timestamp=stamp),
        }
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def __call__(self, event: Event) -> None:
        """POST ``event``; raises :class:`WebhookDeliveryError` unless the answer is 2xx."""
        if self.event_types is not None and event.type not in self.event_types:
            return
        where = _shown(self.url)
        try:
            with self._opener.open(self.request(event), timeout=self.timeout) as answer:
                status = answer.status
                answer.read(_READ_LIMIT)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise WebhookDeliveryError(f"{where} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            reason = _scrubbed(str(getattr(exc, "reason", exc)), self.url)
            raise WebhookDeliveryError(f"{where} unreachable: {reason}") from None
        if not 200 <= status < 300:
            raise WebhookDeliveryError(f"{where} answered HTTP {status}")
