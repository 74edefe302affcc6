"""C-STORE SCP: the received file (streamed to disk by receive.SpoolFile, hashed on the way)
is handed to the one ingest function, which answers with the DIMSE status.

The SOP class that counts is the accepted presentation context's abstract syntax: the command's
Affected SOP Class UID must name it, and ingest checks the data set's SOP Class UID against it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from archive.status import DimseStatus

from . import compat
from .admission import node_allows, principal_of_association
from .caller import caller
from .receive import SpoolFile

if TYPE_CHECKING:
    from archive.service import Archive

log = logging.getLogger("pathpacs.dimse.store")


def handle_store(event, arc: "Archive") -> int:
    spool: SpoolFile = compat.request_spool(event.request)  # see receive.py; still open here
    state = spool.finished()
    calling = event.assoc.requestor.ae_title
    context_class = str(event.context.abstract_syntax)
    command_class = str(event.request.AffectedSOPClassUID or "")
    if state.error is not None or command_class != context_class:
        Path(event.dataset_path).unlink(missing_ok=True)
        who, address, aet, session = caller(event)
        arc.audit.stored(who, None, None, context_class, str(event.request.AffectedSOPInstanceUID or ""), address,
                         aet, "minor failure", session=session,
                         reason="cannot write received data" if state.error is not None else "SOP class mismatch")
        if state.error is not None:
            log.warning("C-STORE from %s refused: cannot write received data: %s", calling, state.error)
            return DimseStatus.OUT_OF_RESOURCES
        log.warning("C-STORE from %s refused (0xA900): Affected SOP Class UID %s is not the presentation "
                    "context's %s", calling, command_class[:64], context_class)
        return DimseStatus.DATASET_MISMATCH
    result = arc.ingest(
        Path(event.dataset_path), take_ownership=True, sha256=state.sha256,
        origin="c-store", calling_aet=calling, expected_sop_class=context_class,
        # the node's principal (its `allow` decides what it may store); a node allowed
        # "reject" has the rejection notes it sends honoured (IHE IOCM)
        who=principal_of_association(event.assoc),
        may_reject=node_allows(getattr(event.assoc, "pathpacs_node", None), "reject"),
    )
    who, address, aet, session = caller(event)
    arc.audit.stored(who, result.study_uid, None, result.sop_class_uid or context_class,
                     result.sop_instance_uid or str(event.request.AffectedSOPInstanceUID or ""), address, aet,
                     "success" if result.ok else "minor failure", session=session, reason=result.reason or "")
    return result.dimse_status
