"""Several `pathpacs serve` nodes over one index: who is alive, and who does what once.

`Nodes`: each serving node keeps a heartbeat in the index's `nodes` record table (key = the
node name, `Config.node()`): {"seen", "pid", "started", "http_port", "dicom_port", "version"},
refreshed every lease_seconds/3 by a background thread and removed on a clean stop. A node is
alive while its heartbeat is younger than `cluster.lease_seconds`.

`Leases`: named leases in the `leases` record table ({"owner", "until", "since"}), each change
one `Index.update_record` (an atomic read-modify-write on every backend), so of two nodes
asking at once exactly one gets it. The owner is "node:pid:uuid". A lease is taken over when
its time ran out, when its owner's node has a heartbeat that expired, or (for this node) when
its owner's process is gone. Background passes (lifecycle rules, replicas, fixity, the frame
checksum migration) run under one (`Leases.hold`), renewed while they run.

Pending blobs and tier-move journal entries carry the node in their session string
(`session_tag`: "node/staging-session@epoch"), so a node's crash sweep touches only its own
dead sessions' leftovers and those of nodes that are dead (`Cluster.may_remove`, asked by
`Archive.sweep` and `Lifecycle.recover`); `parse_session` reads the old form (a bare staging
session: this node's). See docs/cluster.md.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .index import Index

log = logging.getLogger("pathpacs.cluster")

VERSION = "0.1.0"


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("pathpacs")
    except Exception:
        return VERSION


# -- sessions of pending blobs and moves --------------------------------------------------------

def session_tag(node: str, session: str, now: float | None = None) -> str:
    """The session string of a pending blob or a move journal entry: node, local staging
    session and when it was written (whole seconds)."""
    return f"{node}/{session}@{int(time.time() if now is None else now)}"


def parse_session(text: str) -> tuple[str | None, str, float | None]:
    """(node or None for an old entry, local staging session, epoch seconds or None)."""
    node, sep, rest = text.partition("/")
    if not sep:
        return None, text, None
    session, at, when = rest.partition("@")
    try:
        t = float(when) if at else None
    except ValueError:
        t = None
    return node, session, t


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- heartbeats ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeState:
    name: str
    seen: float
    alive: bool
    record: dict


class Nodes:
    """Heartbeats of the nodes in the index's `nodes` table."""

    def __init__(self, index: "Index", node: str, lease_seconds: float) -> None:
        self.index = index
        self.node = node
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict = {}

    def beat(self) -> None:
        """Write this node's heartbeat now."""
        rec = {**self._record, "seen": time.time()}
        self.index.put_record("nodes", self.node, rec)

    def start(self, *, http_port: int = 0, dicom_port: int = 0) -> None:
        """Announce this node and keep its heartbeat fresh (serve)."""
        if self._thread is not None:
            return
        self._record = {"pid": os.getpid(), "started": time.time(), "http_port": http_port,
                        "dicom_port": dicom_port, "version": version()}
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        every = max(0.2, self.lease_seconds / 3)
        while not self._stop.wait(every):
            try:
                self.beat()
            except Exception as exc:  # the index is unreachable: other nodes will see us age
                log.warning("heartbeat not written: %s", exc)

    def stop(self) -> None:
        """A clean stop: the heartbeat goes (other nodes need not wait for it to expire)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
            try:
                self.index.delete_record("nodes", self.node)
            except Exception as exc:
                log.warning("heartbeat not removed: %s", exc)

    def get(self, node: str) -> dict | None:
        return self.index.record("nodes", node)

    def alive(self, node: str) -> bool:
        """Seen within cluster.lease_seconds."""
        rec = self.get(node)
        return rec is not None and time.time() - float(rec.get("seen", 0)) <= self.lease_seconds

    def dead_since(self, node: str) -> float | None:
        """Seconds since a node's heartbeat expired (None while alive; absent: infinite)."""
        rec = self.get(node)
        if rec is None:
            return float("inf")
        age = time.time() - float(rec.get("seen", 0))
        return None if age <= self.lease_seconds else age - self.lease_seconds

    def all(self) -> list[NodeState]:
        now = time.time()
        return [NodeState(name, float(r.get("seen", 0)), now - float(r.get("seen", 0)) <= self.lease_seconds, r)
                for name, r in self.index.records("nodes")]


# -- leases -------------------------------------------------------------------------------------

def owner_node(owner: str) -> str:
    return owner.partition(":")[0]


def owner_pid(owner: str) -> int | None:
    pid = owner.split(":")[1] if owner.count(":") >= 1 else ""
    return int(pid) if pid.isdigit() else None


class Leases:
    """Named cluster leases (the `leases` table): one holder at a time, taken over when it lapses."""

    def __init__(self, index: "Index", owner: str, nodes: Nodes | None = None, lease_seconds: float = 30.0) -> None:
        """owner: "node:pid:uuid"; nodes: the heartbeats that tell a dead node (default: those
        of the owner's node in the same index)."""
        self.index = index
        self.owner = owner
        self.nodes = nodes if nodes is not None else Nodes(index, owner_node(owner), lease_seconds)

    def _owner_gone(self, owner: str) -> bool:
        """Whether a lease's holder cannot be running any more: its process on this node is
        gone, or its node's heartbeat expired."""
        node = owner_node(owner)
        if node == self.nodes.node:
            pid = owner_pid(owner)
            return pid is not None and pid != os.getpid() and not pid_alive(pid)
        rec = self.nodes.get(node)
        return rec is not None and time.time() - float(rec.get("seen", 0)) > self.nodes.lease_seconds

    def acquire(self, name: str, seconds: float, every: float | None = None) -> bool:
        """Take the lease `name` for `seconds` unless someone else holds it (alive, in time).
        every: a periodic pass's period: not taken when a holder finished it less than `every`
        seconds ago (so the pass runs once per period across the cluster)."""
        got: list[bool] = []

        def change(old: dict | None) -> dict | None:
            now = time.time()
            if old is not None and old.get("owner") != self.owner and float(old.get("until", 0)) > now \
                    and not self._owner_gone(str(old.get("owner", ""))):
                return old
            if old is not None and every is not None and old.get("owner") != self.owner \
                    and now - float(old.get("done", 0)) < every:
                return old
            got.append(True)
            since = old["since"] if old is not None and old.get("owner") == self.owner else now
            if old is not None and old.get("owner") and old.get("owner") != self.owner:
                log.info("lease %s taken over from %s", name, old.get("owner"))
            return {**(old or {}), "owner": self.owner, "until": now + seconds, "since": since}

        self.index.update_record("leases", name, change)
        return bool(got)

    def renew(self, name: str, seconds: float) -> bool:
        """Extend a lease this owner holds; False when it was lost (taken over)."""
        ok: list[bool] = []

        def change(old: dict | None) -> dict | None:
            if old is None or old.get("owner") != self.owner:
                return old
            ok.append(True)
            return {**old, "until": time.time() + seconds}

        self.index.update_record("leases", name, change)
        return bool(ok)

    def release(self, name: str, done: bool = False) -> None:
        """Give a lease up (only if this owner holds it); done: a periodic pass finished (the
        record stays with its time, see `acquire(every=)`)."""
        def change(old: dict | None) -> dict | None:
            if old is None or old.get("owner") != self.owner:
                return old
            if done or "done" in old:
                return {"owner": "", "until": 0, "done": time.time() if done else old["done"], "by": self.owner}
            return None

        self.index.update_record("leases", name, change)

    def release_all(self) -> None:
        for name, rec in list(self.index.records("leases")):
            if rec.get("owner") == self.owner:
                self.release(name)

    def held(self) -> list[tuple[str, dict]]:
        """Leases whose time has not run out, with their owners."""
        now = time.time()
        return [(k, r) for k, r in self.index.records("leases") if float(r.get("until", 0)) > now]

    @contextmanager
    def hold(self, name: str, seconds: float, every: float | None = None) -> Iterator[bool]:
        """`with leases.hold("lifecycle.rules", 30) as mine:` — mine is False when another
        node holds it (skip the pass) or finished it less than `every` seconds ago; while the
        body runs the lease is renewed every seconds/3, and released at the end (marked done
        when the body did not raise)."""
        if not self.acquire(name, seconds, every):
            yield False
            return
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(max(0.2, seconds / 3)):
                try:
                    if not self.renew(name, seconds):
                        log.warning("lease %s was taken over while its pass ran", name)
                        return
                except Exception as exc:
                    log.warning("lease %s not renewed: %s", name, exc)

        t = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
        t.start()
        ok = False
        try:
            yield True
            ok = True
        finally:
            stop.set()
            t.join(5)
            try:
                self.release(name, done=ok and every is not None)
            except Exception as exc:
                log.warning("lease %s not released: %s", name, exc)


class Cluster:
    """`Archive.cluster`: this process's view of the cluster (heartbeats and leases)."""

    def __init__(self, index: "Index", node: str, lease_seconds: float) -> None:
        self.node = node
        self.lease_seconds = lease_seconds
        self.owner = f"{node}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.nodes = Nodes(index, node, lease_seconds)
        self.leases = Leases(index, self.owner, self.nodes)

    def reindex(self, index: "Index") -> None:
        self.nodes.index = index
        self.leases.index = index

    def may_remove(self, session: str, local_alive, now: float | None = None) -> bool:
        """Whether a pending blob's or a move's leftovers may be resolved by this node: its own
        (or an old, node-less) entry whose local staging session is dead (`local_alive`: the
        flock check), or another node's entry when that node has been dead for more than
        lease_seconds and the entry is older than lease_seconds. A live node's never."""
        node, local, when = parse_session(session)
        if node is None or node == self.node:
            return not local_alive(local)
        dead = self.nodes.dead_since(node)
        if dead is None or dead <= self.lease_seconds:
            return False
        now = time.time() if now is None else now
        return when is None or now - when > self.lease_seconds
