"""A WAN-like link between two processes on one machine, for the consultation test and bench.

This kernel has no `sch_netem`, so the link is built from what it has:
- bandwidth: a network namespace joined to the root namespace by a veth pair, each end shaped
  by `tc qdisc ... tbf rate RATE` (the far peer, e.g. archive B, runs inside the namespace:
  `ShapedLink.wrap(cmd)`; it listens on `ShapedLink.far_ip`);
- latency and a dropped link: `Relay`, a small asyncio TCP relay in the root namespace
  (127.0.0.1:PORT -> far_ip:PORT) that delays every chunk by half the RTT in each direction,
  bounds what it buffers (so the sender feels the bottleneck), and can close every
  connection once after N bytes (then refuses new ones for `outage` seconds).

Needs root (`ip netns`, `tc`); `available()` says why not otherwise.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

_counter = iter(range(1, 200))


def available() -> str | None:
    """None when a shaped link can be made here, else why not (for a skip reason)."""
    if os.geteuid() != 0:
        return "shaped link needs root (ip netns, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "shaped link needs iproute2 (ip, tc)"
    name = f"pp-probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class ShapedLink:
    """A namespace `ns` reachable at `far_ip` through a veth pair shaped to `rate` each way."""

    def __init__(self, rate: str = "100mbit", burst: str = "256kb") -> None:
        n = next(_counter)
        tag = f"{os.getpid() % 10000}{n}"
        self.ns = f"pp-link-{tag}"
        self.near_dev, self.far_dev = f"ppa{tag}", f"ppb{tag}"
        octet = (os.getpid() + n) % 250 + 1
        self.near_ip, self.far_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.rate, self.burst = rate, burst
        self._up = False

    def __enter__(self) -> "ShapedLink":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        try:
            _run("ip", "netns", "add", self.ns)
            _run("ip", "link", "add", self.near_dev, "type", "veth", "peer", "name", self.far_dev)
            _run("ip", "link", "set", self.far_dev, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.near_ip}/30", "dev", self.near_dev)
            _run("ip", "link", "set", self.near_dev, "up")
            self._ns("ip", "addr", "add", f"{self.far_ip}/30", "dev", self.far_dev)
            self._ns("ip", "link", "set", self.far_dev, "up")
            self._ns("ip", "link", "set", "lo", "up")
            # tbf needs a bucket of at least rate/HZ; segmentation offloads hand it 64 KB
            # super-packets, so the bucket holds several of them.
            for dev, inside in ((self.near_dev, False), (self.far_dev, True)):
                cmd = ("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                       "burst", self.burst, "latency", "50ms")
                self._ns(*cmd) if inside else _run(*cmd)
            self._up = True
        except BaseException:
            self.down()
            raise

    def _ns(self, *cmd: str) -> None:
        _run("ip", "netns", "exec", self.ns, *cmd)

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.near_dev], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        self._up = False


@dataclass
class Relay:
    """127.0.0.1:`port` -> (`target_host`, `target_port`), `delay` seconds each way per chunk.
    `drop_after`: close every connection once, when that many bytes went towards the target;
    then refuse connections for `outage` seconds. Runs its own event loop in a thread."""

    target_host: str
    target_port: int
    delay: float = 0.025
    drop_after: int | None = None
    outage: float = 1.0
    buffer: int = 2 << 20  # bytes in flight per direction: about 3x the 100 Mbit x 50 ms product
    port: int = 0
    forwarded: int = 0  # bytes towards the target
    dropped_at: float | None = None
    connections: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.AbstractServer | None = None
    _writers: set = field(default_factory=set)
    _thread: threading.Thread | None = None

    def start(self) -> "Relay":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self.port, limit=1 << 16))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="relay")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("relay did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    def drop_now(self) -> None:
        """Close every connection (the link drops), from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drop)

    def _drop(self) -> None:
        self.dropped_at = time.monotonic()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.dropped_at is not None and time.monotonic() - self.dropped_at < self.outage:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port, limit=1 << 16)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer, towards_target=True),
                             self._pipe(up_reader, writer, towards_target=False), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, towards_target: bool) -> None:
        chunks: asyncio.Queue = asyncio.Queue(maxsize=max(1, self.buffer >> 16))
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await chunks.get()
                if data is None:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    await chunks.put((0, None))
                    break
                await chunks.put((loop.time() + self.delay, data))
                if towards_target:
                    self.forwarded += len(data)
                    if self.drop_after is not None and self.dropped_at is None and self.forwarded >= self.drop_after:
                        self._drop()
                        break
            await task
        finally:
            task.cancel()


def start_far_pathpacs(link: ShapedLink, data_dir, *, config_text: str | None = None, aet: str = "FAR", **kw):
    """`pathpacs serve` inside the link's namespace, listening on `link.far_ip` (reach it through
    a `Relay` to shape latency; its `http_url` is not reachable from the root namespace)."""
    import sys

    from conformance.bench import peers

    return peers.start_pathpacs(data_dir, config_text=config_text, aet=aet,
                                program=link.wrap([sys.executable, "-m", "archive"]),
                                extra=["--host", link.far_ip], wait_host=link.far_ip, **kw)
