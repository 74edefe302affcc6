"""The pynetdicom AE: contexts, handlers, start/stop, and the connection guard."""
from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from pynetdicom import AE, evt

from archive import tls
from archive.consult.commitment_scu import handle_n_event_report

from . import compat, receive
from .admission import Admission
from .commitment import handle_n_action
from .caller import session_of
from .connections import Connections
from .contexts import (
    FIND_MODELS, GET_MODELS, MOVE_MODELS, STORAGE_COMMITMENT, STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES, VERIFICATION,
)
from .find_scp import handle_find
from .retrieve_scp import handle_get, handle_move, remember_association
from .store_scp import handle_store

if TYPE_CHECKING:
    from archive.service import Archive

log = logging.getLogger("pathpacs.dimse")


class ArchiveAE(AE):
    """An AE whose association limit counts only associations whose A-ASSOCIATE-RQ arrived.

    pynetdicom refuses an association (local limit exceeded) when more acceptor threads are
    alive than `maximum_associations`, counting connections still waiting for their
    A-ASSOCIATE-RQ; those are bounded by `max_pending` and `acse_timeout` instead, so the limit
    reported here is the configured one plus the number of them."""

    connections: Connections | None = None

    @property
    def maximum_associations(self) -> int:
        limit = AE.maximum_associations.fget(self)
        return limit + (self.connections.awaiting_request() if self.connections is not None else 0)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)


def _end_session(event, arc: "Archive") -> None:
    arc.audit.end_session(session_of(event))


def _rejected(event, arc: "Archive") -> None:
    """An association pynetdicom refused (called AE title, limits): a Security Alert. The
    admission's own refusals are audited where they are decided (`Admission.refuse`)."""
    if getattr(event.assoc, "pathpacs_refused", False):
        return
    req = event.assoc.requestor
    primitive = getattr(req, "primitive", None)
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    cfg = arc.config
    if cfg.require_called_aet and called and called != cfg.aet:
        reason = f"called AE title {called!r} is not {cfg.aet!r} (dimse.require_called_aet)"
    else:
        reason = "refused by the archive (association limit, or not allowed)"
    arc.audit.association_rejected(str(req.ae_title or "").strip(), str(req.address or ""), reason,
                                   called_aet=called)


class DimseServer:
    """C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE and Storage Commitment on the plain port and/or
    the TLS port (`tls_port`), both through the same admission (calling-AE allow-list)."""

    def __init__(self, arc: "Archive") -> None:
        compat.check_version()
        self.arc = arc
        cfg = arc.config
        # Receive C-STORE data straight to disk, into our session dir on the hot tier's
        # filesystem, so ingest can rename it into place: no instance is held in memory;
        # send stored files in chunks too (C-GET/C-MOVE, see retrieve_scp.StoredInstance).
        compat.configure()
        compat.verify_sent_files()
        receive.install(arc.tmp_dir)
        self.connections = Connections(cfg)
        ae = ArchiveAE(ae_title=cfg.aet)
        ae.connections = self.connections
        ae.maximum_pdu_size = cfg.max_pdu
        ae.maximum_associations = cfg.max_associations
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = cfg.acse_timeout
        ae.require_called_aet = cfg.require_called_aet
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            # scu_role/scp_role accept C-GET requestors' role selection for storage.
            ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for model in (*FIND_MODELS, *GET_MODELS, *MOVE_MODELS):
            ae.add_supported_context(model)
        # scu_role/scp_role: a partner reporting our commitment requests back (N-EVENT-REPORT on a
        # new association) proposes the SCP role; see archive/consult/commitment_scu.py.
        ae.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        ae.associate = remember_association(ae.associate, cfg)  # see retrieve_scp.move_association
        self.ae = ae
        self._server = None
        self._listening: list = []
        # Every refusal goes to the audit trail when the archive has one (issue 10).
        audit = getattr(getattr(arc, "audit", None), "association_rejected", None)
        self.admission = Admission(cfg, audit)
        self.ssl_context = tls.server_context(cfg) if cfg.tls_port else None
        self.handlers = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, partial(handle_store, arc=arc)),
            (evt.EVT_C_FIND, partial(handle_find, arc=arc)),
            (evt.EVT_C_GET, partial(handle_get, arc=arc)),
            (evt.EVT_C_MOVE, partial(handle_move, arc=arc)),
            (evt.EVT_N_ACTION, partial(handle_n_action, arc=arc)),
            (evt.EVT_N_EVENT_REPORT, partial(handle_n_event_report, arc=arc)),  # our commitment requests
            *self.connections.handlers,
            *self.admission.handlers,  # after the connection registry has seen the A-ASSOCIATE-RQ
            # audit: an association's aggregated records are written when it ends; refusals
            (evt.EVT_RELEASED, partial(_end_session, arc=arc)),
            (evt.EVT_ABORTED, partial(_end_session, arc=arc)),
            (evt.EVT_REJECTED, partial(_rejected, arc=arc)),
        ]

    def _listen(self, port: int, ssl_context=None):
        cfg = self.arc.config
        server = self.ae.start_server(
            (cfg.host, port), block=False, evt_handlers=self.handlers,
            contexts=compat.cheap_copy_contexts(self.ae.supported_contexts), ssl_context=ssl_context,
        )
        self._listening.append(server)
        if ssl_context is not None:
            tls.deferred_handshake(server, ssl_context,
                                   lambda address, reason: self.admission.refuse("", address, reason))
        # socketserver's hook, called for each accepted socket before its thread starts.
        server.verify_request = self.connections.verify_request
        # socketserver listens with a backlog of 5: a burst of connections (or a few idle
        # ones while the accept loop is busy) would have the rest wait for SYN retransmits.
        server.socket.listen(max(128, min(cfg.max_pending, 4096)))
        return server

    @property
    def listeners(self) -> list[str]:
        """What `serve` says it runs: "11112 (plain)", "2762 (TLS)"."""
        cfg = self.arc.config
        return ([f"{cfg.dicom_port} (plain)"] if cfg.dimse_plain else []) + \
               ([f"{cfg.tls_port} (TLS{', client certificate required' if cfg.tls_require_client_cert else ''})"]
                if cfg.tls_port else [])

    def start(self) -> None:
        cfg = self.arc.config
        if cfg.dimse_plain:
            self._server = self._listen(cfg.dicom_port)
        if cfg.tls_port:
            try:
                self._listen(cfg.tls_port, self.ssl_context)
            except OSError:
                self.stop()
                raise
        self.connections.start()
        log.info("DIMSE listening on %s port %s as %s (max %d associations, %d negotiating; max PDU %d; "
                 "acse_timeout %g s, network_timeout %g s; %s)", cfg.host, " and ".join(self.listeners), cfg.aet,
                 cfg.max_associations, cfg.max_pending, cfg.max_pdu, cfg.acse_timeout, cfg.network_timeout,
                 "unknown calling AEs accepted" if cfg.accepts_unknown_ae else
                 f"calling AEs: {len(cfg.nodes)} configured node(s) only")

    def stop(self) -> None:
        for server in self._listening:
            server.shutdown()  # no new connections
        self._listening.clear()
        self._server = None
        self.connections.stop()
        self.connections.close_all()
        compat.restore()
