"""Authentication: a bearer credential -> a Principal, the same for every HTTP entry point.

`auth.mode` decides what is accepted: "none" (everyone is `access.ANONYMOUS`), "token"
(pathpacs API tokens, `archive.tokens`) or "oidc" (JWTs from the configured issuer,
`archive.oidc`; API tokens are accepted too, so scripts and AI nodes need no identity
provider). A checked credential is cached for at most `auth.cache_seconds` (<= 10 s) and never
past its expiry, so a revocation reaches every process within that time while the frame path
pays one dictionary lookup.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from datetime import datetime

from .access import ANONYMOUS, Principal, Unauthenticated
from .oidc import OidcError, OidcVerifier
from .tokens import TokenStore, looks_like_token

CACHE_ENTRIES = 10000

class Authenticator:
    def __init__(self, mode: str, tokens: TokenStore | None = None, oidc: OidcVerifier | None = None,
                 cache_seconds: float = 5.0) -> None:
        self.mode = mode
        self.tokens = tokens
        self.oidc = oidc
        self.cache_seconds = min(float(cache_seconds), 10.0)
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        return self.mode != "none"

    def cached(self, bearer: str) -> Principal | None:
        """The principal of a credential checked within the cache window (cheap, no I/O)."""
        hit = self._cache.get(bearer)
        if hit is None:
            return None
        if hit[1] <= time.monotonic():
            with self._lock:
                self._cache.pop(bearer, None)
            return None
        return hit[0]

    def needs_io(self, bearer: str) -> bool:
        """Whether checking this credential may fetch from the network (OIDC keys): the caller
        then runs `authenticate` on a thread."""
        return self.mode == "oidc" and not looks_like_token(bearer)

    def authenticate(self, bearer: str | None) -> Principal:
        """The caller's principal; `Unauthenticated` (with a reason) when a credential is
        required and missing, invalid, revoked or expired."""
        if not self.required:
            return ANONYMOUS
        if not bearer:
            raise Unauthenticated("authentication required: send Authorization: Bearer <token>")
        hit = self.cached(bearer)
        if hit is not None:
            return hit
        expires: datetime | None
        if looks_like_token(bearer) and self.tokens is not None:
            got = self.tokens.check(bearer)
            if got is None:
                raise Unauthenticated("invalid, expired or revoked token")
            principal, expires = got
        elif self.mode == "oidc" and self.oidc is not None:
            try:
                principal, expires = self.oidc.verify(bearer)
            except OidcError as exc:
                raise Unauthenticated(str(exc)) from None
        else:
            raise Unauthenticated("invalid token")
        until = time.monotonic() + self.cache_seconds
        if expires is not None:
            until = min(until, time.monotonic() + (expires.timestamp() - time.time()))
        with self._lock:
            self._cache[bearer] = (principal, until)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return principal


def build(cfg, index) -> Authenticator:
    """The authenticator of a configuration, over the archive's index (tokens live there)."""
    tokens = TokenStore(index, cfg.allow_combined_admin_roles)
    oidc = OidcVerifier(cfg.oidc, cfg.allow_combined_admin_roles) if cfg.oidc else None
    return Authenticator(cfg.auth_mode, tokens, oidc, cfg.auth_cache_seconds)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg) -> str | None:
    """Refuse (ValueError, one line) to serve without authentication on a non-loopback
    address unless `auth.allow_unauthenticated` says so; returns a warning to log, if any."""
    if cfg.auth_mode != "none":
        return None
    if not _loopback(cfg.host):
        if not cfg.allow_unauthenticated:
            raise ValueError(f"auth.mode is \"none\" but the server would listen on {cfg.host}: anyone who "
                             "can reach it could read and store slides. Set [auth] mode = \"token\" or \"oidc\", "
                             "listen on 127.0.0.1, or set auth.allow_unauthenticated = true")
        return (f"authentication is OFF on {cfg.host} (auth.allow_unauthenticated = true): "
                "anyone who can reach the ports may read and store slides")
    return "authentication is off (auth.mode = \"none\"): listening on loopback only"
