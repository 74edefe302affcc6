"""Config loading (archive/config.py): defaults, the schema's types and ranges, old keys, paths."""
from __future__ import annotations

from pathlib import Path

import pytest

from archive.config import Config, ConfigError, load, validate


def _load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load(p)


def test_defaults_need_no_file():
    c = load(None)
    assert (c.aet, c.dicom_port, c.http_port, c.max_pdu, c.acse_timeout) == ("PATHPACS", 11112, 8080, 4 << 20, 10.0)
    assert c.trusted_proxies == [] and c.max_results == 10000


def test_values_and_relative_paths(tmp_path):
    c = _load(tmp_path, '[archive]\ndata_dir = "d"\naet = "ARCH"\n[dimse]\nacse_timeout = 2\nmax_pdu = 65536\n'
                        '[http]\nworkers = 2\ntrusted_proxies = ["10.0.0.0/8"]\n'
                        '[nodes.v]\naet = "VIEWER"\nhost = "10.0.0.5"\nport = 104\n')
    assert c.data_dir == tmp_path / "d" and c.aet == "ARCH" and c.acse_timeout == 2.0 and c.max_pdu == 65536
    assert c.http_workers == 2 and c.trusted_proxies == ["10.0.0.0/8"]
    assert c.node_by_aet("VIEWER").port == 104 and c.node_by_aet("NOPE") is None


@pytest.mark.parametrize("text, where", [
    ("[archive]\ndicom_port = true\n", "archive.dicom_port"),
    ("[archive]\nhttp_port = 8080.5\n", "archive.http_port"),
    ("[archive]\nhttp_port = 70000\n", "archive.http_port"),
    ('[archive]\naet = "WAY-TOO-LONG-AE-TITLE"\n', "archive.aet"),
    ("[dimse]\nmax_associations = 0\n", "dimse.max_associations"),
    ("[dimse]\nmax_pdu = 0\n", "dimse.max_pdu"),
    ('[dimse]\nacse_timeout = "10"\n', "dimse.acse_timeout"),
    ("[http]\nmax_results = -1\n", "http.max_results"),
    ('[nodes.x]\naet = "X"\nport = 1\n', "nodes.x.host"),
    ("[surprise]\n", "unknown config section [surprise]"),
    ("[http]\nwrokers = 2\n", "unknown key http.wrokers"),
])
def test_schema_errors_are_one_line_naming_the_key(tmp_path, text, where):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    assert where in str(exc.value) and "\n" not in str(exc.value)


def test_flags_are_checked_like_the_file():
    c = Config()
    c.dicom_port = 0
    with pytest.raises(ConfigError, match="archive.dicom_port"):
        validate(c)
    c = Config()
    c.aet = "  PADDED  "
    assert validate(c).aet == "PADDED"


def test_old_dimse_keys_in_archive_still_read(tmp_path):
    c = _load(tmp_path, "[archive]\nmax_associations = 8\nnetwork_timeout = 60\n[dimse]\nnetwork_timeout = 30\n")
    assert c.max_associations == 8 and c.network_timeout == 30.0
