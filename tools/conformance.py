#!/usr/bin/env python3
"""WebSocket conformance of the Layer 1 echo server: the Autobahn TestSuite cases, run by kosoku.

    python tools/conformance.py [--sections 1,2,3,4,5,6,7,9,10 | --fast]
                                [--report-dir reports/conformance] [--parallelism 1]

Starts tools/echo_server.py (collab-trio's own trio-websocket settings) as a
subprocess on a free loopback port, runs each chosen Autobahn section against
it with kosoku (`pip install kosoku==0.1.0`), writes kosoku's Autobahn-format
report (index.html, index.json, one .json/.html per case) plus summary.json and
echo_server.log into the report directory, and prints one row per section.

What counts as a pass:
- a case passes when kosoku says so: both its behavior and its close behavior
  are OK, NON-STRICT or INFORMATIONAL (Autobahn's own rule);
- section 9 messages larger than the server's max_message_size (1 MiB) cannot
  be echoed by design: such a case passes when the server closed with 1009
  (kosoku itself reports it FAILED, since it expects the echo);
- the echo server must log no handler error and stop cleanly on SIGTERM.
Exit status: 0 when every chosen section passes, 1 otherwise, 2 on a usage or
setup error (kosoku missing, the server did not start, a section timed out).
Sections 12 and 13 (permessage-deflate) are not offered: trio-websocket does
not negotiate compression, so kosoku reports them UNIMPLEMENTED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ECHO_SERVER = REPO / "tools" / "echo_server.py"

from collab_trio.config import ServerConfig
from collab_trio.testing import HarnessError, ProcessOutput

SECTIONS = (1, 2, 3, 4, 5, 6, 7, 9, 10)
# Measured on a 2-core machine: 1-4, 7 and 10 take well under a second in all,
# 5 about 2 s and 6 about 4.3 s (their cases wait on fixed timers), 9 about 4 s.
# --fast leaves out 9, whose cases move ~130 MB and 12,000 messages and whose
# timing depends most on the machine's load.
FAST_SECTIONS = (1, 2, 3, 4, 5, 6, 7, 10)
MESSAGE_TOO_BIG = 1009
# Verdicts that pass in Autobahn terms (kosoku's CaseResult.passed uses the same set).
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}

SERVER_START_TIMEOUT_S = 20
SERVER_STOP_TIMEOUT_S = 10
LISTENING_RE = re.compile(r"Echo server listening on (ws://127\.0\.0\.1:(\d+)/)")
# Files kosoku's report writer creates; only these are removed before a new run
# (their names contain the agent, here 127.0.0.1:PORT, which changes every run).
REPORT_FILE_RE = re.compile(r"^(index\.(json|html)|.+_case_[0-9_]+\.(json|html)|summary\.json)$")


def parse_sections(text: str) -> tuple[int, ...]:
    """argparse type: a comma-separated list of Autobahn section numbers."""
    try:
        sections = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of section numbers: {text!r}") from None
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise argparse.ArgumentTypeError(
            f"sections must be among {','.join(map(str, SECTIONS))} "
            "(12 and 13 test permessage-deflate, which trio-websocket does not offer)"
        )
    return sections


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="conformance.py",
        description="Run the Autobahn TestSuite cases (via kosoku) against tools/echo_server.py.",
    )
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--sections", type=parse_sections, default=SECTIONS, metavar="N,N,...",
        help="Autobahn sections to run (default: %s)" % ",".join(map(str, SECTIONS)),
    )
    chosen.add_argument(
        "--fast", action="store_const", dest="sections", const=FAST_SECTIONS,
        help="only the quick sections: %s" % ",".join(map(str, FAST_SECTIONS)),
    )
    parser.add_argument("--report-dir", type=Path, default=Path("reports/conformance"),
                        help="where the report goes (default: %(default)s)")
    parser.add_argument("--parallelism", type=int, default=1, metavar="N",
                        help="cases kosoku runs at once (default: 1, so 9.7/9.8 "
                             "round-trip times mean something)")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="give up after this long in all (default: %(default)g)")
    return parser


# --- the echo server subprocess --------------------------------------------------------


def start_echo_server(max_message_size: int) -> tuple[ProcessOutput, str]:
    """tools/echo_server.py on a free port of 127.0.0.1, and its ws:// URL.

    Raises:
        HarnessError: it did not print its listening line in time.
    """
    server = ProcessOutput("echo server", [
        sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1", "--port", "0",
        "--max-message-size", str(max_message_size),
    ])
    try:
        return server, server.wait_for(LISTENING_RE, SERVER_START_TIMEOUT_S).group(1)
    except HarnessError:
        server.stop()
        raise


# --- running kosoku --------------------------------------------------------------------


def oversized_cases(max_message_size: int) -> dict[str, int]:
    """Section 9 case ids whose message is larger than max_message_size, with that size."""
    from kosoku.cases import CASES  # importing builds kosoku's case index

    sizes: dict[str, int] = {}
    for case_id, case_class in CASES.items():
        if not case_id.startswith("9."):
            continue
        # Case.__init__ only stores the protocol and calls init(), which sets DATALEN;
        # the generated 9.7.x/9.8.x classes carry LEN instead.
        case = case_class(None)
        size = getattr(case, "DATALEN", None) or getattr(case_class, "LEN", 0)
        if size > max_message_size:
            sizes[case_id] = size
    return sizes


async def run_section(url: str, section: int, parallelism: int, timeout: float) -> list[Any]:
    """kosoku's CaseResults for one section (failed cases included)."""
    from kosoku import FailureError, run_fuzzingclient

    try:
        return await asyncio.wait_for(
            run_fuzzingclient(url, [f"{section}.*"], None, concurrency=parallelism), timeout
        )
    except FailureError as failure:
        return list(failure.results)  # every case's result, passed or not


def classify(result: Any, oversized: dict[str, int]) -> str:
    """ok, non-strict, info, 1009 or failed, for one case."""
    behavior, close = result.behavior.value, result.behavior_close.value
    if result.case_id in oversized:
        return "1009" if result.remote_close_code == MESSAGE_TOO_BIG else "failed"
    if behavior not in PASSING or close not in PASSING:
        return "failed"
    if "INFORMATIONAL" in (behavior, close):
        return "info"
    if "NON-STRICT" in (behavior, close):
        return "non-strict"
    return "ok"


def why_failed(result: Any, oversized: dict[str, int]) -> str:
    """One line on a failed case."""
    if result.case_id in oversized:
        return (f"{result.case_id}: a {oversized[result.case_id]}-byte message should close "
                f"with 1009, got close code {result.remote_close_code}")
    return (f"{result.case_id}: behavior={result.behavior.value}, "
            f"close={result.behavior_close.value}: {result.result} / {result.result_close}")


COLUMNS = ("ok", "non-strict", "info", "1009", "failed")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-section summary as a plain-text table."""
    header = f"{'section':>7}  {'cases':>5}  " + "  ".join(f"{c:>10}" for c in COLUMNS)
    lines = [header + f"  {'seconds':>7}  verdict", "-" * (len(header) + 18)]
    for row in rows:
        counts = "  ".join(f"{row['counts'][c]:>10}" for c in COLUMNS)
        lines.append(f"{row['section']:>7}  {row['cases']:>5}  {counts}  "
                     f"{row['seconds']:>7.2f}  {'PASS' if row['passed'] else 'FAIL'}")
    total = {c: sum(r["counts"][c] for r in rows) for c in COLUMNS}
    counts = "  ".join(f"{total[c]:>10}" for c in COLUMNS)
    lines.append(f"{'total':>7}  {sum(r['cases'] for r in rows):>5}  {counts}  "
                 f"{sum(r['seconds'] for r in rows):>7.2f}")
    return "\n".join(lines)


def clean_report_dir(report_dir: Path) -> None:
    """Remove the files of an earlier run (only kosoku's and ours)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    for path in report_dir.iterdir():
        if path.is_file() and REPORT_FILE_RE.match(path.name):
            path.unlink()


async def run_all(url: str, args: argparse.Namespace, oversized: dict[str, int]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Run every chosen section; every result and one summary row per section."""
    deadline = time.monotonic() + args.timeout
    results: list[Any] = []
    rows: list[dict[str, Any]] = []
    for section in args.sections:
        started = time.monotonic()
        section_results = await run_section(
            url, section, args.parallelism, max(deadline - started, 0.001)
        )
        seconds = time.monotonic() - started
        counts = {c: 0 for c in COLUMNS}
        failures = []
        for result in section_results:
            kind = classify(result, oversized)
            counts[kind] += 1
            if kind == "failed":
                failures.append(why_failed(result, oversized))
        rows.append({
            "section": section, "cases": len(section_results), "counts": counts,
            "seconds": round(seconds, 2), "passed": bool(section_results) and not failures,
            "failures": failures,
        })
        results.extend(section_results)
        print(f"section {section}: {len(section_results)} cases in {seconds:.1f} s, "
              f"{counts['failed']} failed", flush=True)
    return results, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conformance check; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        import kosoku  # noqa: F401
        from kosoku._report import write_reports  # the writer behind kosoku's own CLI
    except ImportError as exc:
        print(f"kosoku is needed: pip install kosoku==0.1.0 ({exc})", file=sys.stderr)
        return 2

    max_message_size = ServerConfig().max_message_size
    report_dir: Path = args.report_dir
    clean_report_dir(report_dir)
    oversized = oversized_cases(max_message_size)

    try:
        server, url = start_echo_server(max_message_size)
    except HarnessError as exc:
        print(f"conformance run aborted: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"echo server: {url} (max_message_size {max_message_size}); "
              f"sections {','.join(map(str, args.sections))}", flush=True)
        results, rows = asyncio.run(run_all(url, args, oversized))
    except (RuntimeError, TimeoutError) as exc:
        print(f"conformance run aborted: {exc or 'timed out'}", file=sys.stderr)
        return 2
    finally:
        stop_status, killed = server.stop(signal.SIGTERM, SERVER_STOP_TIMEOUT_S)
        server_log = server.text()
        (report_dir / "echo_server.log").write_text(server_log + "\n", encoding="utf-8")

    write_reports(results, str(report_dir))
    server_problems = []
    if "Traceback" in server_log or "Unexpected error" in server_log:
        server_problems.append("the echo server logged an error (see echo_server.log)")
    if killed or stop_status != 0 or "✓ Port released" not in server_log:
        server_problems.append(f"the echo server did not stop cleanly on SIGTERM (status {stop_status})")
    passed = all(row["passed"] for row in rows) and not server_problems

    summary = {
        "kosoku": _kosoku_version(), "server": "tools/echo_server.py", "url": url,
        "max_message_size": max_message_size, "sections": rows,
        "oversized_cases_expect_1009": sorted(oversized, key=lambda c: [int(p) for p in c.split(".")]),
        "pass_rule": "kosoku verdicts OK, NON-STRICT, INFORMATIONAL pass; section 9 messages "
                     "above max_message_size must close with 1009",
        "server_problems": server_problems, "passed": passed,
    }
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print()
    print(format_table(rows))
    for row in rows:
        for failure in row["failures"]:
            print(f"FAILED {failure}")
    for problem in server_problems:
        print(f"FAILED {problem}")
    print(f"\nReport: {report_dir / 'index.html'} (also index.json, summary.json, echo_server.log)")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def _kosoku_version() -> str:
    from importlib.metadata import version

    return version("kosoku")


if __name__ == "__main__":
    sys.exit(main())
