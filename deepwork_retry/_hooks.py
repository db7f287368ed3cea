"""The hooks registry: which listeners hear which lifecycle events.

A :class:`Hooks` holds listeners, each under a stable subscriber name (the
one a failed delivery is kept under, see
:class:`~deepwork_retry._core.events.EventRetry`). The event relay
(:class:`~deepwork_retry.events.EventRelay`, or its async twin) calls them
after the commit; nothing here runs inside a request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import attrs

from deepwork_retry._core.events import RETRIES_EXHAUSTED, Event, EventType
from deepwork_retry._wiring import is_async_callable
from deepwork_retry.exceptions import ConfigurationError, InvalidInput

F = TypeVar("F", bound=Callable[..., Any])

Types = EventType | str | Iterable[EventType | str]
"""One event type or several, as members or wire names."""

Predicate = Callable[[Event], bool]


def subscriber_name(fn: object) -> str:
    """``module:qualname`` of ``fn`` (of its class, for a callable object)."""
    target: Any = fn
    if not hasattr(target, "__qualname__"):
        target = type(fn)
    module = getattr(target, "__module__", None) or "?"
    return f"{module}:{target.__qualname__}"


def retries_exhausted(event: Event) -> bool:
    """Whether ``event`` is a ``task.blocked`` whose automatic retries ran out."""
    return event.type is EventType.TASK_BLOCKED and (
        event.data.get("retries_exhausted") is True
        or event.data.get("reason") == RETRIES_EXHAUSTED.value
    )


@attrs.frozen(kw_only=True)
class Listener:
    """One registered listener: its subscriber name, what it hears, how often it is tried.

    ``types`` ``None`` hears every type; ``where`` narrows further.
    ``max_tries`` ``None``: the relay's limit.
    """

    name: str
    fn: Callable[[Event], Any]
    types: frozenset[EventType] | None = None
    where: Predicate | None = None
    max_tries: int | None = None
    is_async: bool = False

    def matches(self, event: Event) -> bool:
        if self.types is not None and event.type not in self.types:
            return False
        return self.where is None or bool(self.where(event))


def _types(types: Types | None) -> frozenset[EventType] | None:
    if types is None:
        return None
    if isinstance(types, (EventType, str)):
        types = (types,)
    try:
        return frozenset(EventType(t) for t in types)
    except ValueError as exc:
        raise InvalidInput(f"unknown event type: {exc}") from None


class Hooks:
    """A registry of listeners for the lifecycle events.

    ::

        hooks = Hooks()

        @hooks.on(EventType.TASK_BLOCKED)
        def page_someone(event: Event) -> None: ...

        hooks.on_retries_exhausted(notify, name="notify")
        hooks.on_any(audit_log)

    A listener takes one :class:`~deepwork_retry._core.events.Event`; it may
    be a coroutine function (then only the async relay can run it). Its
    subscriber name is ``name`` or ``module:qualname``; it must be unique in
    the registry and stay the same across deployments, since failed
    deliveries are kept and retried under it.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, Listener] = {}

    def add(
        self,
        fn: Callable[[Event], Any],
        *,
        types: Types | None = None,
        where: Predicate | None = None,
        name: str | None = None,
        max_tries: int | None = None,
    ) -> Listener:
        """Register ``fn`` for ``types`` (``None``: every type) and return its listener.

        An object with a ``subscriber`` name, ``event_types`` and ``max_tries``
        (a :class:`~deepwork_retry.webhooks.Webhook`) gives the defaults of
        ``name``, ``types`` and ``max_tries``.
        """
        if not callable(fn):
            raise ConfigurationError(f"a listener must be callable; got {type(fn).__name__}")
        if max_tries is not None and max_tries < 1:
            raise InvalidInput("max_tries must be at least 1")
        # A subscriber object (a Webhook) brings its own name, types and limit.
        label = name if name is not None else getattr(fn, "subscriber", None)
        label = label if isinstance(label, str) else subscriber_name(fn)
        if types is None:
            types = getattr(fn, "event_types", None)
        if max_tries is None:
            own = getattr(fn, "max_tries", None)
            max_tries = own if isinstance(own, int) else None
        if not label or len(label) > 255:
            raise InvalidInput("a subscriber name must have 1 to 255 characters")
        if label in self._listeners:
            raise ConfigurationError(
                f"a listener named {label!r} is registered already; give each its own name="
            )
        listener = Listener(
            name=label,
            fn=fn,
            types=_types(types),
            where=where,
            max_tries=max_tries,
            is_async=is_async_callable(fn),
        )
        self._listeners[label] = listener
        return listener

    def on(
        self,
        types: Types,
        fn: F | None = None,
        *,
        name: str | None = None,
        max_tries: int | None = None,
    ) -> Any:
        """Register ``fn`` for ``types``; without ``fn``, a decorator that does."""
        if fn is not None:
            self.add(fn, types=types, name=name, max_tries=max_tries)
            return fn

        def register(func: F) -> F:
            self.add(func, types=types, name=name, max_tries=max_tries)
            return func

        return register

    def on_retries_exhausted(
        self, fn: F | None = None, *, name: str | None = None, max_tries: int | None = None
    ) -> Any:
        """Register ``fn`` for ``task.blocked`` with ``data.retries_exhausted``
        (the automatic retries ran out); without ``fn``, a decorator."""
        if fn is not None:
            self.add(
                fn, types=EventType.TASK_BLOCKED, where=retries_exhausted, name=name,
                max_tries=max_tries,
            )  # fmt: skip
            return fn

        def register(func: F) -> F:
            self.add(
                func, types=EventType.TASK_BLOCKED, where=retries_exhausted, name=name,
                max_tries=max_tries,
            )  # fmt: skip
            return func

        return register

    def on_any(
        self, fn: F | None = None, *, name: str | None = None, max_tries: int | None = None
    ) -> Any:
        """Register ``fn`` for every event; without ``fn``, a decorator."""
        if fn is not None:
            self.add(fn, name=name, max_tries=max_tries)
            return fn

        def register(func: F) -> F:
            self.add(func, name=name, max_tries=max_tries)
            return func

        return register

    def remove(self, name: str) -> None:
        """Unregister the listener named ``name`` (``KeyError`` if none)."""
        del self._listeners[name]

    def get(self, name: str) -> Listener | None:
        """The listener named ``name``, if registered."""
        return self._listeners.get(name)

    def matching(self, event: Event) -> list[Listener]:
        """The listeners that hear ``event``, in registration order."""
        return [listener for listener in self._listeners.values() if listener.matches(event)]

    def __iter__(self) -> Iterator[Listener]:
        return iter(list(self._listeners.values()))

    def __len__(self) -> int:
        return len(self._listeners)

    def __contains__(self, name: object) -> bool:
        return name in self._listeners
