"""C-STORE SCP: the received file (streamed to disk by receive.SpoolFile, hashed on the way)
is handed to the one ingest function, which answers with the DIMSE status."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from archive.ingest import OUT_OF_RESOURCES, ingest

from .receive import SpoolFile

if TYPE_CHECKING:
    from archive.store import Archive

log = logging.getLogger("pathpacs.dimse.store")


def handle_store(event, arc: "Archive") -> int:
    spool: SpoolFile = event.request._dataset_file  # see receive.py; still open here
    state = spool.finished()
    if state.error is not None:
        Path(event.dataset_path).unlink(missing_ok=True)
        log.warning("C-STORE from %s refused: cannot write received data: %s",
                    event.assoc.requestor.ae_title, state.error)
        return OUT_OF_RESOURCES
    result = ingest(
        arc, Path(event.dataset_path), take_ownership=True, sha256=state.sha256,
        origin="c-store", calling_aet=event.assoc.requestor.ae_title,
        expected_sop_class=str(event.request.AffectedSOPClassUID),
    )
    return result.dimse_status
