"""`pathpacs partner check`: is each route of a partner reachable, and may we store there?

One line per route, saying what fails. Nothing is stored by a check:
- DICOMweb read: QIDO `GET /studies?limit=1` (the STOW route's own `check`): DNS, refused
  connection, TLS verification, 401 (credentials), 403 (no read right).
- DICOMweb store: a STOW-RS `POST /studies` of an empty multipart/related body (no part, only
  the closing boundary). It goes through the partner's authentication and authorization like
  a real STOW and holds nothing to store, so any archive answers it without storing: 401 means
  our credentials are refused, 403 that they lack the right to store, 404/405 that there is no
  STOW-RS at that URL; anything else (200, 204, 400, 409, 415: the STOW handler looked at the
  empty body) means a STOW with these credentials reaches the store. This works the same for
  pathpacs, Orthanc and any DICOMweb server, with no partner-specific endpoint.
- DIMSE: a TCP (and TLS) connection, an association proposing Verification, VL Whole Slide
  Microscopy Image Storage and (with `commitment`) Storage Commitment, and a C-ECHO: DNS,
  refused connection, TLS, association rejected (with the partner's reason), C-ECHO status,
  storage or commitment not accepted.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .routes import RouteError

if TYPE_CHECKING:
    from archive.config import Config, Partner


@dataclass(frozen=True)
class RouteCheck:
    route: str  # "dicomweb read" | "dicomweb store" | "dimse"
    target: str
    problem: str | None  # None: passes

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        return f"{self.route:<15} {self.target}: {'ok' if self.ok else 'FAILS: ' + self.problem}"


def check_stow_permission(route) -> str | None:
    """The empty STOW probe (see the module docstring) on a `StowRoute`."""
    import requests

    boundary = uuid.uuid4().hex
    try:
        headers = route._headers(**{
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        r = route.session.post(f"{route.base}/studies", data=f"--{boundary}--\r\n".encode(), headers=headers,
                               timeout=min(route.partner.timeout, 30))
    except RouteError as exc:
        return exc.reason
    except requests.RequestException as exc:
        return f"unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    name = route.partner.name
    if r.status_code == 401:
        return f"partner {name} refused our credentials for STOW-RS (401)"
    if r.status_code == 403:
        return f"our credentials may not store at partner {name} (403: the token lacks the STOW right)"
    if r.status_code in (404, 405):
        return f"no STOW-RS at {route.base}/studies ({r.status_code})"
    if r.status_code >= 500 and r.status_code != 507:
        return f"partner {name} failed the STOW probe ({r.status_code})"
    return None


def check_partner(partner: "Partner", cfg: "Config") -> list[RouteCheck]:
    """Every route of `partner`, checked."""
    out: list[RouteCheck] = []
    if partner.dicomweb:
        from .stow_route import StowRoute

        route = StowRoute(partner, cfg)
        try:
            # read (the delivery's final count is a QIDO) and store are separate rights
            out.append(RouteCheck("dicomweb read", partner.dicomweb, route.check()))
            out.append(RouteCheck("dicomweb store", partner.dicomweb, check_stow_permission(route)))
        finally:
            route.close()
    if partner.has_dimse:
        from .dimse_route import DimseRoute

        target = f"{partner.aet}@{partner.host}:{partner.port}{' TLS' if partner.tls else ''}"
        try:
            route = DimseRoute(partner, cfg)
        except RouteError as exc:
            out.append(RouteCheck("dimse", target, exc.reason))
        else:
            out.append(RouteCheck("dimse", target, route.check()))
    if not out:
        out.append(RouteCheck("-", partner.name, "no route configured (set dicomweb, or aet/host/port)"))
    return out
