"""Who is calling over DIMSE, for authorization and audit: the peer's principal, address and
association (the audit session), from a pynetdicom event."""
from __future__ import annotations

from archive.access import Principal

PRINCIPAL_ATTR = "pathpacs_principal"  # an association's Principal, set once it is authorized


def caller(event) -> tuple[Principal, str, str, str]:
    """(principal, peer address, calling AE title, session) of the association of `event`.

    The principal is the one set on the association (a configured node) or, until nodes are
    authorized, a node principal named by its calling AE title."""
    assoc = event.assoc
    req = assoc.requestor
    aet = str(req.ae_title or "").strip()
    address = str(req.address or "")
    who = getattr(assoc, PRINCIPAL_ATTR, None)
    if who is None:
        who = Principal(f"ae:{aet}", aet or "-", frozenset(), "node", address=address)
    return who, address, aet, session_of(event)


def session_of(event) -> str:
    """One audit session per association: the peer's address and port and the AE titles."""
    req = event.assoc.requestor
    return f"dimse {str(req.ae_title or '').strip()}@{req.address}:{req.port}#{id(event.assoc):x}"
