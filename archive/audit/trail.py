"""The audit trail on disk: append-only, hash-chained, safe with several writing processes.

Segments `trail-<first seq>.jsonl` hold one record per line:

    {"hash":"<sha256 of BODY>","record":BODY}
    BODY = {"event":{...},"node":"n1","prev":"<hash of the record before>","seq":N,"time":"..."}

"node" (the writing node's name, `Config.node()`; absent in trails written before clusters)
keeps the trails of several nodes distinguishable when `pathpacs audit --trail` merges them:
each node appends to its own trail, each trail is one chain.

The hash is over the exact bytes of BODY (no re-serialisation when checking), and BODY holds the
previous record's hash, so editing, removing or reordering any record breaks the chain at that
record (`verify` names it). Writers (every process: server, HTTP workers, CLI) take an exclusive
`flock` on `trail.lock`, re-read the chain head under it (cached while the file is unchanged),
append a batch with one write and fsync it. Readers take no lock and use complete lines only.
A line torn by a crash mid-write (no final newline; never acknowledged) is cut by the next writer.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

log = logging.getLogger("pathpacs.audit")

GENESIS = "0" * 64
_PREFIX = b'{"hash":"'
_MIDDLE = b'","record":'
_BODY_AT = len(_PREFIX) + 64 + len(_MIDDLE)
_SEGMENT = re.compile(r"^trail-(\d{12})\.jsonl$")


class Record(NamedTuple):
    seq: int
    time: str
    prev: str
    hash: str
    event: dict[str, Any]
    node: str = ""


class BrokenRecord(Exception):
    """A line of the trail that is not a well-formed, self-consistent record."""


def encode(seq: int, time: str, prev: str, event: dict[str, Any], node: str = "") -> tuple[bytes, str]:
    """One trail line for a record and the record's hash."""
    body_doc: dict[str, Any] = {"event": event, "prev": prev, "seq": seq, "time": time}
    if node:
        body_doc["node"] = node
    body = json.dumps(body_doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(body).hexdigest()
    return _PREFIX + digest.encode() + _MIDDLE + body + b"}\n", digest


def decode(line: bytes) -> Record:
    """The record of one line (with its newline stripped or not); BrokenRecord if it is not one."""
    line = line.rstrip(b"\n")
    if not line.startswith(_PREFIX) or line[len(_PREFIX) + 64:_BODY_AT] != _MIDDLE or not line.endswith(b"}"):
        raise BrokenRecord("not a trail record")
    digest = line[len(_PREFIX):len(_PREFIX) + 64].decode("ascii", "replace")
    body = line[_BODY_AT:-1]
    if hashlib.sha256(body).hexdigest() != digest:
        raise BrokenRecord("its hash does not match its content")
    try:
        d = json.loads(body)
        return Record(int(d["seq"]), str(d["time"]), str(d["prev"]), digest, d["event"], str(d.get("node", "")))
    except (ValueError, KeyError, TypeError):
        raise BrokenRecord("its content is not a record") from None


@dataclass
class VerifyResult:
    records: int
    broken: str | None = None  # the first broken record, named


class Trail:
    """The trail directory: append (locked, chained) and read (lock-free, complete lines)."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20, node: str = "") -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.node = node  # written into every record (several nodes' trails, merged by `pathpacs audit`)
        self._head: tuple[str, int, int, int, str] | None = None  # (segment, inode, size, seq, hash)

    # -- segments ----------------------------------------------------------------------------
    def segments(self) -> list[tuple[int, Path]]:
        """(first seq, path) of every segment, in order."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _SEGMENT.match(name)
            if m:
                out.append((int(m.group(1)), self.dir / name))
        return sorted(out)

    # -- writing -----------------------------------------------------------------------------
    def append(self, events: list[tuple[str, dict[str, Any]]]) -> int:
        """Append (time, event) records as one batch; returns the last sequence number."""
        if not events:
            return self.head()[0]
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.dir / "trail.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            segs = self.segments()
            seq, prev = 0, GENESIS
            path: Path | None = None
            if segs:
                path = segs[-1][1]
                seq, prev = self._head_of(path, segs[-1][0])
                if os.path.getsize(path) >= self.segment_bytes:
                    path = None
            new = path is None
            if path is None:
                path = self.dir / f"trail-{seq + 1:012d}.jsonl"
            chunks = []
            for time, event in events:
                seq += 1
                line, prev = encode(seq, time, prev, event, self.node)
                chunks.append(line)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                data = b"".join(chunks)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if new:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self._head = (path.name, st.st_ino, st.st_size, seq, prev)
            return seq
        finally:
            os.close(lock)  # releases the flock

    def _head_of(self, path: Path, first_seq: int) -> tuple[int, str]:
        """The last record's (seq, hash) of the newest segment; cached while the file is as we
        left it. Cuts a torn final line (a crash mid-write). Called under the lock."""
        st = os.stat(path)
        h = self._head
        if h is not None and h[0] == path.name and h[1] == st.st_ino and h[2] == st.st_size:
            return h[3], h[4]
        with open(path, "r+b") as fh:
            size = st.st_size
            last, end = _last_line(fh, size)
            if end < size:
                log.warning("audit trail %s: cutting a torn final line (%d bytes) left by a crash", path.name, size - end)
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        if last is None:  # an empty segment: the head is the end of the segment before
            if first_seq <= 1:
                return 0, GENESIS
            prev = [p for s, p in self.segments() if s < first_seq]
            return self._head_of(prev[-1], 0) if prev else (first_seq - 1, GENESIS)
        rec = decode(last)
        return rec.seq, rec.hash

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last complete record (0, GENESIS when empty), without a lock."""
        segs = self.segments()
        for first, path in reversed(segs):
            with open(path, "rb") as fh:
                last, _ = _last_line(fh, os.path.getsize(path))
            if last is not None:
                rec = decode(last)
                return rec.seq, rec.hash
        return 0, GENESIS

    # -- reading -----------------------------------------------------------------------------
    def records(self, after: int = 0) -> Iterator[Record]:
        """Every complete record with seq > after, in order (unchecked: see verify)."""
        segs = self.segments()
        start = 0
        for i, (first, _) in enumerate(segs):
            if first <= after + 1:
                start = i
        for first, path in segs[start:]:
            for line in _complete_lines(path):
                try:
                    rec = decode(line)
                except BrokenRecord:
                    continue
                if rec.seq > after:
                    yield rec

    def verify(self, progress: Callable[[int], None] | None = None) -> VerifyResult:
        """Check every record: its own hash, the previous record's hash in it, the sequence."""
        n = 0
        prev, seq = GENESIS, 0
        for first, path in self.segments():
            if first != seq + 1:
                return VerifyResult(n, f"segment {path.name} starts at record {first}, but record {seq + 1} "
                                       "comes next (records removed or a segment renamed)")
            for lineno, line in enumerate(_complete_lines(path), 1):
                where = f"record {seq + 1} ({path.name} line {lineno})"
                try:
                    rec = decode(line)
                except BrokenRecord as exc:
                    return VerifyResult(n, f"{where}: {exc}")
                if rec.seq != seq + 1:
                    return VerifyResult(n, f"{where}: it says it is record {rec.seq} (records removed or reordered)")
                if rec.prev != prev:
                    return VerifyResult(n, f"{where}: it does not carry the hash of record {seq} "
                                           "(a record before it was changed, removed or inserted)")
                prev, seq = rec.hash, rec.seq
                n += 1
                if progress is not None:
                    progress(len(line))
        return VerifyResult(n)

    def size(self) -> int:
        return sum(p.stat().st_size for _, p in self.segments())


class Tailer:
    """Reads records after a sequence number as the trail grows (the syslog forwarder), keeping
    its place so each call reads only new bytes."""

    def __init__(self, trail: Trail, after: int) -> None:
        self.trail = trail
        self.next = after + 1
        self._path: Path | None = None
        self._offset = 0

    def seek(self, after: int) -> None:
        self.next = after + 1
        self._path = None

    def read(self, limit: int = 500) -> list[Record]:
        if self._path is None:
            segs = self.trail.segments()
            cands = [p for s, p in segs if s <= self.next]
            if not cands:
                return []
            self._path, self._offset = cands[-1], 0
        out: list[Record] = []
        while len(out) < limit:
            try:
                with open(self._path, "rb") as fh:
                    fh.seek(self._offset)
                    data = fh.read(1 << 20)
            except FileNotFoundError:
                self._path = None
                return out
            end = data.rfind(b"\n")
            if end < 0:
                nxt = [p for s, p in self.trail.segments() if s == self.next]
                if nxt and nxt[0] != self._path:  # this segment is complete: the next one starts here
                    self._path, self._offset = nxt[0], 0
                    continue
                return out
            for line in data[:end + 1].splitlines():
                self._offset += len(line) + 1
                try:
                    rec = decode(line)
                except BrokenRecord:
                    continue
                if rec.seq < self.next:
                    continue
                out.append(rec)
                self.next = rec.seq + 1
                if len(out) >= limit:
                    break
        return out


def _last_line(fh, size: int) -> tuple[bytes | None, int]:
    """The last complete line of a file and where complete lines end."""
    pos = size
    buf = b""
    end = None
    while pos > 0:
        step = min(1 << 16, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        if end is None:
            i = buf.rfind(b"\n")
            if i < 0:
                continue
            end = pos + i + 1
            buf = buf[:i + 1]
        j = buf.rfind(b"\n", 0, len(buf) - 1)
        if j >= 0 or pos == 0:
            return buf[j + 1:], end
    return None, end if end is not None else 0


def _complete_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        pending = b""
        while True:
            chunk = fh.read(1 << 20)
            if not chunk:
                return  # a final line without newline is still being written (or torn)
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            yield from lines
