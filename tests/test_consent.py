"""Consent (archive.consent): recorded, required for sharing when `consultation.require_consent`,
a guardian's for a patient under 14, withdrawn with its share links, audited.

One real `pathpacs serve` (auth.mode = "token", require_consent = true) for the module; the
CLI records consents and makes links as the hospital's staff would.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests

import factory
from conftest import free_port, run_cli
from conformance.bench.peers import start_pathpacs


def _study(root: Path, name: str, **kw) -> str:
    paths = factory.wsi_series(root / name, levels=((512, 384),), tile=256, **kw)
    return pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent")
    studies = {"adult": _study(root, "adult", patient_id="A1", birth_date="19700101"),
               "child": _study(root, "child", patient_id="K1", birth_date="20150301", study_date="20260102"),
               # 14 since the day before the study: no guardian needed
               "teen": _study(root, "teen", patient_id="T1", birth_date="20120101", study_date="20260102"),
               "p7a": _study(root, "p7a", patient_id="P7"), "p7b": _study(root, "p7b", patient_id="P7")}
    port = free_port()
    config = (f'[auth]\nmode = "token"\n[consultation]\nrequire_consent = true\n'
              f'public_url = "http://127.0.0.1:{port}"\n')
    srv = start_pathpacs(root / "data", config_text=config, http_port=port)
    try:
        run_cli("import", "--quiet", *[str(root / n) for n in studies], "--config", str(srv.config),
                data=srv.data_dir, check=True)
        yield {"srv": srv, **studies}
    finally:
        srv.stop()


def cli(site, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, "--config", str(site["srv"].config), data=site["srv"].data_dir)


def quick(site, *args: str) -> subprocess.CompletedProcess:
    """The same verb run in this process (`archive.cli.main`): for set-up steps, without an
    interpreter's start per call; what a user sees (exit codes, stderr) is checked with `cli`."""
    from archive.cli import main

    argv = [*args, "--config", str(site["srv"].config), "--data", str(site["srv"].data_dir)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def one_line_error(res: subprocess.CompletedProcess, text: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathpacs: error: ") and text in lines[0], res.stderr


def add(site, *args: str) -> dict:
    res = quick(site, "consent", "add", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def share(site, *args: str, run=quick) -> subprocess.CompletedProcess:
    return run(site, "share", "--json", *args)


def series_status(site, study: str, token: str) -> int:
    return requests.get(f"{site['srv'].dicomweb_url}/studies/{study}/series",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_share_needs_a_consent_for_sharing(site):
    res = share(site, "--study", site["adult"], run=cli)
    one_line_error(res, f"no consent on record for share of study {site['adult']}")
    assert res.stdout == ""
    assert json.loads(quick(site, "share", "list", "--json", "--study", site["adult"]).stdout) == []
    # a consent for consultation only does not cover a share link
    consult = add(site, "--study", site["adult"], "--by", "Dr Li", "--scope", "consult", "--ref", "FORM-1")
    assert consult["scope"] == ["consult"] and consult["consented_by"] == "patient"
    one_line_error(share(site, "--study", site["adult"]), "no consent on record for share")
    one_line_error(share(site, "--study", site["adult"], "--consent", "FORM-1"),
                   f"consent {consult['id']} covers consult, not share")
    ok = json.loads(cli(site, "consent", "add", "--json", "--study", site["adult"], "--by", "Dr Li", "--scope",
                        "share,research", "--ref", "ESIGN-77").stdout)
    res = share(site, "--study", site["adult"], run=cli)
    assert res.returncode == 0, res.stderr
    link = json.loads(res.stdout)
    assert link["consent"] == ok["id"]
    assert series_status(site, site["adult"], link["url"].split("#", 1)[1]) == 200
    by_ref = json.loads(share(site, "--study", site["adult"], "--consent", "ESIGN-77").stdout)
    assert by_ref["consent"] == ok["id"]
    listed = json.loads(quick(site, "consent", "list", "--json", "--study", site["adult"]).stdout)
    assert [c["id"] for c in listed] == [consult["id"], ok["id"]]
    assert listed[1]["reference"] == "ESIGN-77" and listed[1]["recorded_by"] == "Dr Li" and listed[1]["time"]
    table = cli(site, "consent", "list").stdout
    assert ok["id"] in table and "research,share" in table and "valid" in table


def test_a_patient_under_14_needs_a_guardian(site):
    one_line_error(cli(site, "consent", "add", "--study", site["child"], "--by", "Dr Li", "--scope", "share"),
                   "the patient is 10 years old: a consent for a patient under 14 is given by a guardian")
    one_line_error(cli(site, "consent", "add", "--study", site["child"], "--by", "Dr Li", "--scope", "share",
                       "--guardian", "Wang Fang"), "needs both --guardian NAME and --relationship")
    rec = add(site, "--study", site["child"], "--by", "Dr Li", "--scope", "share", "--guardian", "Wang Fang",
              "--relationship", "mother", "--ref", "PAPER-9")
    assert (rec["consented_by"], rec["guardian"], rec["relationship"], rec["patient_age"]) == \
        ("Wang Fang", "Wang Fang", "mother", 10)
    assert rec["patient"] == "K1" and rec["study"] == site["child"]
    assert share(site, "--study", site["child"]).returncode == 0
    teen = add(site, "--study", site["teen"], "--by", "Dr Li", "--scope", "consult")
    assert teen["patient_age"] == 14 and teen["consented_by"] == "patient"


def test_a_patient_wide_consent_covers_every_study_of_the_patient(site):
    one_line_error(share(site, "--study", site["p7a"]), "no consent on record")
    rec = add(site, "--patient", "P7", "--by", "Dr Li", "--scope", "share")
    assert rec["study"] is None and rec["patient"] == "P7"
    for study in ("p7a", "p7b"):
        res = share(site, "--study", site[study])
        assert res.returncode == 0 and json.loads(res.stdout)["consent"] == rec["id"], res.stderr
    one_line_error(cli(site, "consent", "add", "--patient", "NOBODY", "--by", "Dr Li", "--scope", "share"),
                   "no study of patient NOBODY is in this archive")


def test_withdrawing_revokes_its_links_within_10_seconds(site):
    rec = add(site, "--study", site["adult"], "--by", "Dr Li", "--scope", "share", "--ref", "W-1")
    links = [json.loads(share(site, "--study", site["adult"], "--consent", rec["id"]).stdout) for _ in range(2)]
    add(site, "--study", site["teen"], "--by", "Dr Li", "--scope", "share")
    other = json.loads(share(site, "--study", site["teen"]).stdout)  # another consent's link
    tokens = [d["url"].split("#", 1)[1] for d in links]
    assert all(series_status(site, site["adult"], t) == 200 for t in tokens)  # cached by the server now
    res = cli(site, "consent", "withdraw", rec["id"])
    assert res.returncode == 0 and all(d["id"] in res.stderr for d in links), res.stderr
    t0 = time.monotonic()
    while any(series_status(site, site["adult"], t) != 401 for t in tokens):
        assert time.monotonic() - t0 < 10, "a link of a withdrawn consent is still accepted"
        time.sleep(0.25)
    assert series_status(site, site["teen"], other["url"].split("#", 1)[1]) == 200
    state = {d["id"]: d["state"] for d in json.loads(quick(site, "share", "list", "--json").stdout)}
    assert [state[d["id"]] for d in links] == ["revoked", "revoked"] and state[other["id"]] == "active"
    withdrawn = next(c for c in json.loads(quick(site, "consent", "list", "--json").stdout) if c["id"] == rec["id"])
    assert withdrawn["withdrawn"] and withdrawn["withdrawn_by"]
    # a withdrawn consent makes no new link
    one_line_error(share(site, "--study", site["adult"], "--consent", rec["id"]), f"consent {rec['id']} was withdrawn")
    assert quick(site, "consent", "withdraw", rec["id"]).returncode == 0  # twice: the first time stays
    again = next(c for c in json.loads(quick(site, "consent", "list", "--json").stdout) if c["id"] == rec["id"])
    assert again["withdrawn"] == withdrawn["withdrawn"]
    one_line_error(cli(site, "consent", "withdraw", "0123456789abcdef"), "no consent 0123456789abcdef")


def test_consents_are_in_the_audit_trail(site):
    rec = add(site, "--study", site["adult"], "--by", "Dr Zhao", "--scope", "consult,share", "--ref", "AUD-1")
    assert quick(site, "consent", "withdraw", rec["id"]).returncode == 0
    res = quick(site, "audit", "list", "--format", "json", "--study", site["adult"])
    events = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    mine = [e for e in events if e.get("detail", {}).get("consent") == rec["id"]]
    assert [e["kind"] for e in mine] == ["consent recorded", "consent withdrawn"], [e["kind"] for e in events]
    recorded = mine[0]
    assert recorded["event_id"][:2] == ["110110", "DCM"] and recorded["action"] == "C"
    assert recorded["detail"]["scope"] == "consult,share" and recorded["detail"]["recorded_by"] == "Dr Zhao"
    assert any(o["id"] == "A1" for o in recorded["objects"])  # the patient, by Patient ID
    assert mine[1]["action"] == "U"
    table = cli(site, "audit", "list", "--patient", "A1", "--event", "consent recorded").stdout
    assert rec["id"] in table


@pytest.mark.parametrize("args, message", [
    (["--scope", "share,teaching"], "unknown consent scope 'teaching'"),
    (["--scope", ","], "a consent needs a scope"),
    (["--study", "1.2.3.4.5", "--scope", "share"], "study 1.2.3.4.5 is not in this archive"),
    (["--study", "not-a-uid", "--scope", "share"], "is not a valid UID"),
    (["--scope", "share", "--patient", "B2", "--study", "ADULT"], "belongs to patient A1, not B2"),
])
def test_bad_consent_arguments_are_one_line(site, args, message):
    args = [site["adult"] if a == "ADULT" else a for a in args]
    if "--study" not in args and "--patient" not in args:
        args = ["--study", site["adult"]] + args
    one_line_error(cli(site, "consent", "add", "--by", "Dr Li", *args), message)
