"""The study browser at / (dicomweb/pages.py, archive/browse.py): QIDO search as the page uses
it (names in every component group, case-insensitive, dates, modality), the per-study summary,
paging and the two languages in a real chromium, and the first run (`serve --demo`)."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import factory
from archive.audit.trail import Trail
from conftest import run_cli


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _stained(substances: list[str] | None = None, short: str | None = None) -> Sequence:
    """A SpecimenDescriptionSequence: one staining step using each substance (PS3.3 C.8.12.2.1)."""
    spec = Dataset()
    spec.SpecimenIdentifier, spec.SpecimenUID = "S1", pydicom.uid.generate_uid()
    step = Dataset()
    items = []
    for s in substances or []:
        item = Dataset()
        item.ValueType = "CODE"
        item.ConceptNameCodeSequence = Sequence([_code("424361007", "SCT", "Using substance")])
        item.ConceptCodeSequence = Sequence([_code("0", "SCT", s)])
        items.append(item)
    step.SpecimenPreparationStepContentItemSequence = Sequence(items)
    spec.SpecimenPreparationSequence = Sequence([step] if items else [])
    if short:
        spec.SpecimenShortDescription = short
    return Sequence([spec])


def slide(outdir: Path, name: str, accession: str, date: str, *, substances=None, short=None,
          levels=((512, 512), (256, 256))) -> list[Path]:
    """A small WSI study whose patient name may carry Chinese (UTF-8, ISO_IR 192)."""
    files = factory.wsi_series(outdir, levels=levels, patient_id="PID-" + accession, accession=accession,
                               study_date=date)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.SpecimenDescriptionSequence = _stained(substances, short)
        ds.save_as(f, enforce_file_format=True)
    return files


def _accessions(server, **params) -> list[str]:
    r = requests.get(server.dicomweb_url + "/studies", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return sorted(s["00080050"]["Value"][0] for s in r.json())


def _corpus(tmp_path: Path, server) -> dict[str, list[Path]]:
    made = {
        "A-WANG": slide(tmp_path / "a", "Wang^Xiaodong=王^小东", "A-WANG", "20240315",
                        substances=["Hematoxylin stain", "Eosin stain"]),
        "B-FANG": slide(tmp_path / "b", "王^芳", "B-FANG", "20241120", short="Ki-67"),
        "D-SMITH": slide(tmp_path / "d", "SMITH^Anna", "D-SMITH", "20250101", short="H&E"),
    }
    made["C-SMITH"] = [factory.secondary_capture(tmp_path / "c" / "c.dcm", patient_id="PID-C", patient_name="Smith^John",
                                                 accession="C-SMITH", study_date="20230101")]
    run_cli("import", "--quiet", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), str(tmp_path / "d"),
            data=server.data_dir, check=True)
    return made


def test_qido_matches_person_names_in_every_group_case_insensitively(server, tmp_path):
    _corpus(tmp_path, server)
    assert _accessions(server, PatientName="王*") == ["A-WANG", "B-FANG"]  # ideographic group and plain
    assert _accessions(server, PatientName="王^小东") == ["A-WANG"]
    assert _accessions(server, PatientName="wang*") == ["A-WANG"]
    assert _accessions(server, PatientName="WANG^XIAODONG") == ["A-WANG"]
    assert _accessions(server, PatientName="smith*") == ["C-SMITH", "D-SMITH"]
    assert _accessions(server, PatientName="*小*") == ["A-WANG"]  # no index prefix: matched in full
    assert _accessions(server, StudyDate="20240101-20241231") == ["A-WANG", "B-FANG"]
    assert _accessions(server, StudyDate="20240101-20241231", PatientName="wang*") == ["A-WANG"]
    assert _accessions(server, ModalitiesInStudy="OT") == ["C-SMITH"]
    assert _accessions(server, ModalitiesInStudy="SM") == ["A-WANG", "B-FANG", "D-SMITH"]
    r = requests.get(server.dicomweb_url + "/studies", params={"PatientName": "王*"}, timeout=30)
    names = sorted(s["00100010"]["Value"][0].get("Ideographic") or s["00100010"]["Value"][0]["Alphabetic"]
                   for s in r.json())
    assert names == ["王^小东", "王^芳"]


def test_study_summaries_give_slides_stain_size_and_tier(server, tmp_path):
    made = _corpus(tmp_path, server)
    studies = {}
    for acc in ("A-WANG", "B-FANG", "C-SMITH"):
        studies[acc] = pydicom.dcmread(made[acc][0], stop_before_pixels=True).StudyInstanceUID
    r = requests.get(server.http_url + "/browser/studies",
                     params=[("study", studies["A-WANG"]), ("study", studies["B-FANG"]),
                             ("study", studies["C-SMITH"]), ("study", "1.2.3.999")], timeout=30)
    assert r.status_code == 200, r.text
    got = {s["study"]: s for s in r.json()}
    assert list(got) == [studies["A-WANG"], studies["B-FANG"], studies["C-SMITH"]]  # the unknown one left out
    a = got[studies["A-WANG"]]
    assert a["bytes"] == sum(os.path.getsize(f) for f in made["A-WANG"])
    assert a["tiers"] == {"hot": 2} and a["availability"] == "ONLINE"
    [sa] = a["slides"]
    assert sa["stain"] == ["Hematoxylin stain", "Eosin stain"] and sa["instances"] == 2
    assert sa["series"] == pydicom.dcmread(made["A-WANG"][0], stop_before_pixels=True).SeriesInstanceUID
    assert sa["bytes"] == a["bytes"] and sa["label"] is False and sa["overview"] is False
    assert [s["stain"] for s in got[studies["B-FANG"]]["slides"]] == [["Ki-67"]]  # the short description
    assert got[studies["C-SMITH"]]["slides"] == []  # not a slide: no SM series
    r = requests.get(server.http_url + "/browser/studies", timeout=30)
    assert r.status_code == 400 and "study" in r.text
    r = requests.get(server.http_url + "/browser/studies", params=[("study", f"1.2.{i}") for i in range(101)], timeout=30)
    assert r.status_code == 400 and "at most 100" in r.text
    # audited as QIDO is: who asked, what, how many answered; a refused request too
    def browser_queries() -> list[dict]:
        return [r.event for r in Trail(server.data_dir / "audit").records()
                if r.event["kind"] == "queried" and r.event["detail"].get("via") == "browser"]

    _wait(lambda: len(browser_queries()) == 3)
    asked, empty, too_many = browser_queries()
    assert asked["detail"]["results"] == 3 and asked["outcome"] == 0
    assert asked["objects"][0]["query"] == "&".join(
        "study=" + u for u in (studies["A-WANG"], studies["B-FANG"], studies["C-SMITH"], "1.2.3.999"))
    assert asked["participants"][0]["user_id"] == "anonymous" and asked["participants"][0]["address"] == "127.0.0.1"
    assert empty["outcome"] == 4 and "at least one study" in empty["outcome_text"]
    assert too_many["outcome"] == 4 and "at most 100" in too_many["outcome_text"]
    requests.get(server.http_url + "/browser/studies", params={"study": studies["B-FANG"]}, timeout=30)
    _wait(lambda: len(browser_queries()) == 4)
    one = browser_queries()[-1]
    assert [o["id"] for o in one["objects"] if o["id_type"][0] == "110180"] == [studies["B-FANG"]]


def _wait(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_summaries_follow_the_token_and_its_scope(make_server, tmp_path):
    server = make_server(config_text='[auth]\nmode = "token"\n')
    made = _corpus(tmp_path, server)
    a = pydicom.dcmread(made["A-WANG"][0], stop_before_pixels=True).StudyInstanceUID
    b = pydicom.dcmread(made["B-FANG"][0], stop_before_pixels=True).StudyInstanceUID
    url = server.http_url + "/browser/studies"
    assert requests.get(url, params={"study": a}, timeout=30).status_code == 401
    scoped = run_cli("token", "create", "--role", "viewer", "--study", a, data=server.data_dir,
                     check=True).stdout.strip()
    r = requests.get(url, params=[("study", a), ("study", b)], headers={"Authorization": "Bearer " + scoped}, timeout=30)
    assert r.status_code == 200 and [s["study"] for s in r.json()] == [a]
    uploader = run_cli("token", "create", "--role", "uploader", data=server.data_dir, check=True).stdout.strip()
    assert requests.get(url, params={"study": a}, headers={"Authorization": "Bearer " + uploader},
                        timeout=30).status_code == 403
    # the sorted search answers what the token may see, like QIDO
    search = server.http_url + "/browser/search"
    assert requests.get(search, timeout=30).status_code == 401
    r = requests.get(search, params={"sort": "-date"}, headers={"Authorization": "Bearer " + scoped}, timeout=30)
    assert r.status_code == 200 and [s["0020000D"]["Value"][0] for s in r.json()] == [a]
    assert requests.get(search, headers={"Authorization": "Bearer " + uploader}, timeout=30).status_code == 403


def _rows(page) -> list[str]:
    return page.eval_on_selector_all("#studies tbody tr td.accession", "tds => tds.map(t => t.textContent)")


def _answers(page) -> int:
    return int(page.evaluate("() => document.body.dataset.answers || '0'"))


def _act(page, action) -> None:
    """Do `action` (a click) and wait until the page has shown the answer it asked for."""
    n = _answers(page)
    action()
    page.wait_for_function(f"() => parseInt(document.body.dataset.answers || '0') > {n}", timeout=15000)


def _search(page, **fields) -> list[str]:
    _act(page, lambda: page.click("#clear"))
    for sel, value in fields.items():
        if sel == "q-mod":
            page.select_option("#" + sel, value)
        else:
            page.fill("#" + sel, value)
    _act(page, lambda: page.click("#go"))
    return sorted(_rows(page))


def test_the_page_searches_by_name_date_and_modality(server, browser, tmp_path):
    _corpus(tmp_path, server)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.http_url + "/")
    page.wait_for_function("() => document.body.dataset.answers === '1'", timeout=15000)
    assert sorted(_rows(page)) == ["A-WANG", "B-FANG", "C-SMITH", "D-SMITH"]
    assert _search(page, **{"q-name": "王"}) == ["A-WANG", "B-FANG"]
    assert _search(page, **{"q-name": "wang"}) == ["A-WANG"]  # lower case, a prefix
    assert _search(page, **{"q-name": "smith"}) == ["C-SMITH", "D-SMITH"]
    assert _search(page, **{"q-from": "2024-01-01", "q-to": "2024-12-31"}) == ["A-WANG", "B-FANG"]
    assert _search(page, **{"q-mod": "OT"}) == ["C-SMITH"]
    assert _search(page, **{"q-acc": "D-SMITH"}) == ["D-SMITH"]
    # a row: its slide's thumbnail (series level, Bearer-free here), stain, slide count, size, tier
    assert _search(page, **{"q-name": "wang"}) == ["A-WANG"]
    row = page.locator("#studies tbody tr").first
    assert row.locator("td.stain").inner_text() == "Hematoxylin stain, Eosin stain"
    assert row.locator("td.count").inner_text() == "1"
    assert row.locator("td.storage").inner_text() == "hot · online"
    assert "Wang, Xiaodong (王小东)" in row.locator("td.patient").inner_text()
    href = row.locator("td.thumbs a").first.get_attribute("href")
    assert href.startswith("viewer?study=") and "&series=" in href
    page.wait_for_function("() => { const i = document.querySelector('#studies td.thumbs img'); "
                           "return i && i.complete && i.naturalWidth > 0; }", timeout=15000)
    assert _search(page, **{"q-name": "nobody"}) == []
    assert "No study matches." in page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "browser-search.png"))
    assert errors == []


def _dated_corpus(tmp_path: Path, server) -> list[str]:
    """30 studies imported in shuffled date order (three pairs on one day at different times, two
    without a date); returns their accessions newest first (date, time, UID; undated last)."""
    rng = random.Random(11)
    specs = [(f"2024{1 + i // 28:02d}{1 + i % 28:02d}", "101500") for i in range(22)]
    specs += [("20230505", "080000"), ("20230505", "173000"), ("20250101", "000001"), ("20250101", "235959"),
              ("20240110", "120000"), ("20240110", "120001"), ("", ""), ("", "")]
    rng.shuffle(specs)
    order = []
    for i, (date, when) in enumerate(specs):
        f = factory.secondary_capture(tmp_path / "p" / f"{i}.dcm", patient_id=f"PG-{i:02d}", accession=f"PG-{i:02d}",
                                      patient_name=f"Page^P{i:02d}", study_date=date, study_time=when)
        order.append((date, when, pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID, f"PG-{i:02d}"))
    run_cli("import", "--quiet", str(tmp_path / "p"), data=server.data_dir, check=True)
    dated = sorted((o for o in order if o[0]), reverse=True)
    undated = sorted(o for o in order if not o[0])
    return [o[3] for o in dated + undated]


def _sorted_pages(server, size: int, **params) -> list[list[str]]:
    pages, offset = [], 0
    while True:
        r = requests.get(server.http_url + "/browser/search", params={"limit": size, "offset": offset, **params},
                         timeout=30)
        assert r.status_code == 200, r.text
        pages.append([s["00080050"]["Value"][0] for s in r.json()])
        if "additional results" not in r.headers.get("Warning", ""):
            return pages
        offset += size


def test_browser_search_sorts_by_date_over_every_page(server, tmp_path):
    newest = _dated_corpus(tmp_path, server)
    pages = _sorted_pages(server, 10, sort="-date")
    assert pages == [newest[:10], newest[10:20], newest[20:]]
    dated = [a for a in newest if a not in newest[-2:]]
    oldest = dated[::-1] + newest[-2:]  # undated last in both orders
    assert _sorted_pages(server, 10, sort="date") == [oldest[:10], oldest[10:20], oldest[20:]]
    assert _sorted_pages(server, 7) == [newest[i:i + 7] for i in range(0, 30, 7)]  # newest first by default
    # narrowed by an indexed key (read and sorted) and by a date range (an index walk), still in order
    by_name = _sorted_pages(server, 4, sort="-date", PatientName="page^p1*")
    assert [a for p in by_name for a in p] == [a for a in newest if a.startswith("PG-1")]
    r = requests.get(server.http_url + "/browser/search",
                     params={"StudyDate": "20240101-20240131", "sort": "date", "limit": 5, "offset": 3}, timeout=30)
    january = [a for a in oldest if a in {s["00080050"]["Value"][0] for s in requests.get(
        server.dicomweb_url + "/studies", params={"StudyDate": "20240101-20240131"}, timeout=30).json()}]
    assert len(january) == 24 and [s["00080050"]["Value"][0] for s in r.json()] == january[3:8]
    assert "additional results" in r.headers["Warning"] and r.headers["Content-Type"] == "application/dicom+json"
    r = requests.get(server.http_url + "/browser/search", params={"sort": "name"}, timeout=30)
    assert r.status_code == 400 and "sort must be one of -date, date" in r.text
    r = requests.get(server.http_url + "/browser/search", params={"StudyDate": "2024"}, timeout=30)
    assert r.status_code == 400 and "StudyDate" in r.text
    queries = lambda: [r.event for r in Trail(server.data_dir / "audit").records()  # noqa: E731
                       if r.event["kind"] == "queried" and r.event["detail"].get("via") == "browser"]
    _wait(lambda: len(queries()) >= 16)
    assert queries()[0]["objects"][0]["query"] == "limit=10&offset=0&sort=-date"
    assert [q["outcome"] for q in queries()[-2:]] == [4, 4]


def test_paging_walks_every_study_once_in_date_order(server, browser, tmp_path):
    newest = _dated_corpus(tmp_path, server)
    page = browser.new_page()
    page.goto(server.http_url + "/")
    page.wait_for_selector("#studies tbody tr", timeout=15000)
    page.wait_for_function("() => document.body.dataset.answers === '1'", timeout=15000)
    page.select_option("#q-size", "10")
    _act(page, lambda: page.click("#go"))
    seen: list[list[str]] = []
    while True:
        seen.append(_rows(page))
        if page.is_disabled("#next"):
            break
        _act(page, lambda: page.click("#next"))
    assert seen == [newest[:10], newest[10:20], newest[20:]]  # the whole result sorted, not each page
    assert page.inner_text("#pageno") == "Page 3"
    assert "21–30 studies." in page.inner_text("#status")
    _act(page, lambda: page.select_option("#q-sort", "asc"))  # back to the first page, oldest first
    oldest = [a for a in newest[:-2]][::-1]
    assert _rows(page) == oldest[:10] and page.inner_text("#pageno") == "Page 1"
    _act(page, lambda: page.click("#next"))
    assert _rows(page) == oldest[10:20] and page.inner_text("#pageno") == "Page 2"
    _act(page, lambda: page.click("#datehead"))  # the date column's header toggles the order too
    assert _rows(page) == newest[:10] and page.get_attribute("#datehead", "aria-sort") == "descending"


def test_the_page_speaks_chinese_from_accept_language_and_remembers_a_switch(server, browser, tmp_path):
    factory.wsi_series(tmp_path / "a", patient_id="ZH-1", accession="ZH-ACC", levels=((256, 256),))
    run_cli("import", "--quiet", str(tmp_path / "a"), data=server.data_dir, check=True)
    r = requests.get(server.http_url + "/", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Language"] == "zh-CN" and "患者姓名" in r.text
    r = requests.get(server.http_url + "/", headers={"Accept-Language": "fr, en;q=0.5, zh;q=0.4"}, timeout=10)
    assert r.headers["Content-Language"] == "en" and "Patient name" in r.text
    ctx = browser.new_context(locale="zh-CN", extra_http_headers={"Accept-Language": "zh-CN"})
    page = ctx.new_page()
    page.goto(server.http_url + "/")
    page.wait_for_selector("#studies tbody tr td.count:not(:empty)", timeout=15000)
    assert page.evaluate("() => document.documentElement.lang") == "zh-CN"
    assert page.inner_text("#go") == "搜索" and "1 个检查。" in page.inner_text("#status")
    assert "在线" in page.inner_text("#studies")
    page.screenshot(path=str(tmp_path / "browser-zh.png"))
    page.select_option("#lang", "en")
    page.wait_for_function("() => document.getElementById('go').textContent === 'Search'")
    assert page.evaluate("() => localStorage.getItem('pathpacs.lang')") == "en"
    page.reload()  # the choice outlives the page, whatever Accept-Language says
    page.wait_for_selector("#studies tbody tr td.count:not(:empty)", timeout=15000)
    assert page.inner_text("#go") == "Search" and "1 study." in page.inner_text("#status")
    ctx.close()


def test_serve_demo_imports_a_slide_into_an_empty_archive_only(make_server, tmp_path):
    plain = make_server(data_dir=tmp_path / "plain")
    r = requests.get(plain.dicomweb_url + "/studies", timeout=30)
    assert r.status_code == 200 and r.json() == []  # plain serve never adds data
    plain.stop()
    demo = make_server(data_dir=tmp_path / "demo", extra=["--demo"])
    [study] = requests.get(demo.dicomweb_url + "/studies", timeout=30).json()
    uid = study["0020000D"]["Value"][0]
    assert study["00100010"]["Value"][0]["Alphabetic"] == "Demo^Slide" and study["00080061"]["Value"] == ["SM"]
    insts = requests.get(demo.dicomweb_url + f"/studies/{uid}/instances", params={"includefield": "00080008"},
                         timeout=30).json()
    kinds = sorted(i["00080008"]["Value"][2] for i in insts)
    assert kinds.count("VOLUME") >= 3 and "LABEL" in kinds and "OVERVIEW" in kinds
    [summary] = requests.get(demo.http_url + "/browser/studies", params={"study": uid}, timeout=30).json()
    [s] = summary["slides"]
    assert s["label"] and s["overview"] and s["stain"] == ["H&E"] and s["instances"] == len(insts)
    demo.stop()
    again = make_server(data_dir=tmp_path / "demo", extra=["--demo"])  # not empty: nothing added
    assert len(requests.get(again.dicomweb_url + "/studies", timeout=30).json()) == 1
    assert len(requests.get(again.dicomweb_url + f"/studies/{uid}/instances", timeout=30).json()) == len(insts)
    again.stop()
    mine = tmp_path / "mine"
    factory.wsi_series(tmp_path / "m", patient_id="MINE", accession="MINE", levels=((256, 256),))
    run_cli("import", "--quiet", str(tmp_path / "m"), data=mine, check=True)
    own = make_server(data_dir=mine, extra=["--demo"])
    assert _accessions(own) == ["MINE"]


def test_a_schema_5_index_finds_ideographic_names_after_its_migration(make_server, tmp_path):
    """Schema 5 indexed a name's Alphabetic group only. An index written today, taken back to that
    state (its ideographic keys removed, schema 5 recorded), gains every group on open (schema 6)
    and `王*` finds the study again."""
    import lmdb

    slide(tmp_path / "in", "Wang^Xiaodong=王^小东", "OLD-WANG", "20240315", levels=((256, 256),))
    data = tmp_path / "data"
    run_cli("import", "--quiet", str(tmp_path / "in"), data=data, check=True)
    env = lmdb.open(str(data / "index"), max_dbs=32)
    with env.begin(write=True) as txn:
        idx = env.open_db(b"study_idx", txn=txn, create=False)
        state = env.open_db(b"state", txn=txn, create=False)
        assert txn.get(b"schema", db=state) == b"6"
        keys = [bytes(k) for k, _ in txn.cursor(db=idx) if bytes(k).startswith("00100010=".encode())]
        assert sorted(k.split(b"\0")[0].decode() for k in keys) == ["00100010=wang^xiaodong", "00100010=王^小东"]
        assert txn.delete([k for k in keys if "王".encode() in k][0], db=idx)
        txn.put(b"schema", b"5", db=state)
    env.close()
    server = make_server(data_dir=data)
    assert _accessions(server, PatientName="王*") == ["OLD-WANG"]
    assert _accessions(server, PatientName="wang*") == ["OLD-WANG"]


NAMES = ["Smith^P1999", "SMITH^P19990", "Jones^P2199", "Wang^Xiaodong=王^小东", "王^芳", "İnce^Ayşe", "ΟΔΥΣΣΕΥΣ^Νίκος",
         "Müller^Jürgen", "O'Brien^Seán", "", "Smythe^Ann", "Garcia^Ana=ガルシア^アナ=がるしあ^あな"]
PATTERNS = ["*P1999*", "*p1999*", "*1999", "sm?th*", "*m?th*", "*小*", "*王*", "*İ*", "*i̇nce*", "*ΣΣ*", "*σ^*",
            "*ς*", "*üll*", "*'b*", "*^*", "?*", "*a*a*a*", "*アナ", "*が*", "s*h^p*9", "*xyz*", "j?nes^p2199", "*^"]


def test_name_patterns_without_a_prefix_find_what_matching_finds(tmp_path):
    """The planner's scan of the name keys (archive/index/lmdb.py `_name_pattern`) is a superset
    of PS3.4 matching, whatever the script and case folding: the answers equal a brute-force
    match of every study record, sorted or not."""
    from archive import metadata as md
    from archive.index import NewInstance
    from archive.query import Key, match_doc, study_doc
    from archive.records import InstanceRecord
    from archive.service import Archive

    arc = Archive.open(tmp_path / "data")
    try:
        news = []
        for i, name in enumerate(NAMES * 3):
            st, se, sop = f"2.25.{100 + i}", f"2.25.{200 + i}", f"2.25.{300 + i}"
            groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), name.split("="))) if name else {}
            patient = {"00100010": {"vr": "PN", "Value": [groups]} if groups else {"vr": "PN"},
                       "00100020": {"vr": "LO", "Value": [f"P{i}"]}}
            study = {**patient, "0020000D": {"vr": "UI", "Value": [st]},
                     "00080020": {"vr": "DA", "Value": [f"2024{1 + i % 12:02d}{1 + i % 28:02d}"]}}
            rec = {"sop": sop, "sop_class": "1.2.840.10008.5.1.4.1.1.7", "study": st, "series": se,
                   "patient": f"P{i}^", "ts": "1.2.840.10008.1.2.1", "blob": f"none{sop}", "tier": "hot",
                   "size": 1, "sha256": "0" * 64, "received": "2026-01-01T00:00:00"}
            news.append(NewInstance(InstanceRecord.from_json(rec), [], [], md.dumps({**study}), {}, patient, study,
                                    {"0020000E": {"vr": "UI", "Value": [se]}}))
        arc.index.add_instances(news)
        every = list(arc.index.studies())
        for pattern in PATTERNS:
            keys = [Key("00100010", "PN", [pattern])]
            expected = sorted(r.uid for r in every if match_doc(study_doc(r), keys))
            assert sorted(r.study for r in arc.search("STUDY", keys)) == expected, pattern
            newest = [r.study for r in arc.search("STUDY", keys, order="-date")]
            assert sorted(newest) == expected, pattern
        assert len([r for r in arc.search("STUDY", [Key("00100010", "PN", ["*P1999*"])])]) == 6
    finally:
        arc.close()
