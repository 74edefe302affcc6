"""Share links: a capability URL that opens one study in the built-in viewer (issue 12).

A share link is an API token (archive.tokens: 256 random bits, only its sha256 kept, expiring,
revocable, refused everywhere within `auth.cache_seconds` <= 10 s of a revocation) whose
record also says `kind = "share"`, its permissions, the consent it was made under and whether
the study is seen de-identified. So the same secret is the Bearer token of any third-party
DICOMweb viewer, and authentication stays one index read. Its principal (`share_principal`)
is scoped to the one study with exactly the rights of its permissions: "read" is Right.READ
(QIDO, metadata, frames, rendered, thumbnails, bulk data of metadata such as ICC profiles),
"download" adds Right.DOWNLOAD (whole instances, series and studies; checked in one place, the
route table of dicomweb/auth.py). A share never holds STORE, ADMIN, SECURITY or AUDIT, so STOW,
DELETE and /api are refused. Its principal id is `share:<id>`, which is how every use shows up
in the audit trail; creation and revocation are audited events.

The URL carries the token in its fragment, `{public_url}/share#<token>`: a fragment never
reaches an access log or a Referer header. The page at /share (dicomweb/share.py) keeps it in
sessionStorage and opens the viewer, which sends it as `Authorization: Bearer`.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterable

from .access import SYSTEM, Forbidden, Principal, Right
from .audit import events as ev
from .audit.events import ParticipantObject
from .consent import Consents, record_event
from .status import InvalidRequest, NotFound

KIND = "share"
PERMISSIONS = ("read", "download")
RIGHTS = {"read": Right.READ, "download": Right.DOWNLOAD}


def check_permissions(text: str | Iterable[str]) -> list[str]:
    """`read` or `read,download` (download implies read); InvalidRequest otherwise."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    for p in items:
        if p not in PERMISSIONS:
            raise InvalidRequest(f"unknown permission {p!r} (permissions: read, or read,download)")
    return ["read"] + (["download"] if "download" in items else [])


def share_principal(d: dict, studies: frozenset[str] | None) -> Principal:
    """The principal of a share link's token record (archive.tokens.TokenStore.check)."""
    rights = frozenset(RIGHTS[p] for p in d.get("permissions", ["read"]) if p in RIGHTS) | {Right.READ}
    return Principal(f"share:{d['id']}", d.get("name") or f"share link {d['id']}", frozenset({"viewer"}), "share",
                     studies if studies is not None else frozenset(), rights=rights,
                     deidentified=bool(d.get("deidentify")))


def _state(d: dict) -> str:
    from .tokens import _info

    return _info(d).state


def as_dict(d: dict) -> dict:
    """What `share list --json` shows of a link: never the secret or its hash."""
    return {"id": d["id"], "study": (d.get("studies") or [None])[0], "permissions": d.get("permissions", ["read"]),
            "deidentify": bool(d.get("deidentify")), "consent": d.get("consent"), "created": d.get("created"),
            "expires": d.get("expires"), "revoked": d.get("revoked"), "state": _state(d),
            "created_by": d.get("created_by", ""), "name": d.get("name", "")}


class ShareLinks:
    """Create, list and revoke share links (`ShareLinks(archive)`)."""

    def __init__(self, archive) -> None:
        self.arc = archive
        self.tokens = archive.tokens

    def url(self, secret: str) -> str:
        """The link: the viewer's share page with the token in the fragment."""
        return f"{self.arc.config.public_url()}/share#{secret}"

    def create(self, study: str, *, expires: datetime, permissions: Iterable[str] = ("read",),
               deidentify: bool = False, consent: str | None = None, who: Principal = SYSTEM,
               name: str = "") -> tuple[str, dict]:
        """A new link to a stored study: (its URL, shown once; its record as `as_dict`).
        NotFound for a study the archive does not hold; Forbidden when consent is required and
        none covers sharing the study, or when the consent named is withdrawn or for another use."""
        perms = check_permissions(permissions)
        if self.arc.study(study) is None:
            raise NotFound(f"study {study} is not in this archive")
        consents = Consents(self.arc)
        rec = consents.find(consent, study, KIND) if consent else consents.require(study, KIND)
        extra = {"kind": KIND, "permissions": perms, "deidentify": bool(deidentify),
                 "consent": rec["id"] if rec else None}
        secret, info = self.tokens.create(["viewer"], studies=[study], expires=expires,
                                          name=name or f"share link of study {study}"[:200],
                                          created_by=who.name, extra=extra)
        d = self.tokens.index.token(info.id)
        self._audit("share created", d, who)
        if rec and (consents.get(rec["id"]) or {}).get("withdrawn"):  # withdrawn meanwhile: no link survives it
            self.revoke(info.id, who, f"consent {rec['id']} withdrawn")
            raise Forbidden(f"consent {rec['id']} was withdrawn while the link was made")
        return self.url(secret), as_dict(d)

    def records(self, study: str | None = None) -> list[dict]:
        """Every share link's token record (of one study), oldest first."""
        out = [d for d in self.tokens.index.tokens() if d.get("kind") == KIND]
        if study:
            out = [d for d in out if study in (d.get("studies") or ())]
        return sorted(out, key=lambda d: (d.get("created", ""), d["id"]))

    def list(self, study: str | None = None) -> list[dict]:
        return [as_dict(d) for d in self.records(study)]

    def revoke(self, share_id: str, who: Principal = SYSTEM, reason: str = "") -> dict:
        """Revoke a link by id (NotFound when no share link has it); revoking twice keeps the
        first time and records one event."""
        d = self.tokens.index.token(share_id)
        if d is None or d.get("kind") != KIND:
            raise NotFound(f"no share link {share_id} (see pathpacs share list)")
        if not d.get("revoked"):
            self.tokens.revoke(share_id)
            d = self.tokens.index.token(share_id)
            self._audit("share revoked", d, who, reason)
        return as_dict(d)

    def revoke_consent(self, consent_id: str, who: Principal = SYSTEM) -> list[str]:
        """Revoke every live link made under a consent (its withdrawal); their ids."""
        done = []
        for d in self.records():
            if d.get("consent") == consent_id and not d.get("revoked"):
                self.revoke(d["id"], who, f"consent {consent_id} withdrawn")
                done.append(d["id"])
        return done

    def _audit(self, kind: str, d: dict, who: Principal, reason: str = "") -> None:
        study = (d.get("studies") or [None])[0]
        detail = {"share": d["id"], "study": study, "permissions": ",".join(d.get("permissions", ["read"])),
                  "deidentify": str(bool(d.get("deidentify"))).lower(), "consent": d.get("consent"),
                  "expires": d.get("expires"), "reason": reason}
        objs = [ParticipantObject(f"share:{d['id']}", ev.SYSTEM_OBJECT, ev.ROLE_SECURITY_RESOURCE, ev.ID_USER,
                                  name="share link", detail={k: str(v) for k, v in detail.items() if v})]
        if study:
            objs.append(ParticipantObject(study, ev.SYSTEM_OBJECT, ev.ROLE_REPORT, ev.ID_STUDY))
        record_event(self.arc, kind, ev.SECURITY_ALERT, "E", who, objs, detail,
                     types=[ev.USER_SECURITY_ATTRIBUTES_CHANGED])
