"""The pynetdicom AE: contexts, handlers, start/stop."""
from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from pynetdicom import AE, _config, evt

from . import receive
from .commitment import handle_n_action
from .contexts import (
    FIND_MODELS, GET_MODELS, MOVE_MODELS, STORAGE_COMMITMENT, STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES, VERIFICATION,
)
from .find_scp import handle_find
from .retrieve_scp import handle_get, handle_move, remember_association
from .store_scp import handle_store

if TYPE_CHECKING:
    from archive.store import Archive

log = logging.getLogger("pathpacs.dimse")


class DimseServer:
    """C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE and Storage Commitment on one port."""

    def __init__(self, arc: "Archive") -> None:
        self.arc = arc
        cfg = arc.config
        # Receive C-STORE data straight to disk, into our session dir on the hot tier's
        # filesystem, so ingest can rename it into place: no instance is held in memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # ...and send stored files in chunks too (C-GET/C-MOVE, see retrieve_scp.StoredInstance).
        _config.STORE_SEND_CHUNKED_DATASET = True
        receive.install(arc.tmp_dir)
        ae = AE(ae_title=cfg.aet)
        ae.maximum_pdu_size = cfg.max_pdu
        ae.maximum_associations = cfg.max_associations
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = 30
        ae.require_called_aet = cfg.require_called_aet
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            # scu_role/scp_role accept C-GET requestors' role selection for storage.
            ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for model in (*FIND_MODELS, *GET_MODELS, *MOVE_MODELS):
            ae.add_supported_context(model)
        ae.add_supported_context(STORAGE_COMMITMENT)
        ae.associate = remember_association(ae.associate)  # see retrieve_scp.move_association
        self.ae = ae
        self._server = None
        self.handlers = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, partial(handle_store, arc=arc)),
            (evt.EVT_C_FIND, partial(handle_find, arc=arc)),
            (evt.EVT_C_GET, partial(handle_get, arc=arc)),
            (evt.EVT_C_MOVE, partial(handle_move, arc=arc)),
            (evt.EVT_N_ACTION, partial(handle_n_action, arc=arc)),
        ]

    def start(self) -> None:
        cfg = self.arc.config
        self._server = self.ae.start_server(
            (cfg.host, cfg.dicom_port), block=False, evt_handlers=self.handlers
        )
        log.info("DIMSE listening on %s:%d as %s", cfg.host, cfg.dicom_port, cfg.aet)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
