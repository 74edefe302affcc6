"""Consultation jobs without a partner server (archive.consult.jobs): the checks at enqueue
(consent, expert, priority, scope), the queue order, the frozen instance order recorded with the
job, the lease (a killed process's job is taken over only once its lease has run out) and the
state changes of cancel and retry. A real Archive on a temporary directory; nothing is sent."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
from pydicom.uid import generate_uid

import factory
from archive.access import Forbidden, Principal
from archive.config import Config, Expert, Partner
from archive.consult.jobs import ITEMS, JOBS, Conflict, Consultations
from archive.service import Archive
from archive.status import InvalidRequest, NotFound


@pytest.fixture
def arc(tmp_path):
    cfg = Config(data_dir=tmp_path / "data")
    cfg.partners = {"b": Partner("b", dicomweb="http://127.0.0.1:9/dicomweb",
                                 experts=(Expert("li-breast", "Li Ming", ("breast",)),))}
    a = Archive(cfg)
    yield a
    a.close()


def ingest_case(arc, tmp_path, patient_id="PJOB") -> tuple[str, list]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sets = [factory.wsi_instance(study, series, w, h, patient_id=patient_id, seed=i, frame_of_reference=frame,
                                 instance_number=i + 1)
            for i, (w, h) in enumerate(((1024, 768), (512, 384), (256, 192)))]
    sets.append(factory.wsi_instance(study, series, 512, 256, patient_id=patient_id, seed=9, image_type="OVERVIEW",
                                     frame_of_reference=frame, instance_number=4))
    for ds in sets:
        p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        assert arc.ingest_file(p).ok
    return study, sets


def test_enqueue_checks_say_what_is_wrong(arc, tmp_path):
    study, _ = ingest_case(arc, tmp_path)
    jobs = Consultations(arc)
    with pytest.raises(NotFound, match=r"no partner 'x' \(partners: b\)"):
        jobs.send(study, "x")
    with pytest.raises(InvalidRequest, match=r"partner b has no expert 'zhang' \(experts: li-breast\)"):
        jobs.send(study, "b", expert="zhang")
    with pytest.raises(InvalidRequest, match="priority must be routine, urgent or frozen"):
        jobs.send(study, "b", priority="stat")
    with pytest.raises(NotFound, match="study 1.2.3 not found"):
        jobs.send("1.2.3", "b")
    scoped = Principal("t1", "scoped", frozenset({"viewer"}), "token", studies=frozenset({"9.9.9"}))
    with pytest.raises(NotFound, match=f"study {study} not found"):  # outside the scope: as if absent
        jobs.send(study, "b", who=scoped)
    assert list(arc.index.records(JOBS)) == [] and list(arc.index.records(ITEMS)) == []


def test_consent_is_required_when_configured(arc, tmp_path):
    from archive.consent import Consents

    study, _ = ingest_case(arc, tmp_path)
    arc.config.consultation = replace(arc.config.consultation, require_consent=True)
    jobs = Consultations(arc)
    with pytest.raises(Forbidden, match=f"no consent on record for consult of study {study}"):
        jobs.send(study, "b")
    rec = Consents(arc).add(study=study, recorded_by="Dr Wang", scope=["consult"], reference="FORM-12")
    job = jobs.job(jobs.send(study, "b"))
    assert job["consent"] == rec["id"] and job["state"] == "queued"


def test_queue_order_and_frozen_instance_order(arc, tmp_path):
    study, sets = ingest_case(arc, tmp_path)
    jobs = Consultations(arc)
    routine = jobs.send(study, "b")
    time.sleep(0.01)
    urgent = jobs.send(study, "b", priority="urgent")
    time.sleep(0.01)
    frozen = jobs.send(study, "b", priority="frozen", expert="li-breast")
    assert [j["id"] for j in jobs.pending()] == [frozen, urgent, routine]
    order = [i["sop"] for _, i in jobs.items(frozen)]
    overview, l0, l1, l2 = sets[3].SOPInstanceUID, sets[0].SOPInstanceUID, sets[1].SOPInstanceUID, sets[2].SOPInstanceUID
    assert order == [jobs.job(frozen)["request_sr"], overview, l2, l1, l0]
    assert [i["sop"] for _, i in jobs.items(routine)][1:] == [s.SOPInstanceUID for s in sets]
    assert jobs.job(frozen)["bytes_total"] == sum(arc.instance(s.SOPInstanceUID).size for s in sets)


def test_a_lease_keeps_a_job_to_one_process_until_it_runs_out(arc, tmp_path):
    study, _ = ingest_case(arc, tmp_path)
    first, second = Consultations(arc), Consultations(arc)  # two processes' views of one index
    job_id = first.send(study, "b")
    claimed = first.claim(job_id)
    assert claimed["state"] == "sending" and claimed["lease"]["owner"] == first.owner
    assert second.claim(job_id) is None  # the lease is live
    # the first process dies: its lease runs out (here: moved into the past)
    arc.index.update_record(JOBS, job_id, lambda old: {**old, "lease": {**old["lease"], "until": time.time() - 1}})
    taken = second.claim(job_id)
    assert taken is not None and taken["lease"]["owner"] == second.owner
    from archive.consult.sender import Lost

    with pytest.raises(Lost, match="taken over"):
        first.update(job_id, bytes_sent=1)  # the old owner notices and stops


def test_cancel_and_retry_follow_the_state(arc, tmp_path):
    study, _ = ingest_case(arc, tmp_path)
    jobs = Consultations(arc)
    job_id = jobs.send(study, "b")
    with pytest.raises(Conflict, match="only a failed or cancelled job is retried"):
        jobs.retry(job_id)
    assert jobs.cancel(job_id)["state"] == "cancelled"
    with pytest.raises(Conflict, match="is cancelled: nothing to cancel"):
        jobs.cancel(job_id)
    assert jobs.pending() == []
    job = jobs.retry(job_id)
    assert job["state"] == "queued" and [j["id"] for j in jobs.pending()] == [job_id]
    with pytest.raises(NotFound, match="no consultation job 'nope'"):
        jobs.cancel("nope")


def test_a_dead_process_of_this_host_loses_its_lease_at_once(arc, tmp_path):
    import socket
    import subprocess
    import sys

    study, _ = ingest_case(arc, tmp_path)
    jobs = Consultations(arc)
    job_id = jobs.send(study, "b")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    arc.index.update_record(JOBS, job_id, lambda old: {**old, "state": "sending", "lease": {
        "owner": f"{socket.gethostname()}:{gone.pid}:dead", "until": time.time() + 3600}})
    assert jobs.claim(job_id)["lease"]["owner"] == jobs.owner  # killed -9: taken over without waiting
    other_host = {"owner": "elsewhere:1:x", "until": time.time() + 3600}
    arc.index.update_record(JOBS, job_id, lambda old: {**old, "lease": other_host})
    assert jobs.claim(job_id) is None  # another node's live lease is respected


def test_a_research_view_sends_de_identified_only(arc, tmp_path):
    study, _ = ingest_case(arc, tmp_path)
    research = Principal("r1", "researcher", frozenset({"viewer"}), "token", deidentified=True)
    jobs = Consultations(arc)
    with pytest.raises(Forbidden, match="may send a case de-identified only"):
        jobs.send(study, "b", who=research)
    job = jobs.job(jobs.send(study, "b", who=research, deidentify=True))
    sent = [i["what"] for _, i in jobs.items(job["id"]) if i["state"] == "pending"]
    assert job["deidentify"] and sent == ["request SR", "VOLUME", "VOLUME", "VOLUME"]  # the OVERVIEW stays home
