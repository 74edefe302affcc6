"""Accept-header negotiation (dicomweb/media.py): the one place every resource decides what
bytes go out; unit tests of the table in docs/dicomweb.md."""
from __future__ import annotations

import pytest

from dicomweb.media import (NotAcceptable, negotiate_bulk, negotiate_frames, negotiate_instances,
                            negotiate_metadata, negotiate_rendered, negotiate_search, negotiate_store_response,
                            parse_accept)

JPEG = "1.2.840.10008.1.2.4.50"
J2K = "1.2.840.10008.1.2.4.90"
ELE = "1.2.840.10008.1.2.1"


def test_parse_accept_orders_by_q_then_position():
    ranges = parse_accept('image/png;q=0.5, image/jpeg, */*;q=0.1, multipart/related; type="image/jp2"')
    assert [r.type for r in ranges] == ["image/jpeg", "multipart/related", "image/png", "*/*"]
    assert ranges[1].part_type == "image/jp2"
    assert parse_accept(None) == [] and parse_accept("  ") == []


@pytest.mark.parametrize("header", ["*/*;q=0", "image/jpeg;q=-1", "image/jpeg;q=2", "a/b;q=abc, c/d;q=0"])
def test_nothing_acceptable_is_406_not_no_preference(header):
    with pytest.raises(NotAcceptable):
        parse_accept(header)


def test_too_many_ranges():
    with pytest.raises(NotAcceptable):
        parse_accept(", ".join(["image/jpeg"] * 65))


@pytest.mark.parametrize("accept, stored, n, want", [
    (None, JPEG, 1, ("stored", "image/jpeg", JPEG, True)),
    ("*/*", J2K, 2, ("stored", "image/jp2", J2K, True)),
    ('multipart/related; type="application/octet-stream"; transfer-syntax=*', JPEG, 3,
     ("stored", "application/octet-stream", JPEG, True)),
    ("image/jpeg", JPEG, 1, ("stored", "image/jpeg", JPEG, False)),
    ('multipart/related; type="application/octet-stream"', JPEG, 1, ("native", "application/octet-stream", ELE, True)),
    ('multipart/related; type="application/octet-stream"', ELE, 1, ("stored", "application/octet-stream", ELE, True)),
    ("image/jpeg", ELE, 1, ("jpeg", "image/jpeg", JPEG, False)),
])
def test_frames(accept, stored, n, want):
    assert negotiate_frames(accept, stored, n) == want


def test_frames_not_acceptable_names_what_is():
    with pytest.raises(NotAcceptable) as exc:
        negotiate_frames("image/jp2", JPEG, 1)
    assert "transfer-syntax=*" in str(exc.value)
    with pytest.raises(NotAcceptable):  # single part for several frames
        negotiate_frames("image/jpeg", JPEG, 2)


def test_other_resources():
    assert negotiate_instances(None) is None
    assert negotiate_instances(f'multipart/related; type="application/dicom"; transfer-syntax={ELE}') == ELE
    with pytest.raises(NotAcceptable):
        negotiate_instances("application/dicom")
    assert negotiate_metadata(None) is False and negotiate_metadata('multipart/related; type="application/dicom+xml"')
    with pytest.raises(NotAcceptable):
        negotiate_metadata("text/html")
    assert negotiate_bulk(None) is True and negotiate_bulk("application/octet-stream") is False
    assert negotiate_rendered(None) == "image/jpeg" and negotiate_rendered("image/png") == "image/png"
    with pytest.raises(NotAcceptable):
        negotiate_rendered("image/jp2")
    assert negotiate_search("application/dicom+json") is False
    assert negotiate_search('multipart/related; type="application/dicom+xml"') is True
    assert negotiate_store_response(None) is False and negotiate_store_response("application/dicom+xml") is True
    with pytest.raises(NotAcceptable):
        negotiate_store_response("text/plain")
