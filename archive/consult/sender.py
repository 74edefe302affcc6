"""The runner of one consultation job: its items in order through a `Route`, retries with
exponential backoff, resume where it stopped, verification at the end.

Each instance is streamed from whatever tier holds it (`Archive.instance_chunks`, hashed on the
way: a damaged blob never leaves complete), or de-identified on the fly (archive.deid, pixel data
as stored). A confirmed instance is recorded at once, so a restart or a dropped link resumes
with the first unconfirmed one. A retryable failure (connection, timeout, 5xx) is retried
after 1, 2, 4 ... 30 s until `consultation.retry_max_seconds` have passed since the item's
first failure; a refusal (401, 403, 409, 413, a failed instance) fails the job with the reason.
Nothing at the sender is changed either way.
"""
from __future__ import annotations

import base64
import io
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pydicom import Dataset, dcmread

from ..access import Principal
from ..metadata import header_dataset
from ..status import ArchiveError
from .jobs import ITEMS, REQUEST_SR, deid_module, now_iso
from .routes import Item, Route, RouteError, route_for

if TYPE_CHECKING:
    from .jobs import Consultations

log = logging.getLogger("pathpacs.consult")

RENEW_SECONDS = 10.0
MAX_DELAY = 30.0


class Lost(Exception):
    """The job was cancelled or taken over while this process ran it: stop, change nothing."""


class Stopped(Exception):
    """The process is shutting down: the job stays active and resumes at the next start."""


class JobFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Run:
    def __init__(self, jobs: "Consultations", job: dict, progress: Callable[[dict, int], None] | None,
                 stop: threading.Event | None) -> None:
        self.jobs, self.job, self.id = jobs, job, job["id"]
        self.arc = jobs.archive
        self.cfg = self.arc.config
        self.progress = progress
        self.stop = stop or threading.Event()
        self.renewed = time.monotonic()
        rate = getattr(self.cfg.consultation, "max_send_mbps", None)
        self.rate = rate * 125000 if rate else None  # bytes per second
        self.deid = None
        self.uids = None

    # -- bookkeeping ------------------------------------------------------------------------------
    def save(self, **fields: Any) -> None:
        self.job = self.jobs.update(self.id, **fields)
        self.renewed = time.monotonic()

    def tick(self) -> None:
        """Between blocks and during waits: stop on shutdown, renew the lease, notice a cancel."""
        if self.stop.is_set():
            raise Stopped()
        if time.monotonic() - self.renewed > RENEW_SECONDS:
            self.save()

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.stop.wait(min(left, 1.0)):
                raise Stopped()
            self.tick()

    def stream(self, chunks: Iterator[bytes], counter: list[int]) -> Iterator[bytes]:
        """The item's bytes, counted, throttled to max_send_mbps, with lease renewal."""
        start = time.monotonic()
        for chunk in chunks:
            self.tick()
            counter[0] += len(chunk)
            if self.progress:
                self.progress(self.job, len(chunk))
            yield chunk
            if self.rate:
                ahead = counter[0] / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self.sleep(ahead)

    # -- items -------------------------------------------------------------------------------------
    def headers(self) -> list[Dataset]:
        """The case's instance headers (no bulk data), de-identified when the job is: what the
        request SR takes its patient and study from and lists as its evidence."""
        out = []
        sops = [i["sop"] for _, i in self.jobs.items(self.id) if i["state"] != "excluded" and i.get("what") != REQUEST_SR]
        for raw in self.arc.index.metadata(sops):
            if not raw:
                continue
            ds = header_dataset(raw)
            for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
                if tag in ds:
                    del ds[tag]
            out.append(self.deid.dataset(ds) if self.deid is not None else ds)
        return out

    def request_item(self) -> Item:
        stored = self.job.get("request_document")
        if stored:  # built when the job was queued (request_document): no highdicom here
            sr = dcmread(io.BytesIO(base64.b64decode(stored)))
        else:
            sr = self.build_request()
        return Item(sr.SOPInstanceUID, sr.SOPClassUID, sr.StudyInstanceUID, dataset=sr,
                    series_uid=sr.SeriesInstanceUID)

    def use_deid(self) -> None:
        if self.job.get("deidentify") and self.deid is None:
            try:
                deid = deid_module()
            except ArchiveError as exc:
                raise JobFailed(exc.reason) from None
            self.uids = deid.UidMap(self.arc.index, self.job["id"])
            self.deid = deid.Deidentifier(deid.DeidOptions.from_config(self.cfg), self.uids)

    def build_request(self) -> Dataset:
        from .documents import request_sr

        job, cfg = self.job, self.cfg
        p = cfg.partners[job["partner"]]
        expert = next((e for e in p.experts if e.id == job["expert"]), None)
        sr = request_sr(self.headers(), consultation_id=job["id"], requester=cfg.consultation_name(),
                        institution=cfg.consultation.institution or "", physician=job.get("physician") or "",
                        expert=expert.id if expert else "", priority=job["priority"],
                        question=job.get("question") or "", sop_instance_uid=job["request_sr"],
                        series_instance_uid=job["request_series"])
        return sr

    def instance_item(self, item: dict, counter: list[int]) -> Item:
        rec = self.arc.instance(item["sop"])
        if rec is None:
            raise JobFailed(f"instance {item['sop']} is no longer in the archive")
        if self.deid is not None:
            deid, arc = self.deid, self.arc
            return Item(self.uids.new(rec.sop), rec.sop_class, self.job["partner_study"], 0,
                        chunks=lambda: self.stream(deid.instance_chunks(arc, rec), counter))
        return Item(rec.sop, rec.sop_class, rec.study, rec.size,
                    chunks=lambda: self.stream(self.arc.instance_chunks(rec, "consultation send"), counter))

    def send_one(self, route: Route, key: str, item: dict) -> None:
        attempts = item.get("attempts", 0)
        first_failure: float | None = None
        delay = 1.0
        window = self.cfg.consultation.retry_max_seconds
        while True:
            counter = [0]
            try:
                it = self.request_item() if item.get("what") == REQUEST_SR else self.instance_item(item, counter)
                attempts += 1
                conf = route.send(it)
            except RouteError as exc:
                self.arc.index.put_record(ITEMS, key, {**item, "attempts": attempts, "error": exc.reason})
                self.save(attempts=self.job.get("attempts", 0) + 1, last_error=exc.reason)
                if not exc.retryable:
                    self.arc.index.put_record(ITEMS, key, {**item, "state": "failed", "attempts": attempts,
                                                           "error": exc.reason})
                    raise JobFailed(exc.reason)
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure + delay > window:
                    waited = round(now - first_failure)
                    raise JobFailed(f"{exc.reason} (gave up after {attempts} attempts in {waited} s)")
                log.info("job %s: %s; retrying in %.0f s", self.id, exc.reason, delay)
                self.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            except ArchiveError as exc:  # our side: a damaged blob, a tier down
                raise JobFailed(exc.reason)
            except Exception as exc:
                if self.deid is not None and isinstance(exc, deid_module().DeidError):
                    raise JobFailed(f"instance {item['sop']} cannot be de-identified: {exc}")
                raise
            sent = counter[0] if counter[0] else item.get("size", 0)
            state = "confirmed" if conf.committed else "stored"
            self.arc.index.put_record(ITEMS, key, {**item, "state": state, "attempts": attempts, "bytes": sent,
                                                   "sent_as": it.sop_uid, "at": now_iso(),
                                                   **({"warning": conf.warning} if conf.warning else {})})
            self.save(instances_sent=self.job["instances_sent"] + 1, bytes_sent=self.job["bytes_sent"] + sent,
                      partner_study=self.job.get("partner_study") or it.study_uid)
            return

    # -- the job -----------------------------------------------------------------------------------
    def run(self) -> None:
        job = self.job
        partner = self.cfg.partners.get(job["partner"])
        if partner is None:
            raise JobFailed(f"partner {job['partner']} is no longer configured")
        self.use_deid()
        partner_study = self.uids.new(job["study"]) if self.uids is not None else job["study"]
        route = route_for(partner, self.cfg, self.arc)
        try:
            self.save(partner_study=partner_study, route=route.name)
            stored: list[tuple[str, dict]] = []
            for key, item in self.jobs.items(self.id):
                if item["state"] in ("confirmed", "excluded"):
                    continue
                if item["state"] == "stored":
                    stored.append((key, item))
                    continue
                self.send_one(route, key, item)
                fresh = self.arc.index.record(ITEMS, key)
                if fresh and fresh["state"] == "stored":
                    stored.append((key, fresh))
            if stored:  # Storage Commitment (DIMSE): what the partner commits to holding
                held = route.confirm([i["sent_as"] for _, i in stored],
                                     {i["sent_as"]: i["sop_class"] for _, i in stored if i.get("sop_class")})
                missing = [(k, i) for k, i in stored if i["sent_as"] not in held]
                for k, i in stored:
                    self.arc.index.put_record(ITEMS, k, {**i, "state": "confirmed" if (k, i) not in missing
                                                         else "pending"})
                if missing:
                    why = getattr(route, "refused", {}).get(missing[0][1]["sent_as"], "")  # DIMSE: the Failure Reason
                    raise JobFailed(f"partner did not commit {len(missing)} of {len(stored)} instances"
                                    + (f" ({why})" if why else ""))
            self.save(state="verifying")
            self.verify(route, partner_study)
        finally:
            route.close()

    def verify(self, route: Route, partner_study: str) -> None:
        sent = sum(1 for _, i in self.jobs.items(self.id) if i["state"] == "confirmed")
        if self.job["kind"] != "request":  # an answer joins the partner's case: counted per instance
            self.save(state="done", finished=now_iso(), verified=sent)
            return
        for attempt in range(3):
            try:
                n = route.count(partner_study)
            except RouteError as exc:
                if not exc.retryable or attempt == 2:
                    raise JobFailed(f"cannot verify: {exc.reason}")
                self.sleep(2.0)
                continue
            if n is None:
                self.save(state="done", finished=now_iso(), verified=None,
                          last_error="the partner cannot be counted (QIDO refused): confirmed per instance")
                return
            if n >= sent:
                self.save(state="done", finished=now_iso(), verified=n)
                return
            if attempt < 2:
                self.sleep(1.0)
                continue
            raise JobFailed(f"partner holds {n} of {sent} instances")


def request_document(jobs: "Consultations", job: dict) -> str:
    """The request SR of a queued job as Part 10 bytes (base64, kept in the job record). Built
    when the job is queued, so the process that sends never loads highdicom's tables of the
    standard (about 110 MB of the sender's memory: BENCHMARKS.md, consultation)."""
    run = _Run(jobs, job, None, None)
    run.use_deid()
    buf = io.BytesIO()
    run.build_request().save_as(buf, enforce_file_format=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_job(jobs: "Consultations", job: dict, *, progress: Callable[[dict, int], None] | None = None,
            stop: threading.Event | None = None) -> dict:
    """Run a claimed job to its end (done or failed), or until stopped; returns the record."""
    run = _Run(jobs, job, progress, stop)
    outcome, reason = "success", ""
    try:
        run.run()
    except JobFailed as exc:
        outcome, reason = "serious failure", exc.reason
        try:
            run.save(state="failed", error=exc.reason, last_error=exc.reason, finished=now_iso())
        except Lost:
            return jobs.job(job["id"])
        log.warning("consultation job %s failed: %s", job["id"], exc.reason)
    except RouteError as exc:  # route_for: the partner has no usable route
        outcome, reason = "serious failure", exc.reason
        run.save(state="failed", error=exc.reason, last_error=exc.reason, finished=now_iso())
    except Lost as exc:
        log.info("%s: stopped here", exc)
        return jobs.job(job["id"])
    except Stopped:
        try:  # give the lease back: the next start takes the job at once
            jobs.update(job["id"], lease={"owner": jobs.owner, "until": 0})
        except Lost:
            pass
        return jobs.job(job["id"])
    else:
        log.info("consultation job %s done: %d instances, %d bytes to %s", job["id"], run.job["instances_sent"],
                 run.job["bytes_sent"], job["partner"])
    _audit(jobs, run.job, outcome, reason)
    return run.job


def _audit(jobs: "Consultations", job: dict, outcome: str, reason: str) -> None:
    who = job.get("who") or {}
    principal = Principal(who.get("id", "system"), who.get("name", "system"), frozenset(), who.get("via", "cli"))
    sops = [i["sop"] for _, i in jobs.items(job["id"]) if i["state"] == "confirmed" and i.get("what") != REQUEST_SR]
    try:
        st = jobs.archive.study(job["study"])
        jobs.archive.audit.exported(principal, job["study"], st.patient if st else None, sops,
                                    f"partner {job['partner']}", outcome=outcome, reason=reason)
    except Exception:  # the audit must not turn a finished send into a failed one
        log.exception("audit of consultation job %s failed", job["id"])
