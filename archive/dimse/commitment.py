"""Storage Commitment Push Model SCP (PS3.4 J).

N-ACTION is answered at once; the verdict is sent as N-EVENT-REPORT from a worker thread:
on the same association if the requester keeps it open, otherwise on a new association to
the requester's node from [nodes.*]. The verdict is truthful: an instance is committed only
if its record is committed and its blob re-hashes to the recorded sha256 right now.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role

from archive.status import DimseStatus

from .contexts import STORAGE_COMMITMENT

if TYPE_CHECKING:
    from archive.service import Archive

log = logging.getLogger("pathpacs.dimse.commitment")
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance


def verdict(arc: "Archive", request: Dataset) -> tuple[int, Dataset]:
    """Check every referenced instance now; returns (event type 1|2, event information)."""
    ok, failed = [], []
    for item in request.get("ReferencedSOPSequence", []):
        sop_class = str(item.get("ReferencedSOPClassUID", ""))
        sop = str(item.get("ReferencedSOPInstanceUID", ""))
        rec = arc.instance(sop) if sop else None
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop
        if rec is None:
            ref.FailureReason = DimseStatus.NO_SUCH_OBJECT_INSTANCE
        elif rec.sop_class != sop_class:
            ref.FailureReason = DimseStatus.CLASS_INSTANCE_CONFLICT
        else:
            problem = arc.check(rec)
            if problem is not None:
                log.error("commitment refused for %s: blob %s", sop, problem)
                ref.FailureReason = DimseStatus.PROCESSING_FAILURE
        (failed if "FailureReason" in ref else ok).append(ref)
    info = Dataset()
    info.TransactionUID = request.TransactionUID
    info.RetrieveAETitle = arc.config.aet
    if ok:
        info.ReferencedSOPSequence = Sequence(ok)
    if failed:
        info.FailedSOPSequence = Sequence(failed)
    return (2 if failed else 1), info


def handle_n_action(event, arc: "Archive"):
    req = event.request
    if str(req.RequestedSOPClassUID) != STORAGE_COMMITMENT or req.ActionTypeID != 1:
        return DimseStatus.NO_SUCH_ACTION_TYPE, None
    info = event.action_information
    if "TransactionUID" not in info or "ReferencedSOPSequence" not in info:
        return DimseStatus.MISSING_ATTRIBUTE, None
    requester = event.assoc.requestor.ae_title
    threading.Thread(
        target=_report, args=(arc, event.assoc, requester, info), daemon=True,
        name=f"commitment-{info.TransactionUID}",
    ).start()
    return DimseStatus.SUCCESS, None


def _report(arc: "Archive", assoc, requester: str, request: Dataset) -> None:
    try:
        event_type, info = verdict(arc, request)
    except Exception:
        log.exception("storage commitment check failed")
        return
    time.sleep(0.05)  # let the N-ACTION response leave first, then use the association if it's up
    if assoc.is_established:
        try:
            status, _reply = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
            if status and status.get("Status", 0xFFFF) == 0:
                log.info("commitment %s reported on the same association", info.TransactionUID)
                return
        except Exception as exc:
            log.info("same-association report failed (%s); trying a new association", exc)
    node = arc.config.node_by_aet(requester)
    if node is None:
        log.error("cannot report commitment %s: requester %r is not a configured node",
                  info.TransactionUID, requester)
        return
    ae = AE(ae_title=arc.config.aet)
    ae.add_requested_context(STORAGE_COMMITMENT)
    role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    for attempt in range(3):
        new = ae.associate(node.host, node.port, ae_title=node.aet, ext_neg=[role])
        if new.is_established:
            try:
                status, _reply = new.send_n_event_report(info, event_type, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
                log.info("commitment %s reported to %s: %s", info.TransactionUID, node.aet,
                         status.get("Status") if status else "no response")
            finally:
                new.release()
            return
        time.sleep(1 + attempt)
    log.error("could not deliver commitment %s to %s", info.TransactionUID, node.aet)
