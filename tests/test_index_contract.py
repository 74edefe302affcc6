"""The Index contract: the domain operations every index backend must answer alike.

Parametrised over BACKENDS: LMDB and PostgreSQL (a fresh database of the session's server per
test, the conftest `pg_dsn`). Records go in as
NewInstance and come out typed; searches go through archive.query.Searcher, the backend-
independent matcher, over the backend's candidate selection.
"""
from __future__ import annotations

import pytest

from archive import metadata as md
from archive.index import LmdbIndex, NewInstance
from archive.query import Key, Searcher
from archive.records import BlobRef, InstanceRecord
from archive.status import Outcome

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
SC = "1.2.840.10008.5.1.4.1.1.7"


def lmdb_index(tmp_path):
    return LmdbIndex(tmp_path / "index", map_size=1 << 30)


def postgresql_index(request, tmp_path):
    from archive.index.postgresql import PostgresIndex

    return PostgresIndex(request.getfixturevalue("pg_dsn"), pool_size=4)


BACKENDS = {"lmdb": lambda request, tmp_path: lmdb_index(tmp_path), "postgresql": postgresql_index}


@pytest.fixture(params=sorted(BACKENDS))
def index(request, tmp_path):
    idx = BACKENDS[request.param](request, tmp_path)
    yield idx
    idx.close()


def pn(name: str) -> dict:
    return {"vr": "PN", "Value": [{"Alphabetic": name}]}


def new(sop: str, *, study: str = "1.2.1", series: str = "1.2.1.1", pid: str = "P1", name: str = "Doe^Jane",
        date: str = "20250101", acc: str = "A1", modality: str = "SM", sha: str = "a" * 64, size: int = 100,
        sop_class: str = WSI, frames=((10, 5), (15, 7)), blob: str | None = None, number: int = 1) -> NewInstance:
    patient = {"00100010": pn(name), "00100020": {"vr": "LO", "Value": [pid]}}
    study_attrs = {**patient, "0020000D": {"vr": "UI", "Value": [study]}, "00080020": {"vr": "DA", "Value": [date]},
                   "00080050": {"vr": "SH", "Value": [acc]}}
    series_attrs = {"0020000E": {"vr": "UI", "Value": [series]}, "00080060": {"vr": "CS", "Value": [modality]}}
    attrs = {"00200013": {"vr": "IS", "Value": [number]}, "00280010": {"vr": "US", "Value": [256]}}
    rec = InstanceRecord(sop, sop_class, study, series, f"{pid}^", "1.2.840.10008.1.2.4.50",
                         BlobRef("hot", blob or f"blob-{sop}"), size, sha, "2026-01-01T00:00:00.000", "SCU", "test",
                         len(frames), True, 0, attrs)
    meta = md.dumps({**study_attrs, **series_attrs, **attrs, "00080018": {"vr": "UI", "Value": [sop]}})
    return NewInstance(rec, [[f] for f in frames], [1000 + i for i in range(len(frames))], meta,
                       {"00282000": b"icc" * 500}, patient, study_attrs, series_attrs)


def test_add_and_read_back_typed_records(index):
    assert index.add_instance(new("1.3.1"), replace=False).outcome is Outcome.STORED
    rec = index.instance("1.3.1")
    assert rec is not None and rec.blob == BlobRef("hot", "blob-1.3.1") and rec.n_frames == 2
    assert rec.int_value("00200013") == 1 and rec.size == 100
    st, se = index.study("1.2.1"), index.series("1.2.1.1")
    assert st.n_series == 1 and st.n_instances == 1 and st.modalities == ("SM",) and st.patient == "P1^"
    assert se.study == "1.2.1" and se.n_instances == 1 and se.sop_classes == (WSI,)
    assert index.patient("P1^").n_studies == 1
    assert index.metadata(["1.3.1", "nope"]) and len(index.metadata(["1.3.1", "nope"])) == 1
    assert index.bulk("1.3.1", "00282000") == b"icc" * 500 and index.bulk("1.3.1", "x") is None
    assert index.instance("nope") is None and index.study("nope") is None


def test_frames_located_with_crcs_and_location(index):
    index.add_instance(new("1.3.2", frames=((100, 10), (110, 20), (130, 30))), replace=False)
    got = index.frames("1.3.2", [3, 1, 4, 0])
    assert got.table.blob == BlobRef("hot", "blob-1.3.2") and got.table.n == 3 and got.table.checked
    assert got.fragments == [[(130, 30)], [(100, 10)], None, None]
    assert got.crcs == [1002, 1000, None, None]
    assert index.frames("nope", [1]) is None
    everything = index.all_frames("1.3.2")
    assert everything.fragments == [[(100, 10)], [(110, 20)], [(130, 30)]]


def test_multi_fragment_frames(index):
    n = new("1.3.3")
    n = NewInstance(n.record, [[(10, 4), (20, 6)], [(40, 8)]], [7, 8], n.metadata, n.bulk,
                    n.patient_attrs, n.study_attrs, n.series_attrs)
    index.add_instance(n, replace=False)
    got = index.frames("1.3.3", [1, 2])
    assert got.fragments == [[(10, 4), (20, 6)], [(40, 8)]] and got.crcs == [7, 8]


def test_duplicate_conflict_and_replace(index):
    index.add_instance(new("1.3.4", sha="a" * 64), replace=False)
    same = index.add_instance(new("1.3.4", sha="a" * 64, blob="other"), replace=False)
    assert same.outcome is Outcome.DUPLICATE and same.previous.blob.key == "blob-1.3.4"
    other = index.add_instance(new("1.3.4", sha="b" * 64, blob="other"), replace=False)
    assert other.outcome is Outcome.REJECTED
    assert index.instance("1.3.4").sha256 == "a" * 64
    done = index.add_instance(new("1.3.4", sha="b" * 64, blob="newblob", size=300), replace=True, session="s1")
    assert done.outcome is Outcome.REPLACED and done.previous.blob.key == "blob-1.3.4"
    assert index.instance("1.3.4").blob.key == "newblob"
    assert index.study("1.2.1").n_instances == 1 and index.study("1.2.1").bytes == 300
    # the old version is kept, blob and all, as a rejected version (never pending: no sweep deletes it)
    assert index.pending() == []
    assert index.blob_referenced(BlobRef("hot", "blob-1.3.4"))
    assert index.blob_referenced(BlobRef("hot", "newblob"))
    (kept,) = index.versions("1.3.4")
    assert kept["record"].blob == BlobRef("hot", "blob-1.3.4") and kept["record"].sha256 == "a" * 64
    assert index.drop_version(kept["key"]) and index.versions() == []
    assert not index.blob_referenced(BlobRef("hot", "blob-1.3.4"))


def test_reject_marks_and_purge_intents(index):
    index.add_instance(new("1.3.9"), replace=False)
    gen = index.rejection_generation()
    mark = {"study": "1.2.1", "series": "1.2.1.1", "code": "113001", "time": "2026-01-01T00:00:00+00:00",
            "who": "t", "note": ""}
    assert index.reject({"1.3.9": mark, "1.9.9": mark}) == 1  # an unknown instance is not marked
    assert index.reject({"1.3.9": {**mark, "code": "113037"}}) == 0  # the first mark stands
    g2, marks, purging = index.rejections()
    assert g2 > gen and marks == {"1.3.9": mark} and purging == set()
    assert index.unreject(["1.3.9"]) == 1 and index.rejections()[1] == {}
    index.reject({"1.3.9": mark})
    blobs = [["hot", "blob-1.3.9"]]
    index.begin_purge({"1.3.9": {"kind": "instance", "sop": "1.3.9", "study": "1.2.1", "blobs": blobs}})
    assert index.rejections()[2] == {"1.3.9"}
    assert index.unreject(["1.3.9"]) == 0  # a purge under way is finished, never undone
    assert index.finish_purge("1.3.9") and not index.finish_purge("1.3.9")
    assert index.instance("1.3.9") is None and index.study("1.2.1") is None and index.purges() == {}
    assert index.rejections()[1:] == ({}, set())


def test_pending_marks(index):
    b = BlobRef("hot", "k")
    index.add_pending(b, "sess")
    assert index.pending() == [(b, "sess")]
    index.add_instance(new("1.3.5", blob="k"), replace=False)  # committing clears its mark
    assert index.pending() == []
    index.add_pending(BlobRef("hot", "z"), "sess")
    index.clear_pending(BlobRef("hot", "z"))
    assert index.pending() == []


def test_hierarchy_walks_and_iteration(index):
    for i in range(3):
        index.add_instance(new(f"1.4.{i}", series="1.2.1.1", number=i), replace=False)
    index.add_instance(new("1.4.9", series="1.2.1.2", modality="OT", sop_class=SC), replace=False)
    index.add_instance(new("1.5.1", study="1.2.2", series="1.2.2.1", pid="P2", name="Roe^Rick"), replace=False)
    assert sorted(s.uid for s in index.series_of_study("1.2.1")) == ["1.2.1.1", "1.2.1.2"]
    assert sorted(r.sop for r in index.instances_of_series("1.2.1.1")) == ["1.4.0", "1.4.1", "1.4.2"]
    assert [s.uid for s in index.studies_of_patient("P2^")] == ["1.2.2"]
    assert sorted(p.key for p in index.patients()) == ["P1^", "P2^"]
    assert sorted(s.uid for s in index.studies()) == ["1.2.1", "1.2.2"]
    assert sorted(index.study("1.2.1").modalities) == ["OT", "SM"]
    stats = index.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (2, 2, 3, 5)
    assert stats.bytes == 500 and stats.by_tier == {"hot": 500}


def test_iteration_spans_many_read_batches(index):
    index.add_instances(new(f"1.6.{i}", number=i) for i in range(1300))
    assert len({r.sop for r in index.instances()}) == 1300
    assert index.study("1.2.1").n_instances == 1300


def _search(index, level, keys, **kw):
    return list(Searcher(index, fuzzy=kw.pop("fuzzy", False)).search(level, keys, **kw))


def test_candidates_answer_every_kind_of_key(index):
    index.add_instance(new("1.7.1", study="2.1", series="2.1.1", pid="PA", name="Smith^Ann", date="20240105", acc="X1"), replace=False)
    index.add_instance(new("1.7.2", study="2.2", series="2.2.1", pid="PB", name="Smithers^Bob", date="20240220", acc="X2"), replace=False)
    index.add_instance(new("1.7.3", study="2.3", series="2.3.1", pid="PC", name="Jones^Cat", date="20250101", acc="Y3",
                           modality="OT"), replace=False)
    studies = lambda keys, **kw: sorted(r.study for r in _search(index, "STUDY", keys, **kw))  # noqa: E731
    assert studies([Key("00100020", "LO", ["PB"])]) == ["2.2"]
    assert studies([Key("00100010", "PN", ["smith*"])]) == ["2.1", "2.2"]
    assert studies([Key("00100010", "PN", ["*ith*"])]) == ["2.1", "2.2"]
    assert studies([Key("00100010", "PN", ["cat"])], fuzzy=True) == ["2.3"]
    assert studies([Key("00080020", "DA", ["20240101-20240131"])]) == ["2.1"]
    assert studies([Key("00080020", "DA", ["-20241231"])]) == ["2.1", "2.2"]
    assert studies([Key("0020000D", "UI", ["2.3", "2.1", "9.9"])]) == ["2.1", "2.3"]
    assert studies([Key("00080050", "SH", ["Y3"])]) == ["2.3"]
    assert studies([Key("00080061", "CS", ["OT"])]) == ["2.3"]
    assert studies([]) == ["2.1", "2.2", "2.3"]
    series = _search(index, "SERIES", [Key("00100020", "LO", ["PA"])])
    assert [r.series for r in series] == ["2.1.1"]
    assert [r.series for r in _search(index, "SERIES", [], study="2.2")] == ["2.2.1"]
    assert [r.sop for r in _search(index, "IMAGE", [Key("00080018", "UI", ["1.7.3"])])] == ["1.7.3"]
    assert [r.sop for r in _search(index, "IMAGE", [], study="2.1", series="2.1.1")] == ["1.7.1"]
    assert _search(index, "IMAGE", [Key("00080018", "UI", ["1.7.3"])], study="2.1") == []
    patients = _search(index, "PATIENT", [Key("00100020", "LO", ["PC"])])
    assert [r.patient for r in patients] == ["PC^"]
    assert patients[0].doc["00201200"]["Value"] == [1]  # NumberOfPatientRelatedStudies


def test_frame_checksum_migration_and_fixity_events(index):
    from archive.index import FixityEvent

    index.add_instance(new("1.8.1"), replace=False)
    assert index.checksum_todo(10) == [] and index.checksum_todo_count() == 0
    assert not index.set_frame_checksums("1.8.1", BlobRef("hot", "blob-1.8.1"), [1, 2])  # already has CRCs
    ev = FixityEvent("2026-01-01T00:00:00.000Z", "1.8.1", BlobRef("hot", "blob-1.8.1"), "a frame failed its CRC32C", "test")
    index.record_fixity(ev)
    assert index.fixity_events() == [ev]


def test_generic_records_read_modify_write_and_prefix(index):
    """The record tables the consultation, de-identification and consent modules keep."""
    index.put_record("consult", "job1", {"state": "queued"})
    index.put_records("consult_items", {"job1\x00a": {"n": 1}, "job1\x00b": {"n": 2}, "job2\x00a": {"n": 3}})
    assert index.record("consult", "job1") == {"state": "queued"}
    assert index.record("consult", "nope") is None
    assert [k for k, _ in index.records("consult_items", "job1\x00")] == ["job1\x00a", "job1\x00b"]
    claimed = index.update_record("consult", "job1", lambda r: None if r is None else {**r, "state": "running"})
    assert claimed == {"state": "running"} == index.record("consult", "job1")
    assert index.update_record("consult", "job1", lambda r: None) is None
    assert index.record("consult", "job1") is None
    assert index.delete_record("consult_items", "job2\x00a") is True
    assert index.delete_record("consult_items", "job2\x00a") is False
    with pytest.raises(KeyError):
        index.put_record("inst", "x", {})


def test_generic_records_batches_and_update_of_a_missing_record(index):
    index.put_records("leases", {f"k{i:04d}": {"i": i} for i in range(700)})
    got = list(index.records("leases"))
    assert [k for k, _ in got] == [f"k{i:04d}" for i in range(700)] and got[5][1] == {"i": 5}
    assert [k for k, _ in index.records("leases", "k069")] == [f"k069{i}" for i in range(10)]
    assert index.update_record("nodes", "n1", lambda r: None) is None and index.record("nodes", "n1") is None
    made = index.update_record("nodes", "n1", lambda r: {"beat": 1 if r is None else r["beat"] + 1})
    assert made == {"beat": 1} and index.update_record("nodes", "n1", lambda r: {"beat": r["beat"] + 1}) == {"beat": 2}
    with pytest.raises(KeyError):
        index.record("nope", "x")


def test_study_order_by_date_time_and_uid_undated_last(index):
    specs = [("3.1", "20240301", "101500"), ("3.2", "20240301", "09:00:00"), ("3.3", "20230101", ""),
             ("3.4", "", ""), ("3.0", "", ""), ("3.5", "20240301", "101500")]
    for i, (uid, date, tm) in enumerate(specs):
        n = new(f"1.9.{i}", study=uid, series=f"{uid}.1", date=date)
        if tm:
            n.study_attrs["00080030"] = {"vr": "TM", "Value": [tm]}
        if not date:
            del n.study_attrs["00080020"]
        index.add_instance(n, replace=False)
    up = [r.uid for r in index.candidates("STUDY", [], order="date")]
    assert up == ["3.3", "3.2", "3.1", "3.5", "3.0", "3.4"]
    down = [r.uid for r in index.candidates("STUDY", [], order="-date")]
    assert down == ["3.5", "3.1", "3.2", "3.3", "3.0", "3.4"]
    ranged = [r.uid for r in index.candidates("STUDY", [Key("00080020", "DA", ["20240101-"])], order="-date")]
    assert ranged[:3] == ["3.5", "3.1", "3.2"] and "3.3" not in ranged
    picked = [r.uid for r in index.candidates("STUDY", [Key("0020000D", "UI", ["3.4", "3.3", "3.1"])], order="date")]
    assert picked == ["3.3", "3.1", "3.4"]
    with pytest.raises(ValueError):
        list(index.candidates("STUDY", [], order="size"))


def test_study_order_pages_through_many_studies(index):
    index.add_instances(new(f"1.10.{i}", study=f"4.{i}", series=f"4.{i}.1", date=f"2024{1 + i % 12:02d}{1 + i % 28:02d}")
                        for i in range(600))
    got = [r for r in index.candidates("STUDY", [], order="date")]
    assert len(got) == 600 and len({r.uid for r in got}) == 600
    dates = [str(md.first_value(r.attrs, "00080020")) for r in got]
    assert dates == sorted(dates)
    first = next(iter(index.candidates("STUDY", [], order="-date")))
    assert str(md.first_value(first.attrs, "00080020")) == max(dates)


def test_candidates_names_prefixes_and_levels(index):
    ideo = {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]}
    n = new("1.11.1", study="5.1", series="5.1.1", pid="P_1", acc="A%1")
    n.study_attrs["00100010"] = ideo
    index.add_instance(n, replace=False)
    index.add_instance(new("1.11.2", study="5.2", series="5.2.1", pid="PX1", acc="AB1", name="Müller^Hans",
                           date="20240102"), replace=False)
    studies = lambda keys, **kw: sorted(r.study for r in _search(index, "STUDY", keys, **kw))  # noqa: E731
    assert studies([Key("00100010", "PN", ["山田*"])]) == ["5.1"]
    assert studies([Key("00100010", "PN", ["YAMADA^TAROU"])]) == ["5.1"]
    assert studies([Key("00100010", "PN", ["mül*"])]) == ["5.2"]
    assert studies([Key("00100010", "PN", ["m?ller*"])]) == ["5.2"]
    assert studies([Key("00100020", "LO", ["P_*"])]) == ["5.1"]  # '_' is no wildcard
    assert studies([Key("00080050", "SH", ["A%*"])]) == ["5.1"]
    assert studies([Key("00080050", "SH", ["A*1"])]) == ["5.1", "5.2"]
    assert studies([Key("00080020", "DA", ["20240102"])]) == ["5.2"]
    assert studies([Key("00100010", "PN", ["hans"])], fuzzy=True) == ["5.2"]
    assert [r.patient for r in _search(index, "PATIENT", [Key("00100020", "LO", ["P_1"])])] == ["P_1^"]
    assert len(_search(index, "PATIENT", [])) == 2
    assert [r.series for r in _search(index, "SERIES", [Key("0020000E", "UI", ["5.2.1", "9"])])] == ["5.2.1"]
    assert _search(index, "SERIES", [Key("0020000E", "UI", ["5.2.1"])], study="5.1") == []
    assert sorted(r.series for r in _search(index, "SERIES", [])) == ["5.1.1", "5.2.1"]
    image = _search(index, "IMAGE", [Key("0020000E", "UI", ["5.1.1"])])
    assert [r.sop for r in image] == ["1.11.1"]
    assert [r.sop for r in _search(index, "IMAGE", [Key("00100020", "LO", ["PX1"])])] == ["1.11.2"]
    assert [r.sop for r in _search(index, "IMAGE", [], study="5.2")] == ["1.11.2"]


def test_metadata_under_study_and_series(index):
    index.add_instance(new("1.12.1", series="1.2.1.1"), replace=False)
    index.add_instance(new("1.12.2", series="1.2.1.2"), replace=False)
    assert len(index.metadata_under("1.2.1")) == 2
    (one,) = index.metadata_under("1.2.1", "1.2.1.2")
    assert b"1.12.2" in one
    assert index.metadata_under("nope") is None and index.metadata_under("1.2.1", "nope") is None
    assert index.metadata_under("9.9", "1.2.1.1") is None


def test_moves_copies_and_tier_counts(index):
    index.add_instance(new("1.13.1", size=40), replace=False)
    src, dst = BlobRef("hot", "blob-1.13.1"), BlobRef("cold", "c-1.13.1")
    assert index.frames("1.13.1", [1]).table.blob == src
    index.move_begin("1.13.1", src, dst, "s1")
    assert index.moves() == [("1.13.1", src, dst, "copying", "s1")]
    assert index.add_copy("1.13.1", dst) and index.copies("1.13.1") == [dst]
    assert not index.add_copy("nope", dst)
    assert index.move_switch("1.13.1", src, dst)
    assert not index.move_switch("1.13.1", src, dst)  # no longer at src
    assert index.moves()[0][3] == "switched" and index.copies("1.13.1") == []  # dst is the primary now
    assert index.instance("1.13.1").blob == dst and index.frames("1.13.1", [2]).table.blob == dst
    assert index.study("1.2.1").tiers == {"cold": 1} and index.series("1.2.1.1").tiers == {"cold": 1}
    assert index.stats().by_tier == {"cold": 40}
    assert index.blob_referenced(dst) and not index.blob_referenced(src)
    index.move_end("1.13.1")
    assert index.moves() == []
    replica = BlobRef("s3", "r-1.13.1")
    index.add_copy("1.13.1", replica)
    assert index.drop_copy("1.13.1", "s3") == replica and index.drop_copy("1.13.1", "s3") is None
    assert not index.blob_referenced(replica)
    index.forget("1.13.1")  # nothing cached or a cache dropped: the next read is fresh
    assert index.frames("1.13.1", [1]).table.blob == dst


def test_access_flags_verified_and_tokens(index):
    assert index.study_access("1.2.1") is None
    index.touch_study("1.2.1", "2026-01-02T00:00:00Z")
    assert index.study_access("1.2.1") == "2026-01-02T00:00:00Z"
    assert index.flags("1.2.1") == {}
    assert index.set_flags("1.2.1", pinned=True) == {"pinned": True}
    assert index.set_flags("1.2.1", hold=True) == {"pinned": True, "hold": True}
    assert index.set_flags("1.2.1", pinned=False, hold=False) == {} and index.flags("1.2.1") == {}
    assert index.verified("1.3", "hot") is None
    index.set_verified("1.3", "hot", "2026-01-03")
    assert index.verified("1.3", "hot") == "2026-01-03" and index.verified("1.3", "cold") is None
    assert index.token("t1") is None and index.tokens() == []
    index.put_token("t1", {"id": "t1", "roles": ["read"]})
    index.put_token("t1", {"id": "t1", "roles": ["admin"]})
    assert index.token("t1") == {"id": "t1", "roles": ["admin"]} and index.tokens() == [index.token("t1")]


def test_add_instances_leaves_existing_alone(index):
    index.add_instance(new("1.14.1", sha="c" * 64), replace=False)
    assert index.add_instances([new("1.14.1", sha="d" * 64), new("1.14.2")]) == 1
    assert index.instance("1.14.1").sha256 == "c" * 64 and index.study("1.2.1").n_instances == 2
    assert index.add_instances([]) == 0


def test_frame_checksums_added_to_an_unchecked_table(index):
    n = new("1.15.1")
    index.add_instance(NewInstance(n.record, n.frames, None, n.metadata, n.bulk, n.patient_attrs, n.study_attrs,
                                   n.series_attrs), replace=False)
    assert not index.frames("1.15.1", [1]).table.checked
    assert not index.set_frame_checksums("1.15.1", BlobRef("hot", "elsewhere"), [5, 6])  # not its location
    assert index.set_frame_checksums("1.15.1", BlobRef("hot", "blob-1.15.1"), [5, 6])
    got = index.frames("1.15.1", [2, 1])
    assert got.table.checked and got.crcs == [6, 5]
    assert index.checksum_todo(10) == [] and index.checksum_todo_count() == 0


def test_fixity_events_in_time_order(index):
    from archive.index import FixityEvent

    later = FixityEvent("2026-01-02T00:00:00.000Z", "1.8.2", BlobRef("cold", "b2"), "sha256 mismatch", "scrub")
    earlier = FixityEvent("2026-01-01T00:00:00.000Z", "1.8.1", BlobRef("hot", "b1"), "missing", "scrub")
    index.record_fixity(later)
    index.record_fixity(earlier)
    assert index.fixity_events() == [earlier, later]


def test_purge_of_a_replaced_version_and_parents_pruned(index):
    index.add_instance(new("1.16.1", sha="a" * 64), replace=False)
    index.add_instance(new("1.16.2", series="1.2.1.2", modality="OT"), replace=False)
    index.add_instance(new("1.16.1", sha="b" * 64, blob="b2"), replace=True)
    (kept,) = index.versions("1.16.1")
    assert index.versions("1.16") == [] and len(index.versions()) == 1
    gen = index.rejection_generation()
    index.begin_purge({"v1": {"kind": "version", "sop": "1.16.1", "version": kept["key"], "blobs": [["hot", "blob-1.16.1"]]}})
    assert index.purges()["v1"]["version"] == kept["key"] and index.rejection_generation() > gen
    assert index.finish_purge("v1") and index.versions() == [] and index.purges() == {}
    assert not index.blob_referenced(BlobRef("hot", "blob-1.16.1")) and index.blob_referenced(BlobRef("hot", "b2"))
    mark = {"study": "1.2.1", "series": "1.2.1.2", "code": "113001", "time": "t", "who": "w", "note": ""}
    assert index.reject({"1.16.2": mark}) == 1
    index.begin_purge({"1.16.2": {"kind": "instance", "sop": "1.16.2", "blobs": [["hot", "blob-1.16.2"]]}})
    assert index.finish_purge("1.16.2")
    st = index.study("1.2.1")
    assert st.n_series == 1 and st.n_instances == 1 and st.modalities == ("SM",) and index.series("1.2.1.2") is None
    assert index.stats().instances == 1 and index.patient("P1^").n_studies == 1


def test_backup_is_a_copy_and_refuses_a_used_directory(index, tmp_path):
    index.add_instance(new("1.17.1"), replace=False)
    path = index.backup(tmp_path / "bk")
    assert path.is_file() and path.stat().st_size > 0
    with pytest.raises(FileExistsError):
        index.backup(tmp_path / "bk")


def _second_index(request, tmp_path, backend: str):
    if backend == "lmdb":
        return LmdbIndex(tmp_path / "index-2", map_size=1 << 30)
    from archive.index.postgresql import PostgresIndex

    return PostgresIndex(request.getfixturevalue("postgres").create_database(), pool_size=4)


def _mixed_batch() -> list[NewInstance]:
    """A bulk load's mixed batch: new instances in an existing series and study, a new series of
    another modality and SOP class, new studies (one patient with two, a multi-valued
    PatientName), a cold-tier instance, a table without CRCs yet, no frames, no bulk data, an
    existing UID with other bytes and a UID the batch holds twice."""
    from dataclasses import replace

    def at(n: NewInstance, second: int, tier: str | None = None) -> NewInstance:
        rec = replace(n.record, received=f"2026-01-01T00:00:{second:02d}.000")
        if tier:
            rec = replace(rec, blob=BlobRef(tier, rec.blob.key))
        return replace(n, record=rec)

    two = {"vr": "PN", "Value": [{"Alphabetic": "Roe^Ann"}, {"Alphabetic": "Poe^Edgar"}]}
    multi = new("1.20.6", study="1.2.3", series="1.2.3.1", pid="P2", acc="A3", date="20240505")
    multi = replace(multi, patient_attrs={**multi.patient_attrs, "00100010": two},
                    study_attrs={**multi.study_attrs, "00100010": two})
    return [
        at(new("1.20.1", size=10), 1),
        at(new("1.20.9", sha="e" * 64), 2),  # exists with other bytes: left alone, not counted
        at(new("1.20.2", series="1.2.1.2", modality="XC", sop_class=SC, size=20, frames=()), 3),
        at(new("1.20.3", study="1.2.2", series="1.2.2.1", pid="P2", acc="A2", date="20240404", size=30), 4, "cold"),
        at(new("1.20.1", sha="f" * 64), 5),  # the batch's second of a UID: the first wins
        replace(at(new("1.20.4", study="1.2.2", series="1.2.2.1", pid="P2", size=40), 6), crcs=None),
        replace(at(new("1.20.5", study="1.2.2", series="1.2.2.2", pid="P2", modality="XC", size=50), 7), bulk={}),
        at(multi, 8),
        at(new("1.20.7", series="1.2.1.2", modality="XC", sop_class=SC, size=70), 9, "cold"),
    ]


def _same(a, b) -> bool:
    """Records equal, their attribute subsets and per-tier counts too (not compared by ==)."""
    return (a is not None and a == b and dict(a.attrs) == dict(b.attrs)
            and dict(getattr(a, "tiers", {})) == dict(getattr(b, "tiers", {})))


def test_add_instances_equals_one_add_instance_after_another(index, request, tmp_path):
    """Bulk loads (index rebuilds, `pathpacs index migrate`) must leave every record exactly as
    single adds do: counts, bytes, tiers, modalities, SOP classes, attributes, updated times."""
    backend = request.node.callspec.params["index"]
    single = _second_index(request, tmp_path, backend)
    try:
        _bulk_equals_single(index, single)
    finally:
        single.close()


def test_add_instances_in_statements_of_a_few_rows_each(request, tmp_path, monkeypatch):
    """PostgreSQL cuts a batch's rows into statements of at most CHUNK_BYTES: the same records."""
    from archive.index import postgresql

    monkeypatch.setattr(postgresql, "CHUNK_BYTES", 2000)  # a row or two per statement
    index, single = postgresql_index(request, tmp_path), _second_index(request, tmp_path, "postgresql")
    try:
        _bulk_equals_single(index, single)
    finally:
        index.close()
        single.close()


def _bulk_equals_single(index, single) -> None:
    """The mixed batch bulk-loaded into `index` and added one by one to `single`: every record alike."""
    for idx in (index, single):
        assert idx.add_instance(new("1.20.9", size=5), replace=False).outcome is Outcome.STORED
    batch = _mixed_batch()
    assert index.add_instances(batch) == 7
    stored = [single.add_instance(n, replace=False).outcome for n in batch]
    assert stored.count(Outcome.STORED) == 7 and stored.count(Outcome.REJECTED) == 2
    sops = sorted({n.record.sop for n in batch})
    for sop in sops:
        assert _same(index.instance(sop), single.instance(sop))
        assert index.all_frames(sop) == single.all_frames(sop)
        assert index.metadata([sop]) == single.metadata([sop])
        assert index.bulk_values(sop) == single.bulk_values(sop)
    assert index.instance("1.20.9").sha256 == "a" * 64 and index.instance("1.20.1").sha256 == "a" * 64
    for uid in ("1.2.1.1", "1.2.1.2", "1.2.2.1", "1.2.2.2", "1.2.3.1"):
        assert _same(index.series(uid), single.series(uid))
    for uid in ("1.2.1", "1.2.2", "1.2.3"):
        assert _same(index.study(uid), single.study(uid))
    for key in ("P1^", "P2^"):
        assert _same(index.patient(key), single.patient(key))
    st = index.study("1.2.1")
    assert (st.n_series, st.n_instances, st.bytes, st.tiers) == (2, 4, 105, {"hot": 3, "cold": 1})
    assert st.modalities == ("SM", "XC") and st.sop_classes == (WSI, SC) and st.updated.endswith(":09.000")
    assert index.patient("P2^").n_studies == 2 and index.study("1.2.2").n_series == 2
    for walk in ("patients", "studies", "_all_series", "instances"):
        if hasattr(index, walk):
            a, b = list(getattr(index, walk)()), list(getattr(single, walk)())
            assert len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    assert index.stats() == single.stats()
    assert index.checksum_todo(10) == single.checksum_todo(10) == ["1.20.4"]
    studies = lambda idx, keys: sorted(r.study for r in _search(idx, "STUDY", keys))  # noqa: E731
    for keys in ([Key("00100010", "PN", ["poe*"])], [Key("00100010", "PN", ["roe^ann"])],
                 [Key("00100010", "PN", ["doe*"])], [Key("00100020", "LO", ["P2"])],
                 [Key("00080050", "SH", ["A3"])], [Key("00080020", "DA", ["20240101-20241231"])]):
        assert studies(index, keys) == studies(single, keys)
    assert studies(index, [Key("00100010", "PN", ["poe*"])]) == ["1.2.3"]
    assert studies(index, [Key("00080020", "DA", ["20240101-20241231"])]) == ["1.2.2", "1.2.3"]
    assert index.add_instances(batch) == 0 and index.study("1.2.1").n_instances == 4
