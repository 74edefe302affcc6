"""Consistent replacement UIDs per context, both directions, in the index's "uidmap" table.

A context is one consultation job, one export, or the archive's research view. Its new UIDs
are derived (HMAC-SHA256 under a random secret kept with the context, as a 2.25 UUID-form
UID), so the same original always maps to the same new UID in that context, even from two
processes at once, and nobody without the secret can confirm a guessed original. Each mapping
is recorded in both directions the first time it is made, so an answer that comes back with
the new UIDs (a consultant's opinion SR) maps back to the originals.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

TABLE = "uidmap"


class UidMap:
    """original <-> new UIDs of one context (`context` is any short text without NUL)."""

    def __init__(self, index, context: str) -> None:
        if not context or "\0" in context or "|" in context:
            raise ValueError(f"bad uid map context {context!r}")
        self.index = index
        self.context = context
        self._secret: bytes | None = None
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()

    def _key(self, kind: str, uid: str) -> str:
        return f"{self.context}|{kind}|{uid}"

    @property
    def secret(self) -> bytes:
        """The context's secret, made once (one read-modify-write, so two makers agree)."""
        if self._secret is None:
            rec = self.index.update_record(TABLE, f"{self.context}|secret",
                                           lambda old: old or {"secret": secrets.token_hex(32)})
            if rec is None:  # a backend that returns nothing: read it back
                rec = self.index.record(TABLE, f"{self.context}|secret")
            self._secret = bytes.fromhex(rec["secret"])
        return self._secret

    def digest(self, label: str, value: str) -> str:
        """A hex digest of `value` keyed by the context's secret (pseudonyms, mapped ids, the date
        shift): stable in the context, unguessable outside it."""
        return hmac.new(self.secret, f"{label}\0{value}".encode(), hashlib.sha256).hexdigest()

    def derive(self, uid: str) -> str:
        """The new UID for `uid` without recording it."""
        return "2.25." + str(int(self.digest("uid", uid)[:32], 16))

    def new(self, uid: str) -> str:
        """The new UID for `uid`, recorded both ways the first time."""
        uid = str(uid).strip().rstrip("\0")
        got = self._cache.get(uid)
        if got is not None:
            return got
        new = self.derive(uid)
        if self.index.record(TABLE, self._key("o", uid)) is None:
            self.index.put_records(TABLE, {self._key("o", uid): {"new": new}, self._key("n", new): {"original": uid}})
        with self._lock:
            self._cache[uid] = new
            if len(self._cache) > 100_000:
                self._cache.clear()
        return new

    def original(self, new_uid: str) -> str | None:
        """The original UID a new one stands for (None when this context never made it)."""
        rec = self.index.record(TABLE, self._key("n", str(new_uid).strip()))
        return rec["original"] if rec else None

    def items(self) -> dict[str, str]:
        """Every original -> new mapping of the context (for reports and tests)."""
        prefix = f"{self.context}|o|"
        return {k[len(prefix):]: v["new"] for k, v in self.index.records(TABLE, prefix)}
