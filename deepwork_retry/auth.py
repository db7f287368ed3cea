"""Who is calling, and may they retry in this project: the auth ports.

Framework-free. A web adapter turns ``Authorization: Bearer <token>`` into a
:class:`Principal` with an :class:`Authenticator`, then asks an
:class:`Authorizer` whether that principal may act in the project of the URL.
There is no implicit bypass: a request without a token that the authenticator
accepts is refused, whatever its origin.

Two authenticators ship here:

- :class:`StaticTokens`, a table of tokens kept only as SHA-256 digests and
  compared in constant time, loadable from an environment variable or a file;
- :class:`CallableAuthenticator`, which wraps a host application's own check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from deepwork_retry.exceptions import InvalidInput

MAX_TOKEN_LENGTH = 4096
"""Longer bearer tokens are refused before any hashing or lookup."""


def _projects(value: Iterable[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


@attrs.frozen(kw_only=True)
class Principal:
    """An authenticated caller."""

    id: str
    """Recorded as the ``actor`` of the retries it makes."""
    projects: frozenset[str] | None = attrs.field(default=None, converter=_projects)
    """The projects it may act in; ``None`` means every project."""

    def may_act_in(self, project_id: str) -> bool:
        return self.projects is None or project_id in self.projects


@runtime_checkable
class Authenticator(Protocol):
    """Turns a bearer token into a principal, or ``None`` when it is not valid."""

    def authenticate(self, token: str) -> Principal | None: ...


class Authorizer(Protocol):
    """May ``principal`` retry (and read) in ``project_id``?"""

    def __call__(self, principal: Principal, project_id: str) -> bool: ...


def may_retry(principal: Principal, project_id: str) -> bool:
    """The default rule: the principal's own project list decides."""
    return principal.may_act_in(project_id)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _check_token(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise InvalidInput("a token must be a non-empty string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidInput(f"a token must be at most {MAX_TOKEN_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in token) or ";" in token:
        raise InvalidInput("a token must not contain whitespace, control characters or ';'")
    return token


class StaticTokens:
    """A fixed table of bearer tokens, each mapped to a principal.

    Only the SHA-256 digest of each token is kept. A lookup hashes the
    presented token and compares it with every stored digest using
    :func:`hmac.compare_digest`, without stopping at the first match, so the
    time taken does not depend on which token matched or how much of it did.

    The text form, used by :meth:`from_env` and :meth:`from_file`, is one
    entry per item::

        TOKEN=PRINCIPAL                 # may act in every project
        TOKEN=PRINCIPAL:PROJ1,PROJ2     # only in these projects

    Items are separated by ``;`` in an environment variable and by newlines in
    a file (where blank lines and lines starting with ``#`` are ignored).
    Tokens may contain ``=`` (base64 padding): the entry is split at its last
    ``=``.
    """

    def __init__(self, entries: Mapping[str, Principal | str] | None = None) -> None:
        self._table: list[tuple[bytes, Principal]] = []
        for token, principal in (entries or {}).items():
            self.add(token, principal)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        # Never show tokens, not even their digests.
        return f"StaticTokens(<{len(self._table)} tokens>)"

    def add(self, token: str, principal: Principal | str) -> None:
        """Accept ``token`` for ``principal`` (a :class:`Principal` or a bare id)."""
        _check_token(token)
        if isinstance(principal, str):
            principal = Principal(id=principal)
        digest = _digest(token)
        if any(hmac.compare_digest(digest, known) for known, _ in self._table):
            raise InvalidInput("the same token is listed twice")
        self._table.append((digest, principal))

    def authenticate(self, token: str) -> Principal | None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = _digest(token)
        found: Principal | None = None
        for known, principal in self._table:
            if hmac.compare_digest(digest, known):
                found = principal
        return found

    # -- loading ---------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, separator: str = ";", source: str = "tokens") -> StaticTokens:
        """Read entries in the text form above; errors name the item, never the token."""
        tokens = cls()
        for number, raw in enumerate(text.split(separator), start=1):
            item = raw.strip()
            if not item or item.startswith("#"):
                continue
            token, principal = _parse_item(item, f"{source} item {number}")
            try:
                tokens.add(token, principal)
            except InvalidInput as exc:
                raise InvalidInput(f"{source} item {number}: {exc}") from None
        return tokens

    @classmethod
    def from_env(cls, name: str = "DEEPWORK_TOKENS") -> StaticTokens:
        """The tokens in environment variable ``name`` (``;``-separated entries)."""
        value = os.environ.get(name)
        if value is None:
            raise InvalidInput(f"environment variable {name} is not set")
        tokens = cls.parse(value, separator=";", source=name)
        if not tokens:
            raise InvalidInput(f"environment variable {name} lists no tokens")
        return tokens

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticTokens:
        """The tokens in the file at ``path`` (one entry per line)."""
        text = Path(path).read_text(encoding="utf-8")
        tokens = cls.parse(text, separator="\n", source=str(path))
        if not tokens:
            raise InvalidInput(f"{path} lists no tokens")
        return tokens


def _parse_item(item: str, where: str) -> tuple[str, Principal]:
    token, eq, rest = item.rpartition("=")
    token = token.strip()
    if not eq or not token:
        raise InvalidInput(f"{where}: expected TOKEN=PRINCIPAL[:PROJECT,...]")
    principal_id, colon, project_list = rest.partition(":")
    principal_id = principal_id.strip()
    if not principal_id:
        raise InvalidInput(f"{where}: the principal is empty")
    if not colon:
        return token, Principal(id=principal_id)
    projects = [p.strip() for p in project_list.split(",")]
    if not all(projects):
        raise InvalidInput(f"{where}: the project list has an empty entry")
    return token, Principal(id=principal_id, projects=frozenset(projects))


class CallableAuthenticator:
    """An :class:`Authenticator` over a host application's own check.

    ``check(token)`` returns a :class:`Principal`, a principal id (``str``,
    meaning every project), or ``None`` to refuse the token. Exceptions it
    raises propagate: the web layer answers them with 503, never with access.
    """

    def __init__(self, check: Callable[[str], Principal | str | None]) -> None:
        self._check = check

    def authenticate(self, token: str) -> Principal | None:
        found = self._check(token)
        if found is None:
            return None
        if isinstance(found, Principal):
            return found
        if isinstance(found, str) and found:
            return Principal(id=found)
        raise TypeError(
            f"the authentication callable must return a Principal, a str or None, "
            f"not {type(found).__name__}"
        )


__all__ = [
    "MAX_TOKEN_LENGTH",
    "Authenticator",
    "Authorizer",
    "CallableAuthenticator",
    "Principal",
    "StaticTokens",
    "may_retry",
]
