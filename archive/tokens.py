"""API tokens: random bearer secrets for people and systems, stored only as a hash.

A token reads `pp_<id>.<secret>`: the id finds the record (so a lookup is one index read, not a
scan), the secret (256 random bits) is compared as sha256 in constant time. A fast hash is
right for a high-entropy random secret (there is nothing to brute-force that a slow hash would
protect); a password would need one. The index holds the record, so every process and node of
the archive sees a revocation as soon as it commits; `archive.authn` caches a lookup for at
most `auth.cache_seconds` (<= 10 s), never past the token's expiry.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .access import Principal, check_roles

PREFIX = "pp_"
_TOKEN = re.compile(r"^pp_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
_DURATION = re.compile(r"^(\d{1,6})([smhdwy])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """`7d`, `12h`, `30m`, `90s`, `2w`, `1y`, or an ISO date/time: when a token stops working."""
    now = now or _now()
    m = _DURATION.match(text.strip())
    if m:
        seconds = int(m.group(1)) * _UNIT[m.group(2)]
        if seconds <= 0:
            raise ValueError(f"--expires {text!r}: must be in the future")
        return now + timedelta(seconds=seconds)
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--expires {text!r}: give a duration like 7d, 12h, 30m or an ISO date") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    if t <= now:
        raise ValueError(f"--expires {text!r} is in the past")
    return t


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """What `token list` shows: never the secret, nor its hash."""

    id: str
    name: str
    roles: tuple[str, ...]
    studies: tuple[str, ...] | None
    created: str
    expires: str | None
    revoked: str | None
    created_by: str
    deidentify: bool = False  # reads through de-identified views only (archive.deid.views)

    def as_dict(self) -> dict:
        """The record as JSON shows it (token list --json, /api/tokens): never the secret or its hash."""
        return {"id": self.id, "name": self.name, "roles": list(self.roles),
                "studies": list(self.studies) if self.studies else None, "created": self.created,
                "expires": self.expires, "revoked": self.revoked, "state": self.state,
                "created_by": self.created_by, "deidentify": self.deidentify}

    def detail(self) -> dict[str, str]:
        """What the audit trail records about the token (never the secret or its hash)."""
        return {"token": self.id, "name": self.name, "roles": ",".join(self.roles),
                "studies": ",".join(self.studies) if self.studies else "all", "expires": self.expires or "never",
                "deidentify": "yes" if self.deidentify else "no"}

    @property
    def state(self) -> str:
        if self.revoked:
            return "revoked"
        if self.expires and self.expires <= _iso(_now()):
            return "expired"
        return "active"


def _info(d: dict) -> TokenInfo:
    return TokenInfo(d["id"], d.get("name", ""), tuple(d["roles"]),
                     tuple(d["studies"]) if d.get("studies") is not None else None,
                     d["created"], d.get("expires"), d.get("revoked"), d.get("created_by", ""),
                     bool(d.get("deidentify")))


class TokenStore:
    """Create, list, revoke and check API tokens, over the archive's index."""

    def __init__(self, index, allow_combined_admin_roles: bool = False) -> None:
        self.index = index
        self.allow_combined = allow_combined_admin_roles

    def create(self, roles: list[str], *, studies: list[str] | None = None, expires: datetime | None = None,
               name: str = "", created_by: str = "", deidentify: bool = False,
               extra: dict | None = None) -> tuple[str, TokenInfo]:
        """A new token: (the secret, shown once; its record). ValueError for bad roles.
        `deidentify`: its principal reads de-identified views (archive.deid). `extra`: more fields
        of the record (a share link's kind, permissions, consent: archive.shares)."""
        checked = check_roles(roles, self.allow_combined)
        if not checked:
            raise ValueError("a token needs at least one --role")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)  # 256 bits
        record = {"id": token_id, "name": name, "roles": sorted(checked),
                  "studies": sorted(set(studies)) if studies else None, "created": _iso(_now()),
                  "expires": _iso(expires) if expires else None, "revoked": None,
                  "created_by": created_by, "deidentify": bool(deidentify), **(extra or {}),
                  "sha256": _hash(secret)}
        self.index.put_token(token_id, record)
        return f"{PREFIX}{token_id}.{secret}", _info(record)

    def list(self) -> list[TokenInfo]:
        return sorted((_info(d) for d in self.index.tokens()), key=lambda t: t.created)

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke by id (KeyError when unknown); revoking twice keeps the first time."""
        d = self.index.token(token_id)
        if d is None:
            raise KeyError(token_id)
        if not d.get("revoked"):
            d["revoked"] = _iso(_now())
            self.index.put_token(token_id, d)
        return _info(d)

    def check(self, bearer: str) -> tuple[Principal, datetime | None] | None:
        """The principal a bearer secret stands for and when it expires; None when it is not a
        valid, unexpired, unrevoked token of this archive."""
        m = _TOKEN.match(bearer)
        if not m:
            return None
        d = self.index.token(m.group(1))
        if d is None or d.get("revoked") or not hmac.compare_digest(d.get("sha256", ""), _hash(m.group(2))):
            return None
        expires = datetime.fromisoformat(d["expires"].replace("Z", "+00:00")) if d.get("expires") else None
        if expires is not None and expires <= _now():
            return None
        studies = frozenset(d["studies"]) if d.get("studies") is not None else None
        if d.get("kind") == "share":  # a share link's capability: its own rights (archive.shares)
            from .shares import share_principal

            return share_principal(d, studies), expires
        name = d.get("name") or f"token {d['id']}"
        principal = Principal(f"token:{d['id']}", name, frozenset(d["roles"]), "token", studies,
                              deidentified=bool(d.get("deidentify")))
        return principal, expires


def looks_like_token(bearer: str) -> bool:
    return bearer.startswith(PREFIX)
