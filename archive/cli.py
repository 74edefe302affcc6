"""`pathpacs` — the one console script: serve, import, watch, ls, stats, verify, migrate, and the
converters library's `convert` verb.

Every verb returns an exit code; expected failures print one line to stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from converters import commands as convert_cli

from . import config as config_mod
from . import token_commands
from . import share_commands
from . import deletion_cli
from .audit import commands as audit_cli
from . import export_cli
from .config import MAX_PORT, Config, ConfigError, check_aet, check_host
from .status import ArchiveError

log = logging.getLogger("pathpacs")


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2 (or .code)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`pathpacs: error: ...`) and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"pathpacs: error: {message} (see pathpacs {self.prog.split()[-1]} --help)"
              if " " in self.prog else f"pathpacs: error: {message} (see pathpacs --help)", file=sys.stderr)
        sys.exit(2)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a port number (1-{MAX_PORT})")
    return int(text)


def _workers(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a number of workers (1-64)")
    return int(text)


def _checked(check):
    def parse(text: str) -> str:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc))
    parse.__name__ = check.__name__.removeprefix("check_")
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="data directory (default ./data or archive.data_dir)")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")


def load_config(args: argparse.Namespace) -> Config:
    cfg = config_mod.load(getattr(args, "config", None))
    if getattr(args, "data", None):
        cfg.data_dir = args.data
    for flag, attr in (("dicom_port", "dicom_port"), ("http_port", "http_port"), ("aet", "aet"),
                       ("host", "host")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, attr, value)
    if getattr(args, "http_workers", None) is not None:
        cfg.http_workers = args.http_workers
    return config_mod.validate(cfg)


def open_archive(args: argparse.Namespace, readonly: bool = False):
    """The archive of --data; read-only verbs pass readonly=True: they never create it."""
    from .service import Archive, ArchiveNotFound

    try:
        return Archive(load_config(args), readonly=readonly)
    except ArchiveNotFound as exc:
        raise CliError(str(exc))


# -- serve -----------------------------------------------------------------------

def _run_http(arc, cfg: Config, reuse_port: bool) -> None:
    from aiohttp import web

    from . import tls

    from dicomweb.app import make_app

    from dicomweb.accesslog import AccessLogger, flush_all

    access = logging.getLogger("pathpacs.http.access") if cfg.access_log else None
    try:
        web.run_app(make_app(arc, cfg), host=cfg.host, port=cfg.http_port, print=None,
                    handle_signals=True, access_log=access, access_log_class=AccessLogger,
                    keepalive_timeout=cfg.keepalive_timeout, reuse_address=True,
                    reuse_port=reuse_port or None, ssl_context=tls.http_context(cfg))
    finally:
        flush_all()


def _http_worker(cfg: Config, quiet: bool) -> None:
    """An extra HTTP worker process: its own Archive (LMDB is multi-process) on the same port."""
    import ctypes
    import signal

    try:  # die with the main process, even after kill -9
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    from dicomweb.accesslog import set_process_tag

    set_process_tag("[worker]")  # its access lines say so too (they skip logging's formatter)
    from .service import Archive

    arc = Archive(cfg)
    try:
        _run_http(arc, cfg, reuse_port=True)
    finally:
        arc.close()


def cmd_serve(args: argparse.Namespace) -> int:
    import multiprocessing

    from .dimse import DimseServer
    from .service import Archive

    cfg = load_config(args)
    from . import tls
    from .authn import check_exposure
    from .dimse.compat import UnsupportedPynetdicom

    tls.check(cfg)  # certificate, key and CA files: one line before anything starts
    try:
        exposure = check_exposure(cfg)  # logged once the checks below pass: a refusal stays one line
    except ValueError as exc:
        raise CliError(str(exc))

    from storage_tiers import BlobError

    arc = Archive(cfg)
    try:
        arc.check_tiers()  # an S3 bucket missing or unreachable, an immutable one without Object Lock
        dimse = DimseServer(arc)
    except UnsupportedPynetdicom as exc:
        arc.close()
        raise CliError(str(exc))
    except BlobError as exc:
        arc.close()
        raise CliError(f"tier check failed: {exc}")
    if getattr(args, "demo", False):
        from . import demo

        try:
            demo.seed(arc)  # only into an archive without a study (archive/demo.py)
        except Exception as exc:
            arc.close()
            raise CliError(f"cannot import the demo slide: {exc}")
    migration = _start_checksum_migration(arc)
    arc.lifecycle.start()  # rules, replicas, fixity and recalls, in the background
    try:
        dimse.start()
    except OSError as exc:
        arc.close()
        ports = " or ".join(str(p) for p, on in ((cfg.dicom_port, cfg.dimse_plain), (cfg.tls_port, cfg.tls_port)) if on)
        raise CliError(f"cannot listen for DICOM on port {ports}: {exc.strerror}")
    # queued consultation jobs (archive.consult), one worker thread; after the DIMSE listener,
    # which takes partners' Storage Commitment reports (with none, a DIMSE send would listen on
    # that port itself and keep the server from starting)
    arc.consultations.start()
    # this node's heartbeat in the index (archive.cluster): other nodes' sweeps and leases see it
    arc.cluster.nodes.start(http_port=cfg.http_port, dicom_port=cfg.dicom_port if cfg.dimse_plain else cfg.tls_port)
    if exposure:
        log.warning("%s", exposure)
    workers = []
    ctx = multiprocessing.get_context("spawn")
    for _ in range(max(0, cfg.http_workers - 1)):
        proc = ctx.Process(target=_http_worker, args=(cfg, args.quiet), daemon=True)
        proc.start()
        workers.append(proc)
    from .audit import configuration_detail, start_forwarding

    start_forwarding(arc.audit, cfg)  # [audit.syslog]: this process forwards the trail
    arc.audit.application("start", configuration_detail(cfg))
    print(f"pathpacs: AE {cfg.aet} on DICOM port {' and '.join(dimse.listeners)}, "
          f"{'HTTPS' if cfg.http_tls else 'HTTP'} on port {cfg.http_port}"
          f" (DICOMweb at /dicomweb, {max(1, cfg.http_workers)} worker(s)), data in {cfg.data_dir}",
          file=sys.stderr, flush=True)
    try:
        _run_http(arc, cfg, reuse_port=bool(workers))
    except OSError as exc:
        raise CliError(f"cannot listen for HTTP on port {cfg.http_port}: {exc.strerror}")
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.join(10)
        dimse.stop()
        arc.lifecycle.stop()
        arc.consultations.stop()
        if migration is not None:
            migration[1].set()
            migration[0].join(30)
        arc.cluster.nodes.stop()  # a clean stop: the heartbeat and this process's leases go
        arc.cluster.leases.release_all()
        arc.audit.application("stop", {"pid": os.getpid()})
        arc.close()
    return 0


def _start_checksum_migration(arc):
    """An archive from before frame checksums gets them in the background while it serves
    (frames of instances not yet done are served as before); `pathpacs migrate` does the
    same in the foreground. Returns (thread, stop event) or None."""
    import threading

    pending = arc.checksums_pending()
    if not pending:
        return None
    stop = threading.Event()

    def run() -> None:
        # once across the cluster: under a lease; a node that did not get it looks again later
        lease = arc.config.lease_seconds
        while not stop.is_set():
            with arc.cluster.leases.hold("migration.checksums", lease) as mine:
                if mine:
                    migrate()
                    return
            if stop.wait(lease) or not arc.checksums_pending():
                return

    def migrate() -> None:
        log.info("adding frame checksums to %d instances written before them (pathpacs migrate "
                 "shows progress)", pending)
        try:
            done, damaged = arc.add_frame_checksums(stop=stop)
        except Exception:
            log.exception("frame checksum migration stopped; it resumes at the next start")
            return
        if not stop.is_set():
            log.info("frame checksums added to %d instances (%d damaged)", done, damaged)

    thread = threading.Thread(target=run, name="checksum-migration", daemon=True)
    thread.start()
    return thread, stop


# -- import ----------------------------------------------------------------------

def _walk(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    yield Path(root) / f
        elif p.exists():
            yield p
        else:
            raise CliError(f"no such file or directory: {p}")


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .status import Outcome

    files = list(_walk(args.paths))
    counts = {o: 0 for o in Outcome}
    reasons: list[str] = []
    arc = open_archive(args)
    try:
        # a progress bar on a terminal only: never into pipes and logs
        bar = tqdm(files, unit="file", disable=args.quiet or not files or not sys.stderr.isatty(), file=sys.stderr)
        for path in bar:
            if _is_dicom(path):
                results = [arc.ingest_file(path, source="import")]
            else:
                results = _import_other(arc, path, args)
            for r in results:
                counts[r.outcome] += 1
                if not r.ok:
                    reasons.append(f"{path}: {r.reason}")
    finally:
        arc.close()
    for line in reasons:
        print(f"rejected {line}", file=sys.stderr)
    print(f"{counts[Outcome.STORED]} stored, {counts[Outcome.DUPLICATE]} duplicate, "
          f"{counts[Outcome.REPLACED]} replaced, {counts[Outcome.REJECTED]} rejected")
    return 1 if counts[Outcome.REJECTED] else 0


def _import_other(arc, path: Path, args: argparse.Namespace) -> list:
    """Non-DICOM files (slides, photos) go through the converters, then the same ingest."""
    from converters.errors import ConversionError

    from .importer import import_path
    from .ingest import rejected
    from .status import ErrorKind

    try:
        return import_path(arc, path, args)
    except ConversionError as exc:  # one line per file
        return [rejected(str(exc) or "cannot convert", ErrorKind.CANNOT_UNDERSTAND)]


# -- watch -----------------------------------------------------------------------

def cmd_watch(args: argparse.Namespace) -> int:
    """`pathpacs watch DIR`: the drop folder (archive.watch) on the archive of --data."""
    from converters.errors import ConversionError

    from . import watch as watch_mod

    convert_cli.quiet_libraries()
    try:
        opts = convert_cli.options_from_args(args, progress=False)
        directory = Path(args.directory)
        watch_mod.prepare(directory)
        quiet = getattr(args, "quiet", False)

        def say(msg: str) -> None:
            if not quiet:
                print(msg, flush=True)

        interval = max(0.05, float(args.interval))
        stable = max(0.0, float(args.stable_seconds))
        try:
            arc = open_archive(args)
        except Exception as exc:
            raise ConversionError(f"cannot open the archive: {exc}") from None
        try:
            return watch_mod.watch(arc, directory, opts, interval=interval, stable=stable,
                                   once=getattr(args, "once", False), log=say)
        finally:
            arc.close()
    except ConversionError as exc:
        return convert_cli.fail(str(exc))
    except KeyboardInterrupt:
        return 0


def _add_watch(sub) -> None:
    p = sub.add_parser("watch", help="convert and store scanner files dropped into a folder",
                       description="Poll DIR; each new file whose size is stable is converted and "
                                   "stored, then moved to DIR/done/ or DIR/failed/ (with NAME.reason).")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--interval", type=float, default=5.0, metavar="S", help="seconds between scans (default 5)")
    p.add_argument("--stable-seconds", type=float, default=10.0, metavar="S",
                   help="a file must keep its size this long before it is taken (default 10)")
    p.add_argument("--once", action="store_true", help="process what is ready and exit")
    p.add_argument("--data", type=Path, help="data directory (default ./data or archive.data_dir)")
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--quiet", "-q", action="store_true")
    convert_cli.add_convert_options(p)
    p.set_defaults(func=cmd_watch)


# -- ls / stats / verify --------------------------------------------------------------

def _v(doc, tag: str) -> str:
    from .metadata import string_values

    return "\\".join(string_values(doc.get(tag)))


def cmd_ls(args: argparse.Namespace) -> int:
    arc = open_archive(args, readonly=True)
    try:
        for patient in arc.patients():
            a = patient.attrs
            print(f"PATIENT {_v(a, '00100020') or '-'}  {_v(a, '00100010')}  "
                  f"born {_v(a, '00100030') or '-'}  sex {_v(a, '00100040') or '-'}")
            for st in arc.studies_of_patient(patient.key):
                sa = st.attrs
                print(f"  STUDY {st.uid}  date {_v(sa, '00080020') or '-'}  acc {_v(sa, '00080050') or '-'}  "
                      f"{_v(sa, '00081030')}  [{','.join(st.modalities)}] "
                      f"{st.n_series} series, {st.n_instances} instances, {_human(st.bytes)}")
                if args.level == "study":
                    continue
                for se in arc.series_of_study(st.uid):
                    ea = se.attrs
                    print(f"    SERIES {se.uid}  {_v(ea, '00080060')} #{_v(ea, '00200011') or '-'} "
                          f"{_v(ea, '0008103E')}  {se.n_instances} instances")
                    if args.level == "series":
                        continue
                    for rec in arc.instances_of_series(se.uid):
                        ia = rec.attrs
                        print(f"      INSTANCE {rec.sop}  {_v(ia, '00080008')}  "
                              f"{_v(ia, '00480007') or _v(ia, '00280011')}x{_v(ia, '00480006') or _v(ia, '00280010')}  "
                              f"{rec.n_frames} frames  ts {rec.ts}  {_human(rec.size)}  {rec.blob.tier}")
    finally:
        arc.close()
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_stats(args: argparse.Namespace) -> int:
    arc = open_archive(args, readonly=True)
    try:
        s = arc.stats()
    finally:
        arc.close()
    print(f"patients   {s.patients}")
    print(f"studies    {s.studies}")
    print(f"series     {s.series}")
    print(f"instances  {s.instances}")
    print(f"bytes      {s.bytes} ({_human(s.bytes)})")
    for tier, n in sorted(s.by_tier.items()):
        print(f"tier {tier:<5} {n} ({_human(n)})")
    for line in audit_cli.stats_lines(load_config(args)):
        print(line)
    return 0


def _existing_archive(args: argparse.Namespace):
    """A verb that changes bookkeeping (verified times, moves) but must not create an archive."""
    cfg = load_config(args)
    from .index import index_exists

    if not index_exists(Path(cfg.index_path or Path(cfg.data_dir) / "index"), backend=cfg.index_backend,
                        dsn=cfg.index_dsn):
        raise CliError(f"no archive in {cfg.data_dir}" if cfg.index_backend == "lmdb"
                       else "no archive in the PostgreSQL database of index.dsn")
    from .service import Archive

    return Archive(cfg)


def _selected(arc, args: argparse.Namespace) -> list:
    study, series = getattr(args, "study", None), getattr(args, "series", None)
    try:
        return arc.lifecycle.instances(study=study, series=series)
    except ArchiveError as exc:
        raise CliError(exc.reason)


def _bar(args, total: int, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, disable=args.quiet or not sys.stderr.isatty(),
                file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every copy (primary and replicas) of the selected instances."""
    if args.sample is not None and not 0 < args.sample <= 1:
        raise CliError("--sample is a fraction in (0, 1]")
    arc = _existing_archive(args)
    try:
        if args.tier is not None and args.tier not in arc.tiers:
            raise CliError(f"no tier named {args.tier!r} (tiers: {', '.join(arc.tiers)})")
        recs = _selected(arc, args)
        with _bar(args, sum(r.size for r in recs)) as bar:
            report = arc.lifecycle.verify(recs, tier=args.tier, sample=args.sample, progress=bar.update)
    finally:
        arc.close()
    bad = {line.split(": ", 1)[1].split(" ", 1)[0] for line in report.problems}
    for line in report.problems:
        print(line)
    checked = len(recs) if args.sample is None else report.done
    print(f"verified {checked} instances ({report.done} copies): {checked - len(bad)} intact, {len(bad)} bad",
          file=sys.stderr if report.problems else sys.stdout)
    return 1 if report.problems else 0


def cmd_repair(args: argparse.Namespace) -> int:
    arc = _existing_archive(args)
    try:
        recs = _selected(arc, args)
        with _bar(args, sum(r.size for r in recs)) as bar:
            report = arc.lifecycle.repair(recs, progress=bar.update)
    finally:
        arc.close()
    for line in report.problems:
        print(f"not repaired: {line}")
    print(f"repaired {report.done} copies" + (f", {len(report.problems)} problems left" if report.problems else ""),
          file=sys.stderr if report.problems else sys.stdout)
    return 1 if report.problems else 0


def cmd_tier(args: argparse.Namespace) -> int:
    arc = _existing_archive(args)
    try:
        return _TIER_VERBS[args.tier_command](arc, args)
    finally:
        arc.close()


def _tier_status(arc, args) -> int:
    from .lifecycle import _parse

    rows: dict[str, dict] = {name: {"instances": 0, "bytes": 0, "copies": 0, "oldest": None}
                             for name in arc.tiers}
    for rec in arc.instances():
        for blob in arc.lifecycle.copies_of(rec):
            row = rows.setdefault(blob.tier, {"instances": 0, "bytes": 0, "copies": 0, "oldest": None})
            row["copies" if blob != rec.blob else "instances"] += 1
            row["bytes"] += rec.size
            last = _parse(arc.index.verified(rec.sop, blob.tier)) or _parse(rec.received)
            if last is not None and (row["oldest"] is None or last < row["oldest"]):
                row["oldest"] = last
    print(f"{'tier':<10} {'kind':<10} {'availability':<12} {'instances':>9} {'replicas':>8} {'bytes':>12}  least recently verified")
    for name, row in rows.items():
        store = arc.tiers.get(name)
        kind = "s3" if store is not None and not getattr(store, "inline_reads", True) else "filesystem"
        oldest = row["oldest"].strftime("%Y-%m-%d %H:%M") if row["oldest"] else "-"
        print(f"{name:<10} {kind:<10} {arc.availability(name):<12} {row['instances']:>9} {row['copies']:>8} "
              f"{_human(row['bytes']):>12}  {oldest}")
    return 0


@contextmanager
def _moves_lease(arc, args):
    """Moves between tiers run one at a time across the cluster: a CLI move or apply takes the
    lease of the background rules pass ("lifecycle.rules", archive.cluster), waiting up to two
    lease times for a pass on another node to finish, so two nodes never move the same
    instances at once."""
    leases, name = arc.cluster.leases, "lifecycle.rules"
    seconds = arc.config.lease_seconds
    deadline = time.monotonic() + 2 * seconds
    said = False
    while not leases.acquire(name, seconds):
        holder = (arc.index.record("leases", name) or {}).get("owner", "?")
        if time.monotonic() > deadline:
            raise CliError(f"tier moves are running elsewhere ({holder} holds {name}): try again later")
        if not said and not args.quiet:
            print(f"waiting for the moves of {holder} to finish", file=sys.stderr)
            said = True
        time.sleep(1)
    with leases.hold(name, seconds) as mine:  # renews while the moves run; releases at the end
        yield mine


def _tier_move(arc, args) -> int:
    with _moves_lease(arc, args):
        return _tier_move_leased(arc, args)


def _tier_move_leased(arc, args) -> int:
    if args.to not in arc.tiers:
        raise CliError(f"no tier named {args.to!r} (tiers: {', '.join(arc.tiers)})")
    recs = _selected(arc, args)
    hook = None
    crash_at = os.environ.get("PATHPACS_CRASH_AFTER")  # fault injection for the kill -9 tests
    if crash_at:
        import signal

        def hook(step: str) -> None:
            if step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
    with _bar(args, sum(r.size for r in recs)) as bar:
        report = arc.lifecycle.move_all(recs, args.to, progress=bar.update, hook=hook)
    return _moved(report, args.to)


def _moved(report, where: str) -> int:
    for line in report.problems:
        print(f"not moved: {line}", file=sys.stderr)
    print(f"{report.done} instances moved to {where} ({_human(report.bytes)}), {report.skipped} already there or pinned")
    return 1 if report.problems else 0


def _tier_apply(arc, args) -> int:
    if args.dry_run:
        return _tier_apply_leased(arc, args)
    with _moves_lease(arc, args):
        return _tier_apply_leased(arc, args)


def _tier_apply_leased(arc, args) -> int:
    with _bar(args, 0) as bar:
        report = arc.lifecycle.apply(dry_run=args.dry_run, progress=bar.update)
    if args.dry_run:
        for line in report.problems:
            print(line)
        print(f"would move {report.done} instances ({_human(report.bytes)})")
        return 0
    for line in report.problems:
        print(f"not moved: {line}", file=sys.stderr)
    print(f"{report.done} instances moved ({_human(report.bytes)})")
    return 1 if report.problems else 0


def _tier_recall(arc, args) -> int:
    if arc.study(args.study) is None:
        raise CliError(f"study {args.study} not found")
    with _bar(args, 0) as bar:
        report = arc.lifecycle.recall(args.study, progress=bar.update)
    return _moved(report, arc.ingest_tier.name)


def _tier_flag(flag: str, value: bool):
    def run(arc, args) -> int:
        if arc.study(args.study) is None:
            raise CliError(f"study {args.study} not found")
        flags = arc.index.set_flags(args.study, **{flag: value})
        print(f"study {args.study}: " + (", ".join(sorted(flags)) if flags else "no flags"))
        return 0
    return run


_TIER_VERBS = {
    "status": _tier_status, "move": _tier_move, "apply": _tier_apply, "recall": _tier_recall,
    "pin": _tier_flag("pinned", True), "unpin": _tier_flag("pinned", False),
    "hold": _tier_flag("hold", True), "release": _tier_flag("hold", False),
}


def cmd_index(args: argparse.Namespace) -> int:
    if args.index_command == "backup":
        arc = _existing_archive(args)
        try:
            path = arc.index.backup(args.directory)
        except FileExistsError as exc:
            raise CliError(str(exc))
        finally:
            arc.close()
        print(f"index copied to {path} ({_human(path.stat().st_size)})")
        return 0
    if args.index_command == "migrate":
        return cmd_index_migrate(args)
    from .rebuild import rebuild

    cfg = load_config(args)
    if cfg.index_backend != "lmdb":
        raise CliError("index rebuild writes an LMDB index: run it with [index] backend = \"lmdb\" "
                       "(a config without the [index] section), then `pathpacs index migrate --to postgresql`")
    from .service import Archive

    arc = Archive(cfg)
    try:
        if arc.staging is not None and arc.staging.others_alive():
            raise CliError("another pathpacs process (a server?) is using this archive: stop it first")
        try:
            with _bar(args, 0) as bar:
                report = rebuild(arc, progress=bar.update)
        except ArchiveError as exc:
            raise CliError(exc.reason)
    finally:
        arc.close()
    for line in report.unreadable:
        print(f"unreadable: {line}")
    per_tier = ", ".join(f"{n} on {t}" for t, n in report.tiers.items())
    print(f"index rebuilt: {report.instances} instances ({per_tier}), {report.copies} replicas, "
          f"{len(report.unreadable)} blobs unreadable")
    return 1 if report.unreadable else 0


def cmd_index_migrate(args: argparse.Namespace) -> int:
    """`pathpacs index migrate --to postgresql`: archive.index.migrate, with the checks and lines."""
    import json

    from .index import LmdbIndex, open_index
    from .index.migrate import MigrationRefused, check_idle, migrate, summary

    cfg = load_config(args)
    dsn = args.dsn or cfg.index_dsn
    if not dsn:
        raise CliError("--dsn is required (or [index] dsn in the config)")
    if args.batch < 1:
        raise CliError("--batch must be at least 1")
    source_dir = Path(cfg.data_dir) / "index"
    if not (source_dir / "data.mdb").is_file():
        raise CliError(f"no LMDB index in {cfg.data_dir} to migrate")
    source = LmdbIndex(source_dir, map_size=cfg.lmdb_map_size_gb << 30, readonly=True)
    try:
        staging = Path(cfg.data_dir) / "hot" / "tmp"
        try:
            if source.schema_version() < source.SCHEMA:
                # an index written by an older release: brought to today's layout first, as any
                # open by this release does (each step recorded), then read as the source
                check_idle(None, staging)
                source.close()
                LmdbIndex(source_dir, map_size=cfg.lmdb_map_size_gb << 30).close()
                source = LmdbIndex(source_dir, map_size=cfg.lmdb_map_size_gb << 30, readonly=True)
            check_idle(source, staging)
        except MigrationRefused as exc:
            raise CliError(str(exc))
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)  # its retries: the one line below says it
        try:
            import psycopg

            psycopg.connect(dsn, connect_timeout=10).close()  # the server's own reason, when it refuses
            target = open_index(source_dir, backend="postgresql", dsn=dsn, pool_size=cfg.index_pool_size)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CliError(f"cannot open the PostgreSQL index: {first}")
        try:
            total = source.stats().instances
            with _bar(args, total, unit="instance") as bar:
                report = migrate(source, target, batch=args.batch, progress=bar.update,
                                 phase=None if args.quiet else bar.set_description)
        finally:
            target.close()
    finally:
        source.close()
    if report.mismatches:
        raise CliError("counts differ after the migration: " + "; ".join(sorted(report.mismatches)), code=1)
    if not args.quiet:
        for line in summary(report):
            print(line)
    print(f"index migrated: {report.added} instances added, {report.skipped} already there; counts verified")
    print("to switch, put in the config file (the LMDB index in DATA/index is left as it was, the fallback):")
    print(f'  [index]\n  backend = "postgresql"\n  dsn = {json.dumps(dsn)}')
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    from .capacity import forecast, table

    cfg = load_config(args)
    if args.slides_per_day <= 0 or args.gb_per_slide <= 0 or not 1 <= args.years <= 100:
        raise CliError("--slides-per-day and --gb-per-slide must be positive, --years 1-100")
    rows = forecast(cfg, args.slides_per_day, args.gb_per_slide, args.years)
    print(f"{args.slides_per_day:g} slides/day x {args.gb_per_slide:g} GB for {args.years} years "
          f"({args.slides_per_day * args.gb_per_slide * 365 / 1000:,.0f} TB a year arriving)")
    for line in table(rows):
        print(line)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Run pending data migrations now, with progress (the server also runs them itself)."""
    from tqdm import tqdm

    arc = open_archive(args)
    try:
        pending = arc.checksums_pending()
        if not pending:
            print("nothing to migrate")
            return 0
        with tqdm(total=pending, unit="instance", disable=args.quiet, file=sys.stderr,
                  desc="frame checksums") as bar:
            done, damaged = arc.add_frame_checksums(progress=lambda _size: bar.update(1))
    finally:
        arc.close()
    print(f"frame checksums added to {done - damaged} instances, {damaged} damaged "
          "(their frames are refused; see pathpacs verify)")
    return 1 if damaged else 0


# -- entry ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pathpacs", description="DICOM archive for whole-slide images")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the DIMSE and HTTP (DICOMweb) servers")
    _common(p)
    p.add_argument("--dicom-port", type=_port)
    p.add_argument("--http-port", type=_port)
    p.add_argument("--aet", type=_checked(check_aet))
    p.add_argument("--host", type=_checked(check_host), help="address to listen on (default 127.0.0.1; another address needs [auth])")
    p.add_argument("--http-workers", type=_workers, help="HTTP worker processes (default 1 or http.workers)")
    p.add_argument("--demo", action="store_true",
                   help="when the archive holds no study, import a generated demo slide first (make run)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import", help="store DICOM files/folders (and slides) through the ingest path")
    _common(p)
    p.add_argument("paths", nargs="+", type=Path)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ls", help="list patients, studies, series, instances")
    _common(p)
    p.add_argument("--level", choices=["study", "series", "instance"], default="instance")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("stats", help="counts and bytes")
    _common(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("verify", help="re-hash every blob against its recorded sha256")
    _common(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("migrate", help="run pending data migrations now (frame checksums), with progress")
    _common(p)
    p.set_defaults(func=cmd_migrate)

    v = sub.choices["verify"]  # registered above; it takes a selection too
    v.add_argument("--tier", help="only the copies on this tier")
    v.add_argument("--study", help="only this study")
    v.add_argument("--sample", type=float, help="a random fraction of the instances, e.g. 0.01")

    p = sub.add_parser("repair", help="restore bad or missing copies from a good one (hash-checked)")
    _common(p)
    p.add_argument("--study")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("tier", help="storage tiers: status, move, apply rules, recall, pin, hold")
    tsub = p.add_subparsers(dest="tier_command", required=True)
    for name, help_ in (("status", "instances, bytes and last fixity per tier"),
                        ("apply", "apply the lifecycle rules now"), ("move", "move a study or series to a tier"),
                        ("recall", "bring a study back to the ingest tier"), ("pin", "a study never moves"),
                        ("unpin", "undo pin"), ("hold", "legal hold: never deleted, never moved off its replicas"),
                        ("release", "undo hold")):
        tp = tsub.add_parser(name, help=help_)
        _common(tp)
        tp.set_defaults(func=cmd_tier)
        if name == "apply":
            tp.add_argument("--dry-run", action="store_true", help="list what would move and how many bytes")
        if name == "move":
            g = tp.add_mutually_exclusive_group(required=True)
            g.add_argument("--study")
            g.add_argument("--series")
            tp.add_argument("--to", required=True, help="destination tier")
        if name in ("recall", "pin", "unpin", "hold", "release"):
            tp.add_argument("--study", required=True)

    p = sub.add_parser("index", help="the index: backup while running, rebuild from the blobs")
    isub = p.add_subparsers(dest="index_command", required=True)
    ip = isub.add_parser("backup", help="a consistent copy of the index, while the server runs")
    _common(ip)
    ip.add_argument("directory", type=Path)
    ip.set_defaults(func=cmd_index)
    ip = isub.add_parser("rebuild", help="recreate the index from the blobs on every tier (server stopped)")
    _common(ip)
    ip.set_defaults(func=cmd_index)
    ip = isub.add_parser("migrate", help="copy the LMDB index into PostgreSQL (server stopped; resumable)")
    _common(ip)
    ip.add_argument("--to", required=True, choices=["postgresql"], help="the target backend")
    ip.add_argument("--dsn", help="PostgreSQL connection string (default [index] dsn)")
    ip.add_argument("--batch", type=int, default=200, help="instances per target transaction (default 200)")
    ip.set_defaults(func=cmd_index)

    p = sub.add_parser("capacity", help="TB per tier and cost per year from the rules, replicas and prices")
    _common(p)
    p.add_argument("--slides-per-day", type=float, required=True)
    p.add_argument("--gb-per-slide", type=float, required=True)
    p.add_argument("--years", type=int, required=True)
    p.set_defaults(func=cmd_capacity)

    token_commands.register(sub, _common)  # `token create|list|revoke`
    share_commands.register(sub, _common)  # `consent add|list|withdraw`, `share [list|revoke]` (issue 12)
    convert_cli.register(sub)  # `convert`: the converters library's own verb
    deletion_cli.register(sub)  # reject, restore, purge, rejected, retention report
    audit_cli.register(sub)  # `audit`: the audit trail (archive.audit.commands)
    export_cli.register(sub, _common)  # `export`: studies to a DICOMDIR, optionally de-identified
    from .consult import commands as consult_cli

    consult_cli.register(sub, _common)  # `consult send|list|retry|cancel` (archive.consult.commands)
    from .consult import partner_cli
    partner_cli.register(sub, _common)  # `partner list|check` (archive.consult.partner_cli)
    from . import cluster_cli

    cluster_cli.register(sub, _common)  # `cluster status` (archive.cluster_cli)
    _add_watch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command != "serve":
        logging.getLogger("pathpacs.archive").setLevel(logging.WARNING)
        logging.getLogger("pathpacs.ingest").setLevel(logging.ERROR)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"pathpacs: error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"pathpacs: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from .status import out_of_space

        if out_of_space(exc):
            print(f"pathpacs: error: out of disk space ({exc})", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            print(f"pathpacs: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
                  file=sys.stderr)
            return 2
        if os.environ.get("PATHPACS_DEBUG"):
            raise
        print(f"pathpacs: internal error: {type(exc).__name__}: {exc} "
              "(PATHPACS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
