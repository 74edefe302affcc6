"""Who may associate over DIMSE, and what each calling node may ask for.

The decision is here, once, for every listener (plain and TLS):
- `Admission.admit(calling_aet, address, certificate)`: the calling AE must be a `[nodes.*]`
  entry unless unknown AEs are accepted (`Config.accepts_unknown_ae`: by default only while no
  node is declared); a node with `check_host` must call from its host's address; a client
  certificate that maps to a node (`cert_cn`, archive.tls) binds the association to that
  node's AE title. Refused associations get A-ASSOCIATE-RJ (permanent, service user, calling
  AE title not recognised).
- `node_allows(node, service)`: the node's `allow` list; an accepted unknown AE may store,
  find, get, move and commit, never send rejection notes.
- Each admitted association carries its `Principal` (`principal_of_association`), for handlers
  to pass to the archive API; a request for a service the node may not use is answered
  0x0124 (Refused: Not Authorized) before any handler runs (compat.gate_requests).
Every refusal, of an association or of a request, goes through `Admission.refuse`: one log line
and the audit trail's `association_rejected` (through `Admission.audit`).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable

from archive.access import Forbidden, Principal
from archive.status import DimseStatus

from . import compat
from .contexts import STORAGE_COMMITMENT

if TYPE_CHECKING:
    from archive.config import Config, Node

log = logging.getLogger("pathpacs.dimse.admission")

# The services an accepted calling AE that is no configured node may use.
UNKNOWN_AE_SERVICES = frozenset({"store", "find", "get", "move", "commit"})
# Roles of a node's principal, from its allow list.
SERVICE_ROLES = {"find": "viewer", "get": "viewer", "move": "viewer", "store": "uploader",
                 "commit": "uploader", "reject": "sysadmin"}
# A-ASSOCIATE-RJ: rejected-permanent, DICOM UL service-user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


class Refused(Forbidden):
    """An association that is not admitted; the reason is logged and audited, never sent."""


def node_allows(node: "Node | None", service: str) -> bool:
    """Whether `node` (None: an accepted unknown AE) may use `service` ("store", "find", ...)."""
    if node is None:
        return service in UNKNOWN_AE_SERVICES
    return service in node.allow


def principal_for(node: "Node | None", calling_aet: str, address: str) -> Principal:
    """The principal of an association from `node` (None: an unknown AE accepted by config)."""
    if node is None:
        return Principal(f"ae:{calling_aet}", calling_aet, frozenset({"viewer", "uploader"}), "node",
                         address=address)
    roles = frozenset(SERVICE_ROLES[s] for s in node.allow if s in SERVICE_ROLES)
    return Principal(node.name, f"{node.name} ({node.aet})", roles, "node", address=address)


def principal_of_association(assoc) -> Principal:
    """The principal admitted for `assoc` (set at A-ASSOCIATE-RQ by `Admission`)."""
    principal = getattr(assoc, "pathpacs_principal", None)
    if principal is None:  # an association the admission did not see (our own, as requestor)
        raise Forbidden("association without an admitted principal")
    return principal


def service_of(msg) -> str | None:
    """The allow-list service a DIMSE request asks for; None for those always allowed (C-ECHO)."""
    from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE, N_ACTION

    if isinstance(msg, C_STORE):
        return "store"
    if isinstance(msg, C_FIND):
        return "find"
    if isinstance(msg, C_GET):
        return "get"
    if isinstance(msg, C_MOVE):
        return "move"
    if isinstance(msg, N_ACTION) and str(msg.RequestedSOPClassUID) == STORAGE_COMMITMENT:
        return "commit"
    return None


def _addresses(host: str) -> set[str]:
    """Every address `host` (an IP or a name) resolves to; empty if it does not resolve."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {str(ipaddress.ip_address(info[4][0])) for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):
        return set()


def _same_address(peer: str, addresses: set[str]) -> bool:
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip) in addresses


class Admission:
    """The admission decisions of one DIMSE server (see the module docstring)."""

    def __init__(self, cfg: "Config", audit: Callable[[str, str, str], None] | None = None) -> None:
        self.cfg = cfg
        # Called as audit(calling_aet, address, reason) for every refusal: the audit trail's
        # `association_rejected` when the archive has one (see DimseServer).
        self.audit: Callable[[str, str, str], None] = audit or (lambda calling, address, reason: None)

    def refuse(self, calling_aet: str, address: str, reason: str) -> None:
        """The one place every refusal goes through: a log line, then the audit hook."""
        log.warning("refused %s from %s: %s", calling_aet or "-", address or "-", reason)
        try:
            self.audit(calling_aet, address, reason)
        except Exception:
            log.exception("audit of a refused association failed")

    def admit(self, calling_aet: str, address: str, certificate: dict[str, Any] | None = None) -> "Node | None":
        """The node `calling_aet` calling from `address` is, None for an accepted unknown AE;
        raises Refused. `certificate`: the verified TLS client certificate, if any."""
        from archive.tls import node_of_certificate

        calling_aet = calling_aet.strip()
        by_cert = node_of_certificate(self.cfg, certificate)
        if by_cert is not None and by_cert.aet != calling_aet:
            raise Refused(f"calling AE {calling_aet!r} is not {by_cert.aet!r}, the AE of node {by_cert.name!r} "
                          "its client certificate belongs to")
        node = by_cert or self.cfg.node_by_aet(calling_aet)
        if node is None:
            if not self.cfg.accepts_unknown_ae:
                raise Refused(f"calling AE {calling_aet!r} is not a configured node")
            return None
        if node.check_host and not _same_address(address, _addresses(node.host)):
            raise Refused(f"calling AE {calling_aet!r} (node {node.name!r}) called from {address}, "
                          f"not from its host {node.host}")
        return node

    # -- pynetdicom wiring ----------------------------------------------------------------

    @property
    def handlers(self) -> list:
        from pynetdicom import evt

        return [(evt.EVT_REQUESTED, self._on_requested)]

    def _on_requested(self, event) -> None:
        from pynetdicom import evt

        assoc = event.assoc
        primitive = assoc.requestor.primitive  # the A-ASSOCIATE-RQ
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        address = str(assoc.requestor.address)
        try:
            node = self.admit(calling, address, compat.peer_certificate(assoc))
        except Refused as exc:
            self.refuse(calling, address, exc.reason)
            assoc.pathpacs_refused = True  # audited here: the EVT_REJECTED audit handler skips it
            # As pynetdicom's own refusals do: the A-ASSOCIATE-RJ, then wait until it has left
            # (the DUL back to idle) before the reactor closes the socket.
            assoc.acse.send_reject(*REJECT_CALLING_AE)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        assoc.pathpacs_node = node
        assoc.pathpacs_principal = principal_for(node, calling, address)
        compat.gate_requests(assoc, lambda msg: self._check_request(assoc, node, calling, address, msg))

    def _check_request(self, assoc, node: "Node | None", calling: str, address: str, msg) -> int | None:
        service = service_of(msg)
        if service is None or node_allows(node, service):
            return None
        who = f"node {node.name!r}" if node is not None else "an unknown AE"
        self.refuse(calling, address, f"{msg.msg_type} refused (0x0124): {who} may not {service}")
        if service == "store":  # its data set is already spooled: delete it now
            spool = compat.request_spool(msg)
            if spool is not None:
                spool.finished()
                spool.discard()
        return DimseStatus.NOT_AUTHORIZED
