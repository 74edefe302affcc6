"""``pathpacs watch DIR``: a drop folder for scanner output.

A file is taken once its size and mtime have not changed for
``--stable-seconds``; it is converted and stored through the archive's ingest,
then moved to ``DIR/done/``, or to ``DIR/failed/`` next to ``NAME.reason``.

Restarts never import a file twice: UIDs are derived from the file's identity
(name, size, mtime), so re-converting a file that was half-stored before a
crash yields the same SOP Instance UIDs and the archive reports the stored
ones as duplicates; and ``DIR/.pathpacs-watch.json`` records files whose
import completed, so a file that was stored but not yet moved is just moved.

The command itself (flags, opening the archive) is ``archive.cli.cmd_watch``; this module is
the folder logic and uses the Archive only through ``archive.importer``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from converters.convert import ConvertOptions
from converters.errors import ConversionError

from .importer import import_slide
from .status import Outcome

STATE_NAME = ".pathpacs-watch.json"
IGNORED_SUFFIXES = (".part", ".tmp", ".reason", ".crdownload", ".partial")


class WatchState:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}

    def done(self, ident: str) -> bool:
        return ident in self.data

    def mark(self, ident: str, uids: list[str]) -> None:
        self.data[ident] = {"instances": uids, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if len(self.data) > 10000:  # keep the file small: forget the oldest
            for k in list(self.data)[: len(self.data) - 10000]:
                del self.data[k]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _move(src: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    dest = folder / src.name
    n = 1
    while dest.exists():
        dest = folder / f"{src.stem}.{n}{src.suffix}"
        n += 1
    os.replace(src, dest)
    return dest


def _identity(path: Path, st: os.stat_result) -> str:
    return f"{path.name}|{st.st_size}|{st.st_mtime_ns}"


def process_file(arc, path: Path, opts: ConvertOptions, state: WatchState, directory: Path,
                 log=print) -> bool:
    """Import one stable file; move it to done/ or failed/. True when stored."""
    st = path.stat()
    ident = _identity(path, st)
    if state.done(ident):
        _move(path, directory / "done")
        log(f"done {path.name} (already stored)")
        return True
    opts.uid_seed = ident
    reason = None
    results = []
    try:
        results = import_slide(arc, path, opts)
    except ConversionError as exc:
        reason = str(exc)
    except MemoryError:
        reason = "out of memory"
    except Exception as exc:
        reason = f"conversion failed ({type(exc).__name__}: {exc})"
    if reason is None:
        bad = [r for r in results if not r.ok]
        if bad:
            reason = "; ".join(f"{r.sop_instance_uid or '?'}: {r.reason}" for r in bad)
        elif not results:
            reason = "conversion produced no instances"
    if reason is None:
        state.mark(ident, [r.sop_instance_uid for r in results])
        dest = _move(path, directory / "done")
        stored = sum(1 for r in results if r.outcome is not Outcome.DUPLICATE)
        log(f"stored {path.name}: {len(results)} instances ({stored} new) -> {dest.parent.name}/")
        return True
    dest = _move(path, directory / "failed")
    dest.with_name(dest.name + ".reason").write_text(reason + "\n")
    log(f"failed {path.name}: {reason}")
    return False


def scan(directory: Path):
    with os.scandir(directory) as it:
        for e in sorted(it, key=lambda e: e.name):
            if e.name.startswith(".") or e.name.endswith(IGNORED_SUFFIXES):
                continue
            try:
                if not e.is_file(follow_symlinks=False):
                    continue
                st = e.stat()
            except OSError:
                continue
            yield Path(e.path), st


def prepare(directory: Path) -> None:
    """The watch folder must exist; its done/ and failed/ are created (before the archive is opened)."""
    if not directory.is_dir():
        raise ConversionError(f"watch folder {directory} does not exist or is not a directory")
    for sub in ("done", "failed"):
        try:
            (directory / sub).mkdir(exist_ok=True)
        except OSError as exc:
            raise ConversionError(f"cannot create {directory / sub}: {exc.strerror}") from None


def watch(arc, directory: Path, opts: ConvertOptions, *, interval: float, stable: float, once: bool,
          log: Callable[[str], None] = print) -> int:
    """Poll ``directory`` until interrupted (or, ``once``, until nothing is pending); the caller
    opens and closes ``arc``. Returns 1 when ``once`` and a file failed, else 0."""
    state = WatchState(directory / STATE_NAME)
    seen: dict[str, tuple[int, int, float]] = {}
    failures = 0
    log(f"watching {directory} (every {interval:g} s, stable after {stable:g} s)")
    while True:
        now = time.monotonic()
        pending = 0
        present = set()
        for path, st in scan(directory):
            present.add(path.name)
            key = (st.st_size, st.st_mtime_ns)
            prev = seen.get(path.name)
            if prev is None or prev[:2] != key:
                seen[path.name] = (*key, now)
                pending += 1
                continue
            if now - prev[2] < stable:
                pending += 1
                continue
            seen.pop(path.name, None)
            if not process_file(arc, path, opts, state, directory, log):
                failures += 1
        for name in list(seen):
            if name not in present:
                del seen[name]
        if once and pending == 0:
            break
        time.sleep(interval)
    return 1 if failures and once else 0
