"""The Hookyard benchmark, in one run:

1. ingest: bare Starlette no-op vs Hookyard (svix + durable + forward route; and with no route matching)
   vs adnanh/webhook (HMAC rule; no command, and `true`), under the same wrk load;
2. end to end: delivered ev/s, latency and delivery lag at fixed offered rates; backlog drain after an outage;
3. scale: claim cost and RSS with 0, 100 k and 1 M queued deliveries;
4. profiles (--profile): py-spy of the ingest and delivery paths;
5. clients: the CPU of one forwarded request in each of the gateway's HTTP clients;
6. hot path: the CPU, and with valgrind the instructions, of one webhook's path in one process, without
   the network (with --against REV, also for the tree at REV).

    make bench                      # everything, about 6 minutes; writes bench/results/ and bench/RESULTS.md
    make bench-quick                # shorter, without profiles; results go to /tmp/hookyard-bench-quick
    .venv/bin/python -m bench.run --only ingest,scale --duration 5

Everything runs on 127.0.0.1. Nothing is installed: missing tools are named, and what needs them is skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import clients, end_to_end, hotpath, ingest, profiles, report, scale
from bench.common import (
    BENCH,
    RESULTS,
    Json,
    Processes,
    Settings,
    exit_on_signals,
    find_tools,
    machine,
    phase,
    say,
    table,
    write_json,
)

PARTS: dict[str, tuple[str, str, Callable[[Settings, Processes], Json]]] = {
    "ingest": ("1. Ingest", "ingest.json", ingest.run),
    "e2e": ("2. End to end", "end_to_end.json", end_to_end.run),
    "scale": ("3. Scale", "scale.json", scale.run),
    "profile": ("4. Profiles", "profile.json", profiles.run),
    "clients": ("5. HTTP clients", "clients.json", clients.run),
    "hotpath": ("6. The hot path alone", "hotpath.json", hotpath.run),
}
RESULT_KEYS = {
    "ingest": "ingest",
    "e2e": "end_to_end",
    "scale": "scale",
    "profile": "profile",
    "clients": "clients",
    "hotpath": "hotpath",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds of wrk load per ingest server")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of wrk warm-up per ingest server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--rates", default="500,1000,2000,3000", help="offered end-to-end rates, ev/s")
    parser.add_argument("--e2e-duration", type=float, default=10, help="seconds per offered rate")
    parser.add_argument("--backlog", type=int, default=10_000, help="events sent while the sink is down")
    parser.add_argument("--backlog-rate", type=int, default=1000, help="ev/s while the sink is down")
    parser.add_argument("--levels", default="0,100000,1000000", help="queued deliveries for the scale part")
    parser.add_argument("--pairs", type=int, default=1000, help="claim + finish pairs timed per level")
    parser.add_argument("--profile", action="store_true", help="also profile with py-spy (part 4)")
    parser.add_argument("--profile-duration", type=float, default=8, help="seconds per py-spy recording")
    parser.add_argument(
        "--client-requests", type=int, default=20_000, help="requests per HTTP client (part 5)"
    )
    parser.add_argument(
        "--against", default="", help="a git revision whose hot path part 6 also measures (before and after)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated parts: ingest,e2e,scale,profile,clients,hotpath"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short phases, 100 k at most; results go to /tmp/hookyard-bench-quick",
    )
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the scratch directory (databases, logs)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: write bench/RESULTS.md again from bench/results/*.json (after editing the report)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, work: Path) -> Settings:
    settings = Settings(
        work=work,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        rates=tuple(int(r) for r in args.rates.split(",") if r),
        e2e_duration=args.e2e_duration,
        backlog=args.backlog,
        backlog_rate=args.backlog_rate,
        levels=tuple(int(n) for n in args.levels.split(",") if n),
        pairs=args.pairs,
        profile_duration=args.profile_duration,
        client_requests=args.client_requests,
        against=args.against,
        tools=find_tools(),
    )
    if args.quick:
        settings.results = Path(tempfile.gettempdir()) / "hookyard-bench-quick"
        settings.duration = settings.e2e_duration = 5
        settings.warmup = 1
        settings.backlog = 5000
        settings.levels = tuple(n for n in settings.levels if n <= 100_000)
        settings.pairs = 300
        settings.profile_duration = 4
        settings.client_requests = 5000
    return settings


def chosen_parts(args: argparse.Namespace) -> list[str]:
    if args.only:
        parts = [p.strip() for p in args.only.split(",") if p.strip()]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        return parts
    return [p for p in PARTS if p != "profile" or args.profile]


def check_tools(settings: Settings, parts: list[str]) -> list[str]:
    """Say what is there and what is missing; drop the parts that cannot run."""
    tools = settings.tools
    for tool in tools.values():
        say(f"   {tool.name:<8} {tool.path or f'MISSING (install: {tool.install})'}")
    runnable = []
    for part in parts:
        if part in ("ingest", "profile") and not tools["wrk"].present:
            say(f"   skipping {part}: it needs wrk ({tools['wrk'].install})")
        elif part == "profile" and not tools["py-spy"].present:
            say(f"   skipping profile: it needs py-spy ({tools['py-spy'].install})")
        else:
            runnable.append(part)
    if "hotpath" in runnable and not tools["valgrind"].present:
        say(
            f"   valgrind is missing: part 6 measures CPU but counts no instructions ({tools['valgrind'].install})"
        )
    if "ingest" in runnable and not tools["webhook"].present:
        say(f"   adnanh/webhook is missing: its ingest rows are skipped ({tools['webhook'].install})")
    return runnable


def rewrite_report() -> int:
    """RESULTS.md from the last full run's JSON files, as that run measured them."""
    summary = json.loads((RESULTS / "run.json").read_text())
    missing = [part for part in PARTS if part not in summary["run"]["parts"]]
    if missing:
        # A run of some parts rewrites their files and run.json only: the other files are an older run's.
        say(
            f"the last run written to bench/results ({summary['run']['date']}) did not run "
            f"{', '.join(missing)}: its files there are from an earlier run, and RESULTS.md would present "
            "both as one. Run the whole benchmark, or `git checkout bench/results` for the committed run."
        )
        return 1
    results: Json = {"machine": summary["machine"], "run": summary["run"]}
    for part, (_title, filename, _run) in PARTS.items():
        results[RESULT_KEYS[part]] = json.loads((RESULTS / filename).read_text())
    results["targets"] = report.targets(results)
    (BENCH / "RESULTS.md").write_text(report.render(results))
    say(f"wrote bench/RESULTS.md from the run of {summary['run']['date']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        return rewrite_report()
    exit_on_signals()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="hookyard-bench-"))
    settings = settings_from(args, work)
    results: Json = {"machine": machine()}
    failed = False
    say(f"Hookyard benchmark; scratch directory {work}")
    parts = check_tools(settings, chosen_parts(args))
    try:
        with Processes(work) as processes:
            for part in parts:
                title, filename, run = PARTS[part]
                with phase(title):
                    try:
                        data = run(settings, processes)
                    except Exception as exc:
                        failed = True
                        traceback.print_exc()
                        data = {"error": f"{type(exc).__name__}: {exc}"}
                    processes.close()  # whatever a failed part left running
                data["machine"] = results["machine"]
                results[RESULT_KEYS[part]] = data
                write_json(settings.results, filename, data)
    finally:
        if args.keep_work:
            say(f"\nscratch directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    total = time.monotonic() - started
    results["run"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:] if argv is None else argv,
        "parts": parts,
        "total_s": total,
    }
    results["targets"] = report.targets(results)
    say("\n== Targets")
    say(
        table(
            ["target", "measured", "result"],
            [[t["target"], t["measured"], t["result"]] for t in results["targets"]],
            "lll",
        )
    )
    summary = {key: results[key] for key in ("machine", "run", "targets")}
    write_json(settings.results, "run.json", summary)
    if settings.results == RESULTS and set(parts) == set(PARTS):
        (BENCH / "RESULTS.md").write_text(report.render(results))
        say(f"\nwrote bench/RESULTS.md and bench/results/ in {total / 60:.1f} minutes")
    else:
        say(
            f"\nresults in {settings.results} ({total / 60:.1f} minutes); bench/RESULTS.md is written by a full run"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
