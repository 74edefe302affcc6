"""Retention (issue 10): the 15-year default, `[[retention]]` rules, the report, and what they
block: purge (and a reject for 113039 "Data Retention Policy Expired") is refused with the date
retention ends; a legal hold blocks reject and purge. Through the CLI, as an admin would."""
from __future__ import annotations

import subprocess
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest

import factory
from conftest import run_cli

BASE = """
[tiers.hot]
path = "{root}/hot"
[deletion]
purge_after_days = 0
"""


def setup(tmp: Path, extra: str = "") -> tuple[Path, Path]:
    cfg = tmp / "retention.toml"
    cfg.write_text(BASE.format(root=tmp / "tiers") + extra)
    return cfg, tmp / "data"


def cli(cfg: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, "--config", str(cfg), data=data)


def store(tmp: Path, cfg: Path, data: Path, name: str, **kw) -> str:
    path = factory.secondary_capture(tmp / name / "sc.dcm", **kw)
    res = cli(cfg, data, "import", "--quiet", str(path))
    assert res.returncode == 0 and "1 stored" in res.stdout, res.stdout + res.stderr
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def blobs(tmp: Path) -> int:
    return sum(1 for p in (tmp / "tiers" / "hot").rglob("*") if p.is_file() and "blobs" in p.parts)


def years_later(d: date, years: int) -> date:
    try:
        return d.replace(year=d.year + years)
    except ValueError:
        return d.replace(year=d.year + years, day=28)


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip()


def test_default_15_years_from_study_date_blocks_purge_with_the_date(tmp_path):
    cfg, data = setup(tmp_path)
    study = store(tmp_path, cfg, data, "new", study_date="20200315")
    res = cli(cfg, data, "reject", "--study", study, "--reason", "safety")
    assert res.returncode == 0, res.stderr
    line = one_line(cli(cfg, data, "purge"))
    assert line == (f"pathpacs: purge refused: study {study} is under retention until 2035-03-15 "
                    "(15 years from study_date)")
    assert blobs(tmp_path) == 2  # the instance and its rejection note, both kept
    # 113039 "Data Retention Policy Expired" is refused too, with the date
    study2 = store(tmp_path, cfg, data, "new2", study_date="20200315", patient_id="P9")
    line = one_line(cli(cfg, data, "reject", "--study", study2, "--reason", "113039"))
    assert line == (f"pathpacs: error: reject (data retention policy expired) refused: study {study2} is under "
                    "retention until 2035-03-15 (15 years from study_date)")
    # restore is always possible before purge
    assert cli(cfg, data, "restore", "--study", study).returncode == 0


def test_expired_retention_allows_113039_and_purge(tmp_path):
    cfg, data = setup(tmp_path)
    study = store(tmp_path, cfg, data, "old", study_date="19990101")
    res = cli(cfg, data, "reject", "--study", study, "--reason", "retention")
    assert res.returncode == 0 and "(113039)" in res.stdout, res.stderr
    res = cli(cfg, data, "purge")
    assert res.returncode == 0 and res.stdout.startswith("purged 2 instances of 1 studies"), res.stdout + res.stderr
    assert blobs(tmp_path) == 0


def test_legal_hold_blocks_reject_and_purge(tmp_path):
    cfg, data = setup(tmp_path)
    study = store(tmp_path, cfg, data, "held", study_date="19990101")
    assert cli(cfg, data, "tier", "hold", "--study", study).returncode == 0
    line = one_line(cli(cfg, data, "reject", "--study", study, "--reason", "quality"))
    assert line == f"pathpacs: error: reject refused: study {study} is under legal hold (pathpacs tier release --study)"
    assert cli(cfg, data, "tier", "release", "--study", study).returncode == 0
    assert cli(cfg, data, "reject", "--study", study, "--reason", "quality").returncode == 0
    assert cli(cfg, data, "tier", "hold", "--study", study).returncode == 0
    line = one_line(cli(cfg, data, "purge"))
    assert line == f"pathpacs: purge refused: study {study} is under legal hold (pathpacs tier release --study)"
    assert blobs(tmp_path) == 2
    assert cli(cfg, data, "tier", "release", "--study", study).returncode == 0
    assert cli(cfg, data, "purge").returncode == 0 and blobs(tmp_path) == 0


def test_rules_match_longest_wins_and_report(tmp_path):
    today = datetime.now(timezone.utc).date()
    cfg, data = setup(tmp_path, """
[[retention]]
years = 15
[[retention]]
match = { StudyDescription = "Inpatient*" }
years = 30
[[retention]]
match = { Modality = "OT", PatientID = "SHORT" }
years = 1
from = "received"
""")
    old15 = (today - timedelta(days=365 * 15 + 10)).strftime("%Y%m%d")  # 15 years over: expired
    inpatient = store(tmp_path, cfg, data, "inp", study_date=old15, study_description="Inpatient case",
                      patient_id="IN1")
    expired = store(tmp_path, cfg, data, "exp", study_date=old15, patient_id="EX1")
    short = store(tmp_path, cfg, data, "short", study_date=old15, patient_id="SHORT")

    res = cli(cfg, data, "retention", "report")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    d15 = years_later(date(int(old15[:4]), int(old15[4:6]), int(old15[6:])), 15).isoformat()
    # the catch-all (15 years from the study date) is over for `expired`; the 30-year rule keeps the
    # inpatient study; for `short` the 1-year rule from receipt ends later than the catch-all,
    # which matches too: the longest keep wins
    assert lines == [f"expired  {d15}  study {expired}  (15 years from study_date)",
                     "1 studies expired, 0 expire within 0 days"], res.stdout
    d30 = years_later(date(int(old15[:4]), int(old15[4:6]), int(old15[6:])), 30)
    d1 = years_later(today, 1).isoformat()
    within = (d30 - today).days
    res = cli(cfg, data, "retention", "report", "--within", str(within))
    assert res.stdout.splitlines() == [
        f"expired  {d15}  study {expired}  (15 years from study_date)",
        f"expires  {d1}  study {short}  (1 years from received, match {{'Modality': 'OT', 'PatientID': 'SHORT'}})",
        f"expires  {d30.isoformat()}  study {inpatient}  (30 years from study_date, match "
        "{'StudyDescription': 'Inpatient*'})",
        f"1 studies expired, 2 expire within {within} days"], res.stdout
    res = cli(cfg, data, "retention", "report", "--within", str(within - 1))
    assert res.stdout.splitlines()[-1] == f"1 studies expired, 1 expire within {within - 1} days", res.stdout

    assert cli(cfg, data, "reject", "--study", inpatient, "--reason", "quality").returncode == 0
    line = one_line(cli(cfg, data, "purge"))
    assert line == (f"pathpacs: purge refused: study {inpatient} is under retention until {d30.isoformat()} "
                    "(30 years from study_date, match {'StudyDescription': 'Inpatient*'})")


def test_only_short_rule_counts_from_received(tmp_path):
    cfg, data = setup(tmp_path, """
[[retention]]
match = { PatientID = "SHORT" }
years = 1
from = "received"
""")
    study = store(tmp_path, cfg, data, "s", study_date="19900101", patient_id="SHORT")
    other = store(tmp_path, cfg, data, "o", study_date="19900101", patient_id="OTHER")
    until = years_later(datetime.now(timezone.utc).date(), 1).isoformat()
    res = cli(cfg, data, "retention", "report", "--within", "400")
    assert res.stdout.splitlines() == [f"expires  {until}  study {study}  (1 years from received, match "
                                       "{'PatientID': 'SHORT'})", "0 studies expired, 1 expire within 400 days"]
    # a study no configured rule matches is not under retention
    assert cli(cfg, data, "reject", "--study", other, "--reason", "quality").returncode == 0
    assert cli(cfg, data, "purge").returncode == 0 and blobs(tmp_path) == 1  # `study`'s instance alone


@pytest.mark.parametrize("extra, message", [
    ("[deletion]\npurge_after_days = -1\n", "deletion.purge_after_days: Input should be greater than or equal to 0"),
    ("[[retention]]\nyears = 0\n", "retention.0.years: Input should be greater than or equal to 1"),
    ("[[retention]]\nyears = 15\nfrom = \"discharge\"\n", "retention.0.from: Input should be"),
    ("[[retention]]\nyears = 15\nmatch = { NoSuchAttr = \"x\" }\n", "retention[0].match: unknown attribute 'NoSuchAttr'"),
    ("[[retention]]\nyears = 15\nkeep = true\n", "unknown key retention.0.keep"),
])
def test_bad_deletion_config_is_one_line(tmp_path, extra, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(extra)
    res = run_cli("retention", "report", "--config", str(cfg), data=tmp_path / "data")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr, res.stderr


def test_cli_errors_are_one_line(tmp_path):
    cfg, data = setup(tmp_path)
    store(tmp_path, cfg, data, "x", study_date="19900101")
    line = one_line(cli(cfg, data, "reject", "--study", "1.2.3", "--reason", "quality"))
    assert line == "pathpacs: error: study 1.2.3 not found"
    line = one_line(cli(cfg, data, "reject", "--instance", "1.2.3", "--reason", "bored"))
    assert "is not a rejection reason (PS3.16 CID 7011: 113001 (quality)" in line
    line = one_line(cli(cfg, data, "restore", "--series", "1.2.3"))
    assert line == "pathpacs: error: series 1.2.3 not found"
    line = one_line(cli(cfg, data, "restore", "--study", "1.2.3", "--replaced"))
    assert line == "pathpacs: error: --replaced restores a replaced version of one --instance"


def test_purge_waits_purge_after_days(tmp_path):
    cfg, data = setup(tmp_path)
    cfg.write_text(cfg.read_text().replace("purge_after_days = 0", "purge_after_days = 30"))
    study = store(tmp_path, cfg, data, "wait", study_date="19990101")
    assert cli(cfg, data, "reject", "--study", study, "--reason", "quality").returncode == 0
    res = cli(cfg, data, "purge")
    assert res.returncode == 0 and res.stdout.splitlines() == [
        "purged 0 instances of 0 studies and 0 replaced versions (0 bytes)"], res.stdout
    assert blobs(tmp_path) == 2
    listed = cli(cfg, data, "rejected").stdout.splitlines()
    assert len(listed) == 2 and all(f"study {study}" in line for line in listed)
