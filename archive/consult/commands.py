"""`pathpacs consult send|list|retry|cancel`: consultation jobs from the command line.

`send` queues the job; the background worker of `pathpacs serve` runs it. With `--wait` the verb
runs it here in the foreground with a progress bar (bytes, instances) and exits 0 when the
partner holds the case, 1 when the job failed (the reason on one line). When a `serve` already
runs the job, `--wait` follows it until it ends. Part RECV adds inbox/accept/decline/answer/report
to the same `consult` verb (`inbox_cli.register(csub, common)`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

from ..status import ArchiveError

PRIORITIES = ("routine", "urgent", "frozen")


def register(sub, common) -> "argparse._SubParsersAction":
    """Add `consult` and its verbs; returns the sub-parsers so other modules add theirs."""
    p = sub.add_parser("consult", help="cross-hospital consultation: send a case, list jobs, retry, cancel")
    csub = p.add_subparsers(dest="consult_command", required=True)
    s = csub.add_parser("send", help="send a study to a partner for consultation (queued; --wait runs it here)")
    common(s)
    s.add_argument("--study", required=True, help="Study Instance UID of the case")
    s.add_argument("--to", required=True, metavar="PARTNER", help="a [partners.NAME] of the configuration")
    s.add_argument("--expert", help="one of the partner's experts (id)")
    s.add_argument("--deidentify", action="store_true", help="send a de-identified copy (LABEL/OVERVIEW left out)")
    s.add_argument("--question", default="", help="the clinical question")
    s.add_argument("--physician", default="", help="the requesting physician (Family^Given)")
    s.add_argument("--priority", default="routine", choices=PRIORITIES)
    s.add_argument("--wait", action="store_true", help="run the job here with a progress bar until it ends")
    s.add_argument("--run-job", help=argparse.SUPPRESS)  # the queued job --wait runs after its re-exec
    s.set_defaults(func=cmd_consult)
    ls = csub.add_parser("list", help="every job: state, instances and bytes sent, errors, turnaround")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_consult)
    for verb, text in (("retry", "queue a failed or cancelled job again (confirmed instances are not re-sent)"),
                       ("cancel", "cancel a queued or running job")):
        r = csub.add_parser(verb, help=text)
        common(r)
        r.add_argument("id")
        r.set_defaults(func=cmd_consult)
    import importlib
    import importlib.util

    if importlib.util.find_spec("archive.consult.inbox_cli") is not None:  # part RECV's verbs, when merged
        importlib.import_module("archive.consult.inbox_cli").register(csub, common)  # inbox, accept, decline, answer, report
    return csub


def _turnaround(job: dict) -> str:
    if not job.get("finished") or not job.get("created"):
        return ""
    try:
        a = datetime.fromisoformat(job["created"].replace("Z", "+00:00"))
        b = datetime.fromisoformat(job["finished"].replace("Z", "+00:00"))
    except ValueError:
        return ""
    s = (b - a).total_seconds()
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def line_of(job: dict) -> str:
    err = job.get("error") or ""
    return (f"{job['id']}  {job['kind']:<7} {job['state']:<9} {job['partner']:<12} {job['priority']:<7} "
            f"{job['instances_sent']}/{job['instances_total']} inst  {_size(job['bytes_sent'])}"
            f"/{_size(job['bytes_total'])}  {_turnaround(job) or '-':>7}  {job['study']}"
            + (f"  error: {err}" if err else ""))


def _wait(arc, job_id: str, quiet: bool) -> dict:
    """Run the job here (or follow the process that runs it) with a progress bar."""
    from tqdm import tqdm

    jobs = arc.consultations
    job = jobs.job(job_id)
    bar = tqdm(total=job["bytes_total"] or None, unit="B", unit_scale=True, unit_divisor=1024,
               disable=quiet or not sys.stderr.isatty(), file=sys.stderr, desc=f"job {job_id}")
    try:
        def progress(j: dict, n: int) -> None:
            bar.update(n)
            bar.set_postfix_str(f"{j['instances_sent']}/{j['instances_total']} instances", refresh=False)

        while True:
            jobs.run_pending(progress=progress, only=job_id)
            job = jobs.job(job_id)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            bar.n = job["bytes_sent"]
            bar.set_postfix_str(f"{job['instances_sent']}/{job['instances_total']} instances (another process)")
            bar.refresh()
            time.sleep(1.0)  # another process holds the lease: follow it
    finally:
        bar.close()


def _reexec_to_send(arc, job_id: str) -> bool:
    """`consult send --wait` from the command line: queueing built the request SR with highdicom,
    whose tables of the standard stay in memory (about 110 MB); the send runs in a fresh image of
    this process (exec: same pid, same terminal) that never loads them. False when this is no
    command-line run (the verb called in-process) or highdicom was not loaded; True when the
    exec failed after the archive was closed (the caller reopens it)."""
    if sys.argv[1:3] != ["consult", "send"] or "highdicom" not in sys.modules:
        return False
    from .jobs import INHERITED_OWNER

    env = dict(os.environ)
    if arc.consultations.claim(job_id) is not None:  # held across the exec: serve's worker waits
        env[INHERITED_OWNER] = arc.consultations.owner
    arc.close()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "archive", *sys.argv[1:], "--run-job", job_id], env)
    except OSError:
        return True
    return True  # not reached


def cmd_consult(args: argparse.Namespace) -> int:
    from ..cli import CliError, open_archive

    verb = args.consult_command
    import logging

    logging.getLogger("pathpacs.consult").setLevel(logging.ERROR)  # the outcome is our own one line
    arc = open_archive(args, readonly=verb == "list")
    try:
        jobs = arc.consultations
        try:
            if verb == "send" and args.run_job:  # --wait, re-executed: only the sending is left
                job = _wait(arc, args.run_job, args.quiet)
                return _outcome(job, args.quiet)
            if verb == "send":
                job_id = jobs.send(args.study, args.to, expert=args.expert, deidentify=args.deidentify,
                                   question=args.question, priority=args.priority, physician=args.physician)
                job = jobs.job(job_id)
                if not args.wait:
                    print(job_id)
                    if not args.quiet:
                        print(f"job {job_id} queued: {job['instances_total']} instances, {_size(job['bytes_total'])} "
                              f"to {args.to}; `pathpacs serve` sends it (or run with --wait)", file=sys.stderr)
                    return 0
                print(job_id, flush=True)
                if _reexec_to_send(arc, job_id):  # returns only when it could not
                    arc = open_archive(args)
                    jobs = arc.consultations
                job = _wait(arc, job_id, args.quiet)
                return _outcome(job, args.quiet)
            if verb == "list":
                every = jobs.jobs()
                if args.json:
                    print(json.dumps([{k: v for k, v in j.items() if k != "lease"} for j in every], indent=1))
                    return 0
                if not every:
                    print("no consultation jobs", file=sys.stderr)
                for j in every:
                    print(line_of(j))
                return 0
            if verb == "cancel":
                job = jobs.cancel(args.id)
                print(f"job {job['id']} cancelled", file=sys.stderr)
                return 0
            if verb == "retry":
                job = jobs.retry(args.id)
                print(f"job {job['id']} queued again ({job['instances_sent']}/{job['instances_total']} "
                      "instances already confirmed)", file=sys.stderr)
                return 0
        except ArchiveError as exc:
            raise CliError(exc.reason)
        raise CliError(f"unknown consult verb {verb}")
    finally:
        arc.close()


def _outcome(job: dict, quiet: bool) -> int:
    if job["state"] == "done":
        if not quiet:
            verified = job.get("verified")
            print(f"job {job['id']} done: {job['instances_sent']} instances, {_size(job['bytes_sent'])} to "
                  f"{job['partner']}" + (f" (partner holds {verified})" if verified is not None else
                                         " (not counted: the partner refuses QIDO)"), file=sys.stderr)
        return 0
    print(f"pathpacs: error: job {job['id']} {job['state']}: {job.get('error') or ''}".rstrip(": "), file=sys.stderr)
    return 1
