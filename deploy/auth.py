"""Bearer API keys of the REST API: who is calling (401), and may they do this (403).

A key has a role: "admin" may do everything (feeds, jobs, search, ask, read); "reader" may search, ask and read.
A key may be limited to a list of sources (feed ids / archive source ids): it then sees and touches only those.
An archive job over several files with source_id "lot" writes sources "lot/<file stem>": a key limited to "lot"
covers them too. Keys are known here by their salted hashes only (pipeline.key_hashes, via ApiKey).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterable, Literal

from pipeline.settings import ApiKey

Role = Literal["admin", "reader"]
ROLES: tuple[str, ...] = ("admin", "reader")
GENERATED_KEY_BYTES = 24            # token_urlsafe(24): 32 characters


class AuthError(Exception):
    """An HTTP 401 (no or unknown key) or 403 (known key, not allowed)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Caller:
    """The authenticated key: its role and the sources it is limited to (None: every source)."""
    role: Role
    sources: tuple[str, ...] | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, source_id: str) -> bool:
        return self.sources is None or any(source_id == s or source_id.startswith(s + "/") for s in self.sources)


def generate_key() -> str:
    """A fresh random key (URL-safe, 32 characters)."""
    return secrets.token_urlsafe(GENERATED_KEY_BYTES)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authorizer:
    """Checks bearer keys against the configured ApiKeys' hashes: every key is tried, whichever matches, so the time
    taken does not say which key matched; each digest comparison is constant-time."""

    def __init__(self, api_keys: Iterable[ApiKey | dict]):
        self.keys = [k if isinstance(k, ApiKey) else ApiKey(**k) for k in api_keys]
        if not self.keys:
            raise ValueError("no API keys configured: set api_keys (TUBESCOPE_API_KEYS) or let `tubescope serve` "
                             "generate an admin key; the API never runs open")

    def authenticate(self, authorization: str | None) -> Caller:
        token = bearer_token(authorization)
        if token is None:
            raise AuthError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        found = None
        for k in self.keys:          # no early exit
            if k.matches(token):
                found = k
        if found is None:
            raise AuthError(401, "unknown API key")
        sources = tuple(found.sources) if found.sources is not None else None
        return Caller(role=found.role, sources=sources)


def require_role(caller: Caller, role: Role) -> None:
    """403 unless the caller has `role` (admin has every role)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "admin" and not caller.is_admin:
        raise AuthError(403, "this operation needs an admin key; this key has role 'reader'")


def require_sources(caller: Caller, source_ids: Iterable[str]) -> None:
    """403 naming the first source the caller's key is not allowed to touch."""
    for sid in source_ids:
        if not caller.may_see(sid):
            raise AuthError(403, f"this API key may not access source {sid!r}")


def visible(caller: Caller, source_ids: Iterable[str]) -> list[str]:
    """The subset of source_ids the caller may see, in order."""
    return [s for s in source_ids if caller.may_see(s)]


__all__ = ["AuthError", "Authorizer", "Caller", "ROLES", "bearer_token", "generate_key", "require_role",
           "require_sources", "visible"]
