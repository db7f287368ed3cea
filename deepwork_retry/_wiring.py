"""Where parts are put together: each part must be of its owner's kind, sync or async.

A sync storage handed to an async service is not an error its first call can
report: the sync method runs (and commits) before the service awaits its
result. So the services, the relay, the reaper and the APIs check the kind
of what they are given when they are built, with this one rule, and refuse
a mismatch with an error that names the class to use instead.

The kind of a part is read from one method (a storage's ``apply``, a
dispatcher's ``dispatch``, a service's ``retry`` or ``reap``): a coroutine
function makes it async. A method that merely returns an awaitable without
being one (a proxy built by ``__getattr__``) looks sync; such a part should
define its async methods with ``async def``, as the protocols do.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
import threading
import weakref
from typing import Any

from deepwork_retry.exceptions import ConfigurationError, StorageNotOpen

log = logging.getLogger("deepwork_retry")

_MAX_LAYERS = 32
"""How many wrappers deep :func:`is_async_callable` looks."""


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine, judged without calling it.

    Sees through ``functools.partial``, transparent decorators (those that set
    ``__wrapped__``, as ``functools.wraps`` does), bound methods and callable
    objects whose ``__call__`` is a coroutine function.
    """
    for _ in range(_MAX_LAYERS):
        if inspect.iscoroutinefunction(fn):
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            fn = wrapped
            continue
        if callable(fn) and not inspect.isroutine(fn) and not isinstance(fn, type):
            # A callable object: its class's __call__ says what a call returns.
            return inspect.iscoroutinefunction(type(fn).__call__)
        return False
    return False


def _twin(name: str) -> str:
    """``AsyncRetryService`` <-> ``RetryService``."""
    return name[len("Async") :] if name.startswith("Async") else "Async" + name


def _library_twin(part: object) -> str | None:
    """The name of the library's own twin class of ``part``, if there is one."""
    cls = type(part)
    if not cls.__module__.startswith("deepwork_retry."):
        return None
    twin = _twin(cls.__name__)
    # Twins live side by side: ``._async.services`` / ``._sync.services``,
    # ``web._async_api`` / ``web._sync_api``.
    swapped = re.sub(r"\._sync(?=[._])", "._async", cls.__module__)
    if swapped == cls.__module__:
        swapped = re.sub(r"\._async(?=[._])", "._sync", cls.__module__)
    for name in (cls.__module__, swapped):
        if hasattr(sys.modules.get(name), twin):
            return twin
    return None


def check_kind(
    owner: str,
    role: str,
    part: object,
    method: str,
    *,
    asynchronous: bool,
    otherwise: str | None = None,
) -> None:
    """Refuse ``part`` unless its ``method`` is of the kind ``owner`` needs.

    ``role`` names the part in the message (``"storage"``, ``"dispatcher"``,
    ``"service"``); ``otherwise`` says what else would take ``part`` (by
    default ``owner``'s twin). Raises
    :class:`~deepwork_retry.exceptions.ConfigurationError` naming what to use.
    """
    found = getattr(part, method, None)
    got = type(part).__name__
    wanted = "an async" if asynchronous else "a sync"
    if found is None or not callable(found):
        raise ConfigurationError(
            f"{owner} needs {wanted} {role}; got {got}, which has no {method}()"
        )
    if is_async_callable(found) == asynchronous:
        return
    instead = _library_twin(part)
    if instead is None:
        every = "every method a coroutine" if asynchronous else "no method a coroutine"
        instead = f"{wanted} {role} ({every})"
    raise ConfigurationError(
        f"{owner} needs {wanted} {role}; got {got} — use {instead}, or {otherwise or _twin(owner)}"
    )


def check_parts(owner: str, storage: object, dispatcher: object, *, asynchronous: bool) -> None:
    """A service's storage and (optional) dispatcher must both be of its kind.

    A storage's optional one-step retry (``retry_blocked``) must be of its kind too.
    """
    check_kind(owner, "storage", storage, "apply", asynchronous=asynchronous)
    if getattr(storage, "retry_blocked", None) is not None:
        check_kind(owner, "storage", storage, "retry_blocked", asynchronous=asynchronous)
    if dispatcher is not None:
        check_kind(owner, "dispatcher", dispatcher, "dispatch", asynchronous=asynchronous)


_told: weakref.WeakSet[Any] = weakref.WeakSet()
"""The storages whose missing open step was logged already."""
_told_lock = threading.Lock()


def not_opened(storage: object, step: str, *, name: str | None = None) -> StorageNotOpen:
    """The error for ``storage`` used before its open ``step``; logged (once per storage).

    A storage with an open step raises it from its first use before that
    step, so that a setup mistake is told apart from an outage. ``name``
    names what was not opened (by default the storage's class).
    """
    error = StorageNotOpen(name or type(storage).__name__, step)
    try:
        with _told_lock:
            first = storage not in _told
            _told.add(storage)
    except TypeError:  # not weakly referenceable: log every time rather than never
        first = True
    if first:
        log.error("%s", error)
    return error


__all__ = ["check_kind", "check_parts", "is_async_callable", "not_opened"]
