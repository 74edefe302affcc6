"""The DIMSE route to a partner: C-STORE per instance, Storage Commitment, C-ECHO, C-FIND count.

pynetdicom as SCU. Every instance is sent from a file, in chunks of the partner's PDU size, as
stored (pynetdicom's chunked file sends: the data set is never decoded or held in memory; the
presentation context proposed is the instance's SOP class in its stored transfer syntax, so
nothing is transcoded). The `Item` gives Part 10 bytes as a stream (from any tier, maybe
de-identified on the fly), so they are spooled to a file under the data directory first.

C-STORE statuses map to `RouteError`: 0xA7xx (out of resources) and 0x0213 are retryable,
0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand), 0x0122 / 0x0124 are
not; a lost association or a timeout is retryable. With `commitment = true` a C-STORE success
is only "stored" (`Confirmation.committed = False`): `confirm` sends the N-ACTION and waits for
the N-EVENT-REPORT (see `commitment_scu`: same association, our DIMSE server, or a listener).
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.dimse import compat
from archive.dimse.contexts import STORAGE_COMMITMENT, VERIFICATION

from . import commitment_scu
from .commitment_scu import PENDING, Listener, Report
from .routes import Confirmation, Item, RouteError

if TYPE_CHECKING:
    from archive.config import Config, Partner
    from archive.service import Archive

log = logging.getLogger("pathpacs.consult.dimse")
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
MAX_QUEUED_PDUS = 64  # outgoing PDUs queued per association (pynetdicom's queue is unbounded)
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
            0xB007: "data set does not match SOP class (stored anyway)"}


def store_error(code: int, comment: str = "") -> RouteError | None:
    """The RouteError of a C-STORE response status; None for success and warnings."""
    if code == 0x0000 or code in WARNINGS:
        return None
    extra = f": {comment}" if comment else ""
    if 0xA700 <= code <= 0xA7FF or code == 0x0213:
        return RouteError(f"partner out of resources (C-STORE status 0x{code:04X}){extra}", retryable=True)
    if 0xA900 <= code <= 0xA9FF:
        what = "data set does not match SOP class"
    elif 0xC000 <= code <= 0xCFFF:
        what = "partner cannot understand the data set"
    elif code == 0x0122:
        what = "SOP class not supported by the partner"
    elif code == 0x0124:
        what = "not authorized by the partner"
    elif code == 0x0117:
        what = "invalid SOP instance"
    else:
        what = "refused"
    return RouteError(f"{what} (C-STORE status 0x{code:04X}){extra}", retryable=False)


def client_context(partner: "Partner") -> ssl.SSLContext:
    """TLS to the partner: its CA (else the system store), our certificate for mutual TLS."""
    ctx = ssl.create_default_context(cafile=str(partner.ca) if partner.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if partner.cert is not None:
        ctx.load_cert_chain(str(partner.cert), str(partner.key) if partner.key else None)
    return ctx


def reach(host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> str | None:
    """Why a TCP (and TLS) connection to host:port fails, in one line; None when it works."""
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror})"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if tls is not None:
                try:
                    with tls.wrap_socket(raw, server_hostname=host):
                        pass
                except ssl.SSLCertVerificationError as exc:
                    return f"TLS certificate verify failed at {host}:{port}: {exc.verify_message or exc.reason}"
                except ssl.SSLError as exc:
                    return f"TLS handshake failed at {host}:{port}: {exc.reason or exc}"
                except OSError as exc:  # reset or closed mid-handshake: no TLS on that port
                    return (f"TLS handshake failed at {host}:{port}: {exc.strerror or exc} "
                            "(does the partner speak TLS on this port?)")
    except ConnectionRefusedError:
        return f"connection refused at {host}:{port}"
    except (TimeoutError, socket.timeout):
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    return None


class DimseRoute:
    """C-STORE (+ Storage Commitment) to `partner`'s AE; one association, reused while it lasts.
    `archive` (optional) lets a commitment report taken by this archive's DIMSE server in
    another process reach this one (through the index's "commitments" table)."""

    name = "dimse"

    def __init__(self, partner: "Partner", cfg: "Config", archive: "Archive | None" = None) -> None:
        if not (partner.aet and partner.host and partner.port):
            raise RouteError(f"partner {partner.name}: the DIMSE route needs aet, host and port")
        self.partner, self.cfg, self.archive = partner, cfg, archive
        self._assoc = None
        self._wanted: set[tuple[str, str]] = set()  # (SOP class, transfer syntax) to propose
        self._accepted: set[tuple[str, str]] = set()
        self._classes: dict[str, str] = {}  # sent SOP Instance UID -> SOP Class UID (for commitment)
        self.refused: dict[str, str] = {}  # SOP Instance UID -> why the commitment failed
        self._spool_dir = Path(cfg.data_dir) / "consult-spool"
        self._swept = False

    # -- connection ------------------------------------------------------------------------
    @property
    def where(self) -> str:
        p = self.partner
        return f"{p.aet}@{p.host}:{p.port}{' (TLS)' if p.tls else ''}"

    def _tls(self) -> ssl.SSLContext | None:
        if not self.partner.tls:
            return None
        try:
            return client_context(self.partner)
        except (OSError, ssl.SSLError) as exc:
            raise RouteError(f"partner {self.partner.name}: cannot load TLS files: {exc}") from None

    def _associate(self, contexts: list[tuple[str, list[str]]]):
        """An association with these contexts (+ Storage Commitment); RouteError with the reason."""
        p, cfg = self.partner, self.cfg
        ae = AE(ae_title=cfg.aet)
        ae.acse_timeout = min(p.timeout, 30)
        ae.dimse_timeout = p.timeout
        ae.network_timeout = p.timeout
        ae.connection_timeout = min(p.timeout, 30)
        ae.maximum_pdu_size = cfg.max_pdu
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        if p.commitment:
            ae.add_requested_context(STORAGE_COMMITMENT)
        tls = self._tls()
        # pynetdicom 3.0 reports an association as aborted when the partner's A-ASSOCIATE-RJ and its
        # closing of the connection both land before the requesting thread looks at the socket
        # (1 in 10 against Orthanc here, more under load): the reject PDU it decoded is kept from the event.
        rejects: list[A_ASSOCIATE_RJ] = []
        assoc = ae.associate(p.host, p.port, ae_title=p.aet,
                             tls_args=(tls, p.host) if tls is not None else None,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, commitment_scu.on_report),
                                           (evt.EVT_PDU_RECV, lambda event: rejects.append(event.pdu)
                                            if isinstance(event.pdu, A_ASSOCIATE_RJ) else None)])
        if assoc.is_established:
            return assoc
        if assoc.is_rejected or rejects:
            rsp = assoc.acceptor.primitive if assoc.is_rejected else rejects[0].to_primitive()
            transient = getattr(rsp, "result", None) == 2
            reason = f"association rejected by {self.where}: {rsp.reason_str} ({rsp.result_str}, {rsp.source_str})" \
                if rsp is not None else f"association rejected by {self.where}"
            raise RouteError(reason, retryable=transient)
        problem = reach(p.host, p.port, min(p.timeout, 10), tls)
        if problem is not None:
            raise RouteError(problem, retryable=True)
        raise RouteError(f"association with {self.where} aborted or timed out (check the partner's AE title "
                         f"{p.aet!r} and that it accepts our AE title {cfg.aet!r})", retryable=True)

    def _storage_association(self, sop_class: str, ts: str, *alternatives: str):
        """An association with (sop_class, ts) accepted (or one of the alternative syntaxes:
        a data set built here can be encoded in any of them)."""
        keys = [(sop_class, t) for t in (ts, *alternatives)]
        if self._assoc is not None and self._assoc.is_established and any(k in self._accepted for k in keys):
            return self._assoc
        if all(k in self._wanted for k in keys) and self._assoc is not None and self._assoc.is_established:
            raise RouteError(f"{self.where} does not accept {UID(sop_class).name} in {UID(ts).name}")
        self._wanted.update(keys)
        self.close()
        wanted = sorted(self._wanted)[:120]  # at most 128 contexts per association
        assoc = self._associate([(c, [t]) for c, t in wanted])
        compat.throttle_sends(assoc, MAX_QUEUED_PDUS)
        self._assoc = assoc
        self._accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        if not any(k in self._accepted for k in keys):
            raise RouteError(f"{self.where} does not accept {UID(sop_class).name} in {UID(ts).name}")
        return assoc

    def close(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:  # a dead link: nothing to release
                pass
            self._assoc = None

    # -- sending ---------------------------------------------------------------------------
    def _sweep_spool(self) -> None:
        """Spool files of dead processes (a crash mid-send) go."""
        for f in self._spool_dir.glob("*.dcm"):
            pid = f.name.split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                f.unlink(missing_ok=True)

    def _spool(self, item: Item) -> Path:
        if not self._swept:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            self._sweep_spool()
            self._swept = True
        fd, name = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".dcm", dir=self._spool_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in item.stream():
                    out.write(chunk)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def send(self, item: Item) -> Confirmation:
        compat.chunked_file_sends()
        path = None
        try:
            alternatives: tuple[str, ...] = ()
            if item.dataset is not None:  # a document built here (the request SR): little endian, either VR
                ds = item.dataset
                meta = getattr(ds, "file_meta", None)
                if meta is None or "TransferSyntaxUID" not in meta:
                    from pydicom.dataset import FileMetaDataset

                    ds = ds.copy()
                    ds.file_meta = FileMetaDataset()
                    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ts = str(ds.file_meta.TransferSyntaxUID)
                alternatives = tuple(t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != ts)
                payload = ds
                sop_class = str(ds.SOPClassUID)
            else:
                try:
                    path = self._spool(item)
                except RouteError:
                    raise
                except Exception as exc:  # the archive's read failed (damaged, unavailable)
                    raise RouteError(f"cannot read {item.sop_uid}: {getattr(exc, 'reason', exc)}",
                                     retryable=getattr(exc, "retryable", False)) from None
                meta = read_file_meta_info(path)
                ts = str(meta.TransferSyntaxUID)
                sop_class = str(meta.MediaStorageSOPClassUID)
                payload = path
            assoc = self._storage_association(sop_class, ts, *alternatives)
            try:
                status = assoc.send_c_store(payload)
            except (RuntimeError, ValueError, OSError) as exc:
                self.close()
                raise RouteError(f"C-STORE of {item.sop_uid} to {self.where} failed: {exc}", retryable=True) from None
            if not status or "Status" not in status:
                self.close()
                raise RouteError(f"no C-STORE response from {self.where} (association lost or timed out)",
                                 retryable=True)
            code = int(status.Status)
            error = store_error(code, str(status.get("ErrorComment", "") or ""))
            if error is not None:
                raise error
            self._classes[item.sop_uid] = sop_class
            return Confirmation(item.sop_uid, warning=WARNINGS.get(code, ""),
                                committed=not self.partner.commitment)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)

    # -- confirmation ----------------------------------------------------------------------
    def confirm(self, sop_uids: list[str], classes: dict[str, str] | None = None) -> set[str]:
        """Storage Commitment of these instances (one transaction); without commitment, what
        the C-STOREs confirmed. `classes`: SOP classes of instances sent before (a restart);
        one whose class is unknown is not confirmed (the sender sends it again)."""
        known = {**(classes or {}), **self._classes}
        if not self.partner.commitment:
            return {u for u in sop_uids if u in self._classes}
        refs = []
        for uid in sop_uids:
            if uid in known:
                ref = Dataset()
                ref.ReferencedSOPClassUID = known[uid]
                ref.ReferencedSOPInstanceUID = uid
                refs.append(ref)
        if not refs:
            return set()
        report = self._commit(refs)
        self.refused.update(report.failed)
        return report.committed & set(sop_uids)

    def _commit(self, refs: list[Dataset]) -> Report:
        p, cfg = self.partner, self.cfg
        txn = generate_uid()
        request = Dataset()
        request.TransactionUID = txn
        request.ReferencedSOPSequence = Sequence(refs)
        PENDING.add(txn, p.aet)
        index = self.archive.index if self.archive is not None else None
        if index is not None:
            for old, rec in index.records(commitment_scu.TABLE):  # left by a sender killed while waiting
                if rec.get("at", 0) < time.time() - 86400:
                    index.delete_record(commitment_scu.TABLE, old)
            index.put_record(commitment_scu.TABLE, txn, {"partner_aet": p.aet, "state": "waiting",
                                                         "at": time.time(), "count": len(refs)})
        listener = None
        try:
            if commitment_scu.port_free(cfg.host, cfg.dicom_port):
                listener = Listener(cfg.aet, cfg.host, cfg.dicom_port)
            assoc = self._assoc if self._assoc is not None and self._assoc.is_established else None
            if assoc is None or not any(str(cx.abstract_syntax) == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
                self.close()
                assoc = self._associate([])
                self._assoc, self._accepted = assoc, set()
            if not any(str(cx.abstract_syntax) == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
                raise RouteError(f"{self.where} does not accept Storage Commitment "
                                 f"(set commitment = false for partner {p.name})")
            status, _reply = assoc.send_n_action(request, 1, STORAGE_COMMITMENT, COMMITMENT_INSTANCE)
            if not status or "Status" not in status:
                self.close()
                raise RouteError(f"{self.where} dropped our Storage Commitment request (N-ACTION) unanswered: "
                                 f"does it know our AE title {cfg.aet!r} (a modality it may report to)?",
                                 retryable=True)
            if int(status.Status) != 0:
                raise RouteError(f"{self.where} refused our Storage Commitment request (N-ACTION status "
                                 f"0x{int(status.Status):04X})", retryable=False)
            deadline = time.monotonic() + p.timeout
            while time.monotonic() < deadline:
                report = PENDING.wait(txn, 0.2)
                if report is not None:
                    return report
                if index is not None:
                    rec = index.record(commitment_scu.TABLE, txn)
                    if rec is not None and rec.get("state") == "reported":
                        return Report.from_record(rec)
            raise RouteError(f"no Storage Commitment report from {self.where} within {p.timeout:g} s (the partner must "
                             f"know our AE {cfg.aet!r} at {cfg.host}:{cfg.dicom_port} to report back)", retryable=True)
        finally:
            PENDING.discard(txn)
            if listener is not None:
                listener.close()
            if index is not None:
                index.delete_record(commitment_scu.TABLE, txn)

    # -- check and count -------------------------------------------------------------------
    def check(self) -> str | None:
        """C-ECHO, and whether the partner accepts WSI storage (and commitment when configured)."""
        p = self.partner
        try:
            tls = self._tls()
        except RouteError as exc:
            return exc.reason
        problem = reach(p.host, p.port, min(p.timeout, 10), tls)
        if problem is not None:
            return problem
        syntaxes = [ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90"]
        try:
            assoc = self._associate([(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
                                     (WSI, syntaxes)])
        except RouteError as exc:
            return exc.reason
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            if VERIFICATION not in accepted:
                return f"{self.where} does not accept C-ECHO (Verification)"
            status = assoc.send_c_echo()
            if not status or int(status.get("Status", 0xFFFF)) != 0:
                return f"C-ECHO to {self.where} failed (status {status.get('Status', 'none') if status else 'none'})"
            if WSI not in accepted:
                return f"{self.where} does not accept VL Whole Slide Microscopy Image Storage"
            if p.commitment and STORAGE_COMMITMENT not in accepted:
                return f"{self.where} does not accept Storage Commitment (set commitment = false for partner {p.name})"
            return None
        finally:
            assoc.release()

    def count(self, study_uid: str) -> int | None:
        """NumberOfStudyRelatedInstances by a STUDY-level C-FIND; else IMAGE-level matches; else None."""
        try:
            assoc = self._associate([(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian,
                                                                                   ImplicitVRLittleEndian])])
        except RouteError as exc:
            log.info("no count from %s: %s", self.where, exc.reason)
            return None
        try:
            if not any(str(cx.abstract_syntax) == str(StudyRootQueryRetrieveInformationModelFind)
                       for cx in assoc.accepted_contexts):
                return None  # a storage-only partner: confirmed per instance
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study_uid
            query.NumberOfStudyRelatedInstances = None
            found = None
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if status and status.get("Status") in (0xFF00, 0xFF01) and ident is not None:
                    value = ident.get("NumberOfStudyRelatedInstances")
                    if value not in (None, ""):
                        found = int(value)
            if found is not None:
                return found
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            query.SOPInstanceUID = ""
            matches, ok = 0, False
            for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = status.get("Status") if status else None
                if code in (0xFF00, 0xFF01):
                    matches += 1
                elif code == 0x0000:
                    ok = True
            return matches if ok else None
        finally:
            assoc.release()
