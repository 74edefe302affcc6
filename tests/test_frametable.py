"""The frame table format (archive.index.frametable): round trips of every layout and version,
including the tables older releases wrote, since upgrades read them."""
from __future__ import annotations

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from archive.index import frametable

frag = st.tuples(st.integers(0, 2**40), st.integers(1, 2**31))
frames_st = st.lists(st.lists(frag, min_size=1, max_size=3), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(frames_st, st.booleans(), st.data())
def test_round_trip(frames, with_crc, data):
    crcs = [data.draw(st.integers(0, 2**32 - 1)) for _ in frames] if with_crc else None
    buf = frametable.pack(frames, crcs)
    head, frags, got_crcs = frametable.read_all(buf)
    assert head.n == len(frames) and head.checked == with_crc and head.damaged is None
    assert frags == [[tuple(f) for f in fr] for fr in frames]
    assert got_crcs == (crcs if with_crc else [None] * len(frames))
    picks = data.draw(st.lists(st.integers(-2, len(frames) + 2), max_size=10))
    _, some, some_crcs = frametable.read(memoryview(buf), picks)  # LMDB hands out buffers
    for k, f, c in zip(picks, some, some_crcs):
        if 1 <= k <= len(frames):
            assert f == [tuple(x) for x in frames[k - 1]]
            assert c == (crcs[k - 1] if crcs else None)
        else:
            assert f is None and c is None


def test_damaged_mark():
    buf = frametable.pack([[(1, 2)]], None, damaged="sha256 mismatch")
    assert frametable.head(buf).damaged == "sha256 mismatch" and not frametable.head(buf).checked


def test_reads_tables_of_older_releases():
    # schema <= 2 (v1): location in the header, <QQ slots
    v1 = json.dumps({"blob": "b", "tier": "hot", "ts": "1.2.840.10008.1.2.4.50", "n": 2, "single": True}).encode()
    v1 += b"\n" + struct.pack("<QQ", 10, 5) + struct.pack("<QQ", 15, 7)
    head, frags, crcs = frametable.read_all(v1)
    assert head.legacy == {"blob": "b", "tier": "hot", "ts": "1.2.840.10008.1.2.4.50"} and not head.checked
    assert frags == [[(10, 5)], [(15, 7)]] and crcs == [None, None]
    # schema 3 (v2): <QQI slots, location still in the header
    v2 = json.dumps({"blob": "b", "tier": "hot", "ts": "x", "n": 1, "single": True, "v": 2}).encode()
    v2 += b"\n" + struct.pack("<QQI", 10, 5, 99)
    head, frags, crcs = frametable.read_all(v2)
    assert head.checked and frags == [[(10, 5)]] and crcs == [99]
    # v1 with several fragments per frame: a JSON body
    multi = json.dumps({"blob": "b", "tier": "hot", "ts": "x", "n": 1, "single": False}).encode()
    multi += b"\n" + json.dumps([[[1, 2], [3, 4]]]).encode()
    assert frametable.read_all(multi)[1] == [[(1, 2), (3, 4)]]
