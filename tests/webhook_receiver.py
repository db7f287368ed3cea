"""A real local webhook receiver for the tests: http.server on 127.0.0.1, in a thread.

It checks every request with :func:`deepwork_retry.webhooks.verify` (as a
host's receiver would), answers 400 to one that does not verify, 500 while
told to fail, else 204, and keeps what it saw.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deepwork_retry.webhooks import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    WebhookSignatureError,
    verify,
)


class Receiver:
    """What the receiver saw and how it answers."""

    def __init__(self, secret: str | list[str]) -> None:
        self.secret = secret
        self.fail_next = 0
        """Answer 500 to this many more verified requests."""
        self.now: float | None = None
        """The receiver's clock for ``verify`` (``None``: the wall clock)."""
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.failed: list[str] = []
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.url = ""
        self._lock = threading.Lock()

    @property
    def accepted_ids(self) -> list[str]:
        with self._lock:
            return [event["id"] for event in self.accepted]

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        with self._lock:
            self.requests.append((body, headers))
            try:
                event = verify(body, headers.get(SIGNATURE_HEADER), self.secret, now=self.now)
            except WebhookSignatureError as exc:
                self.refused.append(str(exc))
                return 400
            if headers.get(EVENT_ID_HEADER) != event["id"]:
                self.refused.append("event id header differs from the body")
                return 400
            if headers.get(EVENT_TYPE_HEADER) != event["type"]:
                self.refused.append("event type header differs from the body")
                return 400
            if self.fail_next > 0:
                self.fail_next -= 1
                self.failed.append(event["id"])
                return 500
            self.accepted.append(event)
            return 204


@contextmanager
def receiving(secret: str | list[str]) -> Iterator[Receiver]:
    """A :class:`Receiver` listening on 127.0.0.1 (a free port) until the block ends."""
    receiver = Receiver(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status = receiver.handle(body, {k: v for k, v in self.headers.items()})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/deepwork"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
