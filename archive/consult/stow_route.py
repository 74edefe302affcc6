"""The DICOMweb route: STOW-RS of one instance per request, the body streamed from the store.

One request per instance makes the STOW response the instance's confirmation (its
ReferencedSOPSequence) and a retry cheap (one instance, not the case). Credentials: a bearer
token (given, or read from token_file at each request so a rotated file is picked up), or OAuth
2.0 client credentials fetched from the issuer's token endpoint and cached until shortly
before they expire. TLS: the partner's CA and our client certificate from the Partner.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import requests

from .routes import Confirmation, Item, RouteError

if TYPE_CHECKING:
    from archive.config import Config, Partner

log = logging.getLogger("pathpacs.consult.stow")

REFERENCED, FAILED, FAILURE_REASON, SOP_UID = "00081199", "00081198", "00081197", "00081155"
ERROR_COMMENT, WARNING_REASON = "00000902", "00081196"
FAILURE_TEXT = {0x0111: "the partner holds this SOP Instance UID with other content",
                0xA700: "the partner is out of resources (disk space)",
                0x0124: "not authorized to store it", 0xC000: "the partner cannot understand it",
                0xA900: "it does not match the SOP class or study"}


class _Body:
    """A multipart/related body read in blocks by urllib3 (file-like with a length, so the
    request carries Content-Length; never all in memory). An exception of the source stream
    (a damaged blob, a cancelled job) is kept in `error` so the route re-raises it unwrapped."""

    def __init__(self, prefix: bytes, chunks: Iterator[bytes], suffix: bytes, size: int | None) -> None:
        self._parts = iter([prefix])
        self._chunks, self._suffix = chunks, suffix
        self._buf = b""
        self._stage = 0
        self.length = None if size is None else len(prefix) + size + len(suffix)
        self.error: BaseException | None = None

    def __len__(self) -> int:
        assert self.length is not None
        return self.length

    def _next(self) -> bytes:
        try:
            return next(self._parts)
        except StopIteration:
            pass
        if self._stage == 0:
            self._stage, self._parts = 1, self._chunks_safe()
        elif self._stage == 1:
            self._stage, self._parts = 2, iter([self._suffix])
        else:
            return b""
        return self._next()

    def _chunks_safe(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        except BaseException as exc:
            self.error = exc
            raise

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            piece = self._next()
            if not piece:
                break
            self._buf += piece
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def __iter__(self) -> Iterator[bytes]:  # chunked encoding when the length is unknown
        while True:
            piece = self._next()
            if not piece:
                return
            yield piece


class StowRoute:
    """STOW-RS to `partner.dicomweb`; see the `Route` protocol (routes.py)."""

    name = "dicomweb"

    def __init__(self, partner: "Partner", cfg: "Config") -> None:
        self.partner = partner
        self.cfg = cfg
        self.base = (partner.dicomweb or "").rstrip("/")
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "pathpacs-consult"
        if partner.ca:
            self.session.verify = str(partner.ca)
        if partner.cert and partner.key:
            self.session.cert = (str(partner.cert), str(partner.key))
        self._token: tuple[str, float] | None = None  # (access token, expiry) from client credentials
        self._lock = threading.Lock()

    # -- credentials -----------------------------------------------------------------------------
    def _bearer(self) -> str | None:
        p = self.partner
        if p.token:
            return p.token
        if p.token_file:
            try:
                return Path(p.token_file).read_text().strip()
            except OSError as exc:
                raise RouteError(f"cannot read partners.{p.name}.token_file {p.token_file}: {exc.strerror}") from None
        if p.oidc:
            return self._client_credentials()
        return None

    def _client_credentials(self) -> str:
        with self._lock:
            if self._token and self._token[1] > time.time() + 30:
                return self._token[0]
            o = self.partner.oidc or {}
            url = o.get("token_url")
            try:
                if not url:
                    disc = self.session.get(o["issuer"].rstrip("/") + "/.well-known/openid-configuration",
                                            timeout=self.partner.timeout)
                    disc.raise_for_status()
                    url = disc.json()["token_endpoint"]
                form = {"grant_type": "client_credentials", "client_id": o["client_id"],
                        "client_secret": o["client_secret"]}
                if o.get("audience"):
                    form["audience"] = o["audience"]
                if o.get("scope"):
                    form["scope"] = o["scope"]
                r = self.session.post(url, data=form, timeout=self.partner.timeout)
            except (requests.RequestException, KeyError, ValueError) as exc:
                raise RouteError(f"cannot get a token from {o.get('issuer')}: {exc}", retryable=True) from None
            if r.status_code >= 400:
                raise RouteError(f"the token endpoint {url} refused our client credentials ({r.status_code})",
                                 retryable=r.status_code >= 500)
            try:
                body = r.json()
                token = str(body["access_token"])
                expires = time.time() + float(body.get("expires_in", 300))
            except (ValueError, KeyError) as exc:
                raise RouteError(f"the token endpoint {url} answered no access_token ({exc})") from None
            self._token = (token, expires)
            return token

    def _headers(self, **extra: str) -> dict[str, str]:
        h = dict(extra)
        token = self._bearer()
        if token:
            h["Authorization"] = f"Bearer {token}"
        return h

    def _refused(self, r: requests.Response, what: str) -> RouteError:
        """A clear reason for an HTTP refusal, and whether trying again may help."""
        code = r.status_code
        detail = _reason_of(r)
        if code == 401:
            return RouteError(f"partner {self.partner.name} refused our credentials (401){detail}")
        if code == 403:
            return RouteError(f"partner {self.partner.name} does not let us {what} (403){detail}")
        if code == 409:
            return RouteError(f"partner {self.partner.name} refused it (409){detail}")
        if code == 413:
            return RouteError(f"partner {self.partner.name} refused it as too large (413){detail}")
        if code == 507:
            return RouteError(f"partner {self.partner.name} is out of disk space (507){detail}", retryable=True)
        if code >= 500:
            return RouteError(f"partner {self.partner.name} failed ({code}){detail}", retryable=True)
        return RouteError(f"partner {self.partner.name} answered {code}{detail}")

    # -- the protocol ------------------------------------------------------------------------------
    def check(self) -> str | None:
        try:
            r = self.session.get(f"{self.base}/studies", params={"limit": "1"},
                                 headers=self._headers(Accept="application/dicom+json"), timeout=self.partner.timeout)
        except RouteError as exc:
            return exc.reason
        except requests.RequestException as exc:
            return f"partner {self.partner.name} unreachable at {self.base}: {_short(exc)}"
        if r.status_code in (200, 204):
            return None
        return self._refused(r, "search").reason

    def send(self, item: Item) -> Confirmation:
        boundary = uuid.uuid4().hex
        prefix = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
        suffix = f"\r\n--{boundary}--\r\n".encode()
        size = item.size if item.chunks is not None and item.size > 0 else None
        if item.chunks is None:
            data = b"".join(item.stream())
            body = _Body(prefix, iter([data]), suffix, len(data))
        else:
            body = _Body(prefix, item.chunks(), suffix, size)
        headers = self._headers(**{"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                   "Accept": "application/dicom+json"})
        try:
            r = self.session.post(f"{self.base}/studies", data=body if body.length is not None else iter(body),
                                  headers=headers, timeout=(min(self.partner.timeout, 30), self.partner.timeout))
        except BaseException as exc:
            if body.error is not None and body.error is not exc:
                raise body.error from None
            if isinstance(exc, requests.RequestException):
                raise RouteError(f"partner {self.partner.name} unreachable: {_short(exc)}", retryable=True) from None
            raise
        if body.error is not None:
            raise body.error
        doc: dict = {}
        try:
            if r.content:
                doc = r.json()
        except ValueError:
            doc = {}
        refs = [_first(x, SOP_UID) for x in (doc.get(REFERENCED) or {}).get("Value", [])]
        if r.status_code in (200, 202) and item.sop_uid in refs:
            warning = ""
            for x in (doc.get(REFERENCED) or {}).get("Value", []):
                if _first(x, SOP_UID) == item.sop_uid and _first(x, WARNING_REASON):
                    warning = f"warning 0x{int(_first(x, WARNING_REASON)):04X}"
            return Confirmation(item.sop_uid, warning)
        failed = (doc.get(FAILED) or {}).get("Value", [])
        if failed:
            f = failed[0]
            code = _first(f, FAILURE_REASON)
            comment = _first(f, ERROR_COMMENT) or ""
            text = FAILURE_TEXT.get(int(code), "") if code is not None else ""
            reason = (f"partner {self.partner.name} refused instance {item.sop_uid}: "
                      + "; ".join(x for x in (text, comment) if x)
                      + (f" (0x{int(code):04X}, HTTP {r.status_code})" if code is not None else f" (HTTP {r.status_code})"))
            retryable = code == 0xA700 or r.status_code >= 500
            raise RouteError(reason, retryable=retryable)
        if r.status_code in (200, 202):
            raise RouteError(f"partner {self.partner.name} answered {r.status_code} without confirming instance "
                             f"{item.sop_uid}", retryable=True)
        raise self._refused(r, "store")

    def confirm(self, sop_uids: list[str], classes: dict[str, str] | None = None) -> set[str]:
        return set(sop_uids)  # each STOW response confirmed its instance

    def count(self, study_uid: str) -> int | None:
        try:
            r = self.session.get(f"{self.base}/studies", params={"StudyInstanceUID": study_uid,
                                                                 "includefield": "00201208"},
                                 headers=self._headers(Accept="application/dicom+json"), timeout=self.partner.timeout)
        except requests.RequestException as exc:
            raise RouteError(f"partner {self.partner.name} unreachable for the count: {_short(exc)}",
                             retryable=True) from None
        if r.status_code == 204 or (r.status_code == 200 and not r.content.strip()):
            return 0
        if r.status_code in (401, 403):
            log.warning("partner %s does not let us count instances (QIDO %d): delivery is confirmed per "
                        "instance only", self.partner.name, r.status_code)
            return None
        if r.status_code != 200:
            raise self._refused(r, "search")
        try:
            docs = r.json()
            return sum(int(_first(d, "00201208") or 0) for d in docs)
        except (ValueError, TypeError) as exc:
            raise RouteError(f"partner {self.partner.name} answered an unreadable QIDO response ({exc})") from None

    def close(self) -> None:
        self.session.close()


def _first(doc: dict, tag: str):
    el = doc.get(tag) or {}
    v = el.get("Value") or [None]
    return v[0]


def _reason_of(r: requests.Response) -> str:
    """The partner's own words: its Warning header, else a short text body."""
    w = r.headers.get("Warning", "")
    if '"' in w:
        return ": " + w.split('"')[1][:200]
    ctype = r.headers.get("Content-Type", "")
    if ctype.startswith("text/") and r.text.strip():
        return ": " + " ".join(r.text.split())[:200]
    if "json" in ctype:
        try:
            doc = r.json()
            comment = _first(((doc.get(FAILED) or {}).get("Value") or [{}])[0], ERROR_COMMENT)
            if comment:
                return ": " + str(comment)[:200]
        except (ValueError, AttributeError, IndexError, TypeError):
            pass
    return ""


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Connection reset", "Name or service not known",
                   "Connection aborted", "RemoteDisconnected", "Broken pipe", "CERTIFICATE_VERIFY_FAILED"):
        if marker in text:
            return marker.lower() if marker != "CERTIFICATE_VERIFY_FAILED" else "certificate verify failed"
    return " ".join(text.split())[:160]

