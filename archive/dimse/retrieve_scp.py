"""C-GET and C-MOVE SCP: resolve the identifier to instances, then send them one by one.

Counting of completed/failed/warning sub-operations is pynetdicom's; we yield one dataset
at a time so only the instance being sent is in memory.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from archive.access import Principal
from archive.query import QueryError
from archive.records import InstanceRecord
from archive.status import ArchiveError, DimseStatus

from . import compat
from .admission import principal_of_association
from .caller import caller
from .connections import OUTGOING_PDU_FLOOR, cap_peer_pdu
from .contexts import GET_MODELS, MOVE_MODELS
from .find_scp import query_level
from .identifiers import keys_from_identifier

if TYPE_CHECKING:
    from archive.service import Archive

log = logging.getLogger("pathpacs.dimse.retrieve")


def matching_instances(arc: "Archive", identifier, model_root: str, who: Principal) -> list[InstanceRecord]:
    return arc.retrieve_set(query_level(identifier, model_root), keys_from_identifier(identifier), who=who)


UNCOMPRESSED = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
MAX_QUEUED_PDUS = 64

# pynetdicom opens the C-MOVE sub-association itself, in the thread that runs our handler;
# DimseServer wraps AE.associate to leave it here so we can see what the destination accepted.
move_association = threading.local()


def remember_association(associate, cfg=None):
    def wrapper(*args, **kwargs):
        assoc = associate(*args, **kwargs)
        move_association.current = assoc
        if cfg is not None and assoc.is_established:
            # The destination is a configured node, but a stalled one must not hold this
            # thread forever, and "unlimited" PDUs would mean a whole file in one PDU.
            compat.set_socket_timeout(assoc, cfg.network_timeout)
            cap_peer_pdu(assoc.acceptor, max(cfg.max_pdu, OUTGOING_PDU_FLOOR))
        stream_sends(assoc)
        return assoc
    return wrapper


def _accepted_syntaxes(assoc, sop_class: str) -> set[str] | None:
    """Transfer syntaxes the C-GET requestor accepted for storing `sop_class` (None: unknown)."""
    if assoc is None:
        return None
    return {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if str(cx.abstract_syntax) == sop_class}


class StoredInstance(Dataset):
    """The header of a stored instance, yielded to pynetdicom in place of the full data set.

    pynetdicom's retrieve SCPs accept only Dataset objects and would encode the whole instance
    (pixel data included) in memory; `stream_sends` makes the association send the file at
    `stored_path` instead, in chunks, as stored."""

    def __init__(self, header: Dataset, stored_path: Path) -> None:
        super().__init__(header)
        self.stored_path = stored_path


def stream_sends(assoc) -> None:
    """Make `assoc.send_c_store` send StoredInstance files straight from disk."""
    if assoc is None or getattr(assoc, "_pathpacs_streams", False):
        return
    original = assoc.send_c_store

    def send_c_store(dataset, *args, **kwargs):
        reason = getattr(dataset, "unsendable", None)
        if reason is not None:
            raise RuntimeError(f"instance not sent: {reason}")  # pynetdicom counts a failure
        path = getattr(dataset, "stored_path", None)
        try:
            return original(path if path is not None else dataset, *args, **kwargs)
        except compat.SendDamaged:
            # Part of the data set is out already: the message cannot be ended, so the
            # association is (the peer never receives the damaged instance as complete).
            log.error("aborting the association: a stored file failed its sha256 while being sent")
            assoc.abort()
            raise

    assoc.send_c_store = send_c_store
    # pynetdicom queues every outgoing P-DATA PDU without limit: when disk reads outrun the
    # network the whole file would pile up in memory. Wait while the queue is long.
    compat.throttle_sends(assoc, MAX_QUEUED_PDUS)
    assoc._pathpacs_streams = True


class UnsendableInstance(Dataset):
    """Yielded for an instance that cannot be sent (its stored bytes failed their check): the
    send fails, so pynetdicom counts a failed sub-operation and lists the UID in the
    Failed SOP Instance UID List, instead of the instance silently vanishing."""

    def __init__(self, sop: str, reason: str) -> None:
        super().__init__()
        self.SOPInstanceUID = sop
        self.unsendable = reason


def _datasets(event, arc: "Archive", recs: list[InstanceRecord], assoc=None,
              sub_association: bool = False, sent: list | None = None) -> Iterator:
    """Yield instances to send: the stored file, streamed, whenever the peer accepted its
    syntax; decoded to explicit VR little endian (in memory) only when the peer accepted an
    uncompressed syntax but not the stored one; converted between uncompressed syntaxes by
    pynetdicom when needed. Only bytes proven intact (sha256) are sent."""
    for rec in recs:
        if event.is_cancelled:
            yield DimseStatus.CANCEL, None
            return
        if sub_association:
            assoc = getattr(move_association, "current", None)
        try:
            accepted = _accepted_syntaxes(assoc, rec.sop_class)
            as_stored = not accepted or rec.ts in accepted
            # Sent as stored: hashed while pynetdicom reads the file (compat.expect_file), a
            # mismatch failing the sub-operation before its last fragment. Decoded: proven first.
            with arc.instance_file(rec, "C-GET/C-MOVE", verify_later=as_stored) as path:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                if as_stored:
                    stream_sends(assoc)
                    compat.expect_file(path, rec.sha256, rec.size,
                                       lambda what, r=rec: arc.damage(r.sop, r.blob, what, "C-GET/C-MOVE"))
                    try:
                        if sent is not None:
                            sent.append(rec)
                        yield DimseStatus.PENDING, StoredInstance(header, path)
                    finally:
                        compat.forget_file(path)
                    continue
                ds = pydicom.dcmread(path)
        except ArchiveError as exc:
            log.warning("instance %s not sent: %s", rec.sop, exc.reason)
            stream_sends(assoc)
            yield DimseStatus.PENDING, UnsendableInstance(rec.sop, exc.reason)
            continue
        if accepted & UNCOMPRESSED and rec.ts not in UNCOMPRESSED:
            try:
                ds.decompress(generate_instance_uid=False)  # lossless decode keeps the UID
            except Exception as exc:
                log.warning("cannot decode %s for a peer without %s: %s", rec.sop, rec.ts, exc)
        if sent is not None:
            sent.append(rec)
        yield DimseStatus.PENDING, ds


def _audit_sent(event, arc: "Archive", sent: list[InstanceRecord], destination: str = "") -> None:
    """One aggregated retrieve record per study of what a C-GET/C-MOVE sent."""
    who, address, aet, session = caller(event)
    for rec in sent:
        arc.audit.retrieved(who, rec.study, None, 1, 0, address, aet, session, sop=rec.sop,
                            sop_class=rec.sop_class, destination=destination)


def handle_get(event, arc: "Archive") -> Iterator:
    try:
        recs = matching_instances(arc, event.identifier, GET_MODELS[str(event.context.abstract_syntax)],
                                  principal_of_association(event.assoc))
    except QueryError as exc:
        log.warning("C-GET refused: %s", exc)
        yield 1
        yield DimseStatus.DATASET_MISMATCH, None
        return
    yield len(recs)
    sent: list[InstanceRecord] = []
    try:
        yield from _datasets(event, arc, recs, event.assoc, sent=sent)
    finally:
        _audit_sent(event, arc, sent)


def move_contexts(recs: list[InstanceRecord]) -> list:
    """Presentation contexts for the sub-association: each (SOP class, stored syntax)."""
    wanted: dict[str, list[str]] = {}
    for rec in recs:
        syntaxes = wanted.setdefault(rec.sop_class, [])
        if rec.ts not in syntaxes:
            syntaxes.append(rec.ts)
    # One context per stored syntax, plus one uncompressed fallback per class: the destination
    # accepts or rejects each on its own, so compressed bytes go as they are wherever possible.
    contexts = []
    for sop_class, syntaxes in wanted.items():
        for ts in syntaxes:
            if ts not in UNCOMPRESSED:
                contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    return contexts[:128]


def handle_move(event, arc: "Archive") -> Iterator:
    node = arc.config.node_by_aet(str(event.move_destination).strip())
    if node is None:
        log.warning("C-MOVE to unknown destination %r", event.move_destination)
        yield None, None
        return
    try:
        recs = matching_instances(arc, event.identifier, MOVE_MODELS[str(event.context.abstract_syntax)],
                                  principal_of_association(event.assoc))
    except QueryError as exc:
        log.warning("C-MOVE refused: %s", exc)
        yield node.host, node.port
        yield 1
        yield DimseStatus.DATASET_MISMATCH, None
        return
    yield node.host, node.port, {"contexts": move_contexts(recs) or None}
    move_association.current = None
    yield len(recs)
    sent: list[InstanceRecord] = []
    try:
        yield from _datasets(event, arc, recs, sub_association=True, sent=sent)
    finally:
        _audit_sent(event, arc, sent, destination=node.aet)
