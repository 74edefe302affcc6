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

from archive.query import QueryError, Searcher

from . import compat
from .connections import OUTGOING_PDU_FLOOR, cap_peer_pdu
from .contexts import GET_MODELS, MOVE_MODELS
from .find_scp import query_level
from .identifiers import keys_from_identifier

if TYPE_CHECKING:
    from archive.store import Archive

log = logging.getLogger("pathpacs.dimse.retrieve")


def matching_instances(arc: "Archive", identifier, model_root: str) -> list[str]:
    level = query_level(identifier, model_root)
    keys = [k for k in keys_from_identifier(identifier) if not k.universal]
    if not keys:
        raise QueryError("a retrieve needs at least one unique key")
    searcher = Searcher(arc.index)
    sops: list[str] = []
    with arc.index.read() as txn:
        for r in searcher.search(level, keys):
            if r.level == "IMAGE":
                sops.append(r.sop)
            elif r.level == "SERIES":
                sops.extend(arc.index.instances_of_series(r.series, txn))
            elif r.level == "STUDY":
                for se in arc.index.series_of_study(r.study, txn):
                    sops.extend(arc.index.instances_of_series(se, txn))
            else:  # PATIENT
                for st in arc.index.studies_of_patient(r.patient, txn):
                    for se in arc.index.series_of_study(st, txn):
                        sops.extend(arc.index.instances_of_series(se, txn))
    return list(dict.fromkeys(sops))


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
        path = getattr(dataset, "stored_path", None)
        return original(path if path is not None else dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store
    # pynetdicom queues every outgoing P-DATA PDU without limit: when disk reads outrun the
    # network the whole file would pile up in memory. Wait while the queue is long.
    compat.throttle_sends(assoc, MAX_QUEUED_PDUS)
    assoc._pathpacs_streams = True


def _datasets(event, arc: "Archive", sops: list[str], assoc=None, sub_association: bool = False) -> Iterator:
    """Yield instances to send: the stored file, streamed, whenever the peer accepted its
    syntax; decoded to explicit VR little endian (in memory) only when the peer accepted an
    uncompressed syntax but not the stored one; converted between uncompressed syntaxes by
    pynetdicom when needed."""
    for sop in sops:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        path = arc.instance_path(sop)
        if path is None:
            log.warning("instance %s vanished during retrieve", sop)
            continue
        if sub_association:
            assoc = getattr(move_association, "current", None)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        accepted = _accepted_syntaxes(assoc, str(header.SOPClassUID))
        ts = str(header.file_meta.TransferSyntaxUID)
        if not accepted or ts in accepted:
            stream_sends(assoc)
            yield 0xFF00, StoredInstance(header, path)
            continue
        ds = pydicom.dcmread(path)
        if accepted & UNCOMPRESSED and ts not in UNCOMPRESSED:
            try:
                ds.decompress(generate_instance_uid=False)  # lossless decode keeps the UID
            except Exception as exc:
                log.warning("cannot decode %s for a peer without %s: %s", sop, ts, exc)
        yield 0xFF00, ds


def handle_get(event, arc: "Archive") -> Iterator:
    try:
        sops = matching_instances(arc, event.identifier, GET_MODELS[str(event.request.AffectedSOPClassUID)])
    except QueryError as exc:
        log.warning("C-GET refused: %s", exc)
        yield 1
        yield 0xA900, None
        return
    yield len(sops)
    yield from _datasets(event, arc, sops, event.assoc)


def move_contexts(arc: "Archive", sops: list[str]) -> list:
    """Presentation contexts for the sub-association: each (SOP class, stored syntax)."""
    wanted: dict[str, list[str]] = {}
    for sop in sops:
        rec = arc.index.instance(sop)
        if rec is None:
            continue
        syntaxes = wanted.setdefault(rec["sop_class"], [])
        if rec["ts"] not in syntaxes:
            syntaxes.append(rec["ts"])
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
        sops = matching_instances(arc, event.identifier, MOVE_MODELS[str(event.request.AffectedSOPClassUID)])
    except QueryError as exc:
        log.warning("C-MOVE refused: %s", exc)
        yield node.host, node.port
        yield 1
        yield 0xA900, None
        return
    yield node.host, node.port, {"contexts": move_contexts(arc, sops) or None}
    move_association.current = None
    yield len(sops)
    yield from _datasets(event, arc, sops, sub_association=True)
