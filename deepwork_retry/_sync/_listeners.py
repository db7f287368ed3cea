"""How the sync event relay calls a listener (the twin of ``_async/_listeners.py``)."""

from __future__ import annotations

from deepwork_retry._core.events import Event
from deepwork_retry._hooks import Hooks, Listener
from deepwork_retry.exceptions import ConfigurationError


def check_listeners(owner: str, hooks: Hooks) -> None:
    """Refuse coroutine listeners: only the async relay can await them."""
    found = [listener.name for listener in hooks if listener.is_async]
    if found:
        raise ConfigurationError(
            f"{owner} calls sync listeners only; {', '.join(found)} "
            f"{'is a coroutine function' if len(found) == 1 else 'are coroutine functions'}"
            f" — use Async{owner}, or register a sync function"
        )


def call_listener(listener: Listener, event: Event) -> None:
    """Call ``listener`` with ``event`` in this thread."""
    listener.fn(event)
