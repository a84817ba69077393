#!/usr/bin/env python3
"""Commit throughput: commands per second the server acknowledges, per store.

    python benchmarks/commit_throughput.py [--seconds 5] [--warmup 2] [--repeat 2]
        [--window 64] [--sessions 1,10] [--stores memory,normal,full]

An `ack` goes to the sender only after the store committed the command, so
acks per second is commit throughput, end to end over real loopback
WebSockets. Everything is measured from outside, through public interfaces:
the server is `collab-trio serve` in a child process (started by
collab_trio.testing, a fresh one with a fresh data directory per run, the
per-connection rate limit lifted), the clients run in this process. Each
session has `--clients-per-session` connections; each keeps `--window`
commands in flight (pipelining: group commit needs several commands waiting;
a send-wait-ack loop would measure latency instead). Commands are
Optiverse-sized: every connection adds `--items` lenses, then moves them
round robin; every command carries a data dict of 10 fields.

The table gives the CPU used by the server (from /proc/PID/stat), by the
clients and by other processes of the machine meanwhile (fractions of one
core), and the server's CPU per command: that cost is what bounds throughput
once the server has a core to itself, and it depends much less on how busy
the machine is than commands/s do. A busy machine only slows runs down, so
with `--repeat` the best run of each configuration counts. (Transactions and
ops per transaction are not reported: the server exposes no such count.)
After each run a probe joins every session: the `version` of its
connection:ack must cover every command acknowledged (nothing acked is lost).

The issue's requirement: with `fsync normal`, SQLite commits at least half as
many commands per second as the memory store, for each session count. A
PASS/FAIL line is printed per session count; the exit status is 1 if one
fails, 2 if a run itself went wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed

from collab_trio import testing

# (label, --store, --fsync) for each --stores name.
STORE_CONFIGS = {
    "memory": ("memory", "memory", "normal"),
    "normal": ("sqlite", "sqlite", "normal"),
    "full": ("sqlite", "sqlite", "full"),
}
# Bounds on everything that waits on the other side (seconds).
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 3.0
STOP_TIMEOUT = 15.0
# This measures the commit path's capacity: lift the limits that would cap a
# connection at a few hundred messages a second far above anything reachable.
UNLIMITED = ("--rate-limit", "1000000000", "--rate-burst", "1000000000", "--max-connections-per-ip", "1000000")
# The requirement: sqlite/normal at least this fraction of memory.
REQUIRED_RATIO = 0.5
EXIT_FAILED = 1
EXIT_BROKEN = 2
MAX_ERRORS_KEPT = 5

# Fields of an Optiverse lens besides its position: with x_mm, y_mm and
# angle_deg, ten fields per data dict.
LENS_FIELDS = {
    "name": "L1",
    "focal_length_mm": 100.0,
    "clear_aperture_mm": 25.4,
    "center_thickness_mm": 3.6,
    "material": "N-BK7",
    "coating": "AR 400-700 nm",
    "mount": "SM1L05",
}


# ---------------------------------------------------------------------------
# The workload and the clients


@attrs.define(eq=False)
class Workload:
    """Pre-encoded commands of one connection: the JSON is built by formatting,
    so the client spends little CPU per command."""

    user_id: str
    items: int
    _static: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # The constant part of the data dict, without its braces.
        self._static = json.dumps(LENS_FIELDS, separators=(",", ":"))[1:-1]

    def command(self, n: int) -> str:
        """The text of command number n (n >= 1): first add the items, then move them."""
        index = (n - 1) % self.items
        action = "add_item" if n <= self.items else "move_item"
        x = round(math.cos(n / 50) * 200, 3)
        y = round(math.sin(n / 50) * 100, 3)
        angle = n % 360
        return (
            '{"type":"command","op_id":%d,"command":{"action":"%s","item_type":"lens",'
            '"item_id":"%s-lens-%d","data":{"x_mm":%r,"y_mm":%r,"angle_deg":%d,%s}}}'
            % (n, action, self.user_id, index, x, y, angle, self._static)
        )


@attrs.define(eq=False)
class Recorder:
    """What the clients saw: acks and their latencies while measuring."""

    measuring: bool = False
    acked: int = 0
    latencies: list[float] = attrs.field(factory=list)
    # Acks during the whole run (warm-up included), and anything unexpected.
    acked_total: int = 0
    errors: list[str] = attrs.field(factory=list)
    error_count: int = 0

    def error(self, text: str) -> None:
        """Note something unexpected (the first few are kept for the report)."""
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


async def drive_connection(
    port: int,
    session_id: str,
    user_id: str,
    args: argparse.Namespace,
    recorder: Recorder,
    go: trio.Event,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Join, report ready, keep `args.window` commands in flight from `go` to `stop`, close."""
    workload = Workload(user_id, args.items)
    path = f"/ws/{session_id}/{user_id}"
    async with testing.tcp_client(port, path, message_queue_size=4 * args.window, close_timeout=CLOSE_TIMEOUT) as ws:
        with trio.fail_after(CONNECT_TIMEOUT):
            while json.loads(await ws.get_message())["type"] != "connection:ack":
                pass
        task_status.started()
        await go.wait()
        slots = trio.Semaphore(args.window)
        sent_at: dict[int, float] = {}

        async def sender() -> None:
            n = 0
            try:
                while True:
                    await slots.acquire()
                    n += 1
                    sent_at[n] = time.perf_counter()
                    await ws.send_message(workload.command(n))
            except ConnectionClosed as exc:
                recorder.error(f"{user_id}@{session_id}: connection closed: {exc.reason}")

        async def receiver() -> None:
            try:
                while True:
                    handle(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                recorder.error(f"{user_id}@{session_id}: connection closed: {exc.reason}")

        def handle(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "ack":
                started = sent_at.pop(message.get("op_id"), None)
                if started is None:
                    recorder.error(f"{user_id}@{session_id}: unexpected {message}")
                    return
                recorder.acked_total += 1
                if recorder.measuring:
                    recorder.acked += 1
                    recorder.latencies.append(time.perf_counter() - started)
                slots.release()
            elif kind == "error":
                recorder.error(f"{user_id}@{session_id}: {message}")
                slots.release()  # the error names no op_id; keep the window full anyway
            # Relayed commands of other connections in the session: not ours to count.

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
            await stop.wait()
            nursery.cancel_scope.cancel()


async def stored_versions(port: int, session_ids: list[str]) -> int:
    """The sum of the sessions' versions, as a fresh member's connection:ack tells it."""
    total = 0
    for session_id in session_ids:
        async with testing.tcp_client(port, f"/ws/{session_id}/probe", close_timeout=CLOSE_TIMEOUT) as ws:
            ack = await testing.recv_json(ws, CONNECT_TIMEOUT)
        total += int(ack["version"])
    return total


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc/PID/stat (Linux; nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# One run


@attrs.frozen
class Result:
    """The outcome of one (store, fsync, sessions) run."""

    label: str
    store: str
    fsync: str
    sessions: int
    seconds: float
    acked: int
    latencies_ms: tuple[float, float]
    server_cpu: float
    client_cpu: float
    # CPU (in cores) that other processes of the machine used meanwhile.
    other_cpu: float
    errors: tuple[str, ...]

    @property
    def rate(self) -> float:
        return self.acked / self.seconds


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan, math.nan
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    # Guest time is already counted in user and nice.
    total = sum(fields[:8])
    return (total - idle) / ticks, total / ticks


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values (nan if empty)."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def run_one(args: argparse.Namespace, name: str, sessions: int) -> Result:
    """Start a fresh server, load it, measure, check, stop it."""
    label, store, fsync = STORE_CONFIGS[name]
    shown_fsync = fsync if store == "sqlite" else "-"
    data_dir = Path(tempfile.mkdtemp(prefix=f"collab-bench-{label}-", dir=args.data_root))
    recorder = Recorder()
    session_ids = [f"bench-{s}" for s in range(sessions)]
    try:
        server_args = ("--store", store, "--fsync", fsync, "--data-dir", str(data_dir), *UNLIMITED)
        async with testing.server_process(*server_args) as server:
            pid = server.process.pid
            go, stop = trio.Event(), trio.Event()
            async with trio.open_nursery() as clients:
                for session_id in session_ids:
                    for c in range(args.clients_per_session):
                        await clients.start(
                            drive_connection, server.port, session_id, f"user-{c}", args, recorder, go, stop
                        )
                go.set()
                await trio.sleep(args.warmup)
                server_cpu0, client_cpu0, (busy0, _) = process_cpu(pid), time.process_time(), machine_busy()
                recorder.measuring = True
                started = time.perf_counter()
                await trio.sleep(args.seconds)
                recorder.measuring = False
                elapsed = time.perf_counter() - started
                server_cpu = process_cpu(pid) - server_cpu0
                client_cpu = time.process_time() - client_cpu0
                busy1, _ = machine_busy()
                # Each connection then closes with a handshake, bounded by CLOSE_TIMEOUT.
                stop.set()
            # Every ack promises a committed op: a new member must see all of them.
            stored = await stored_versions(server.port, session_ids)
            if stored < recorder.acked_total:
                recorder.error(f"{recorder.acked_total} commands acknowledged but only {stored} in the sessions")
            status = await server.stop(timeout=STOP_TIMEOUT)
            if status != 0:
                recorder.error(f"server exited with status {status} after SIGINT:\n{server.output}")
    finally:
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    if recorder.acked_total == 0:
        recorder.error("no command was acknowledged")
    latencies = sorted(recorder.latencies)
    more = (f"... {recorder.error_count} in all",) if recorder.error_count > len(recorder.errors) else ()
    return Result(
        label=label,
        store=store,
        fsync=shown_fsync,
        sessions=sessions,
        seconds=elapsed,
        acked=recorder.acked,
        latencies_ms=(percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000),
        server_cpu=server_cpu / elapsed,
        client_cpu=client_cpu / elapsed,
        other_cpu=max(0.0, (busy1 - busy0 - client_cpu - server_cpu) / elapsed),
        errors=tuple(recorder.errors) + more,
    )


# ---------------------------------------------------------------------------
# Report


def machine_facts(args: argparse.Namespace) -> list[str]:
    """What the numbers depend on."""
    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    data_root = args.data_root or tempfile.gettempdir()
    return [
        f"machine:   {os.cpu_count()} cores ({affinity} usable), {cpu_model}, {platform.system()} {platform.release()}",
        f"python:    {platform.python_implementation()} {platform.python_version()}",
        f"sqlite:    {sqlite3.sqlite_version} (library)",
        f"packages:  collab-trio {_version('collab-trio')}, trio {_version('trio')},"
        f" trio-websocket {_version('trio-websocket')}, wsproto {_version('wsproto')}",
        f"data dir:  fresh per run under {data_root} ({filesystem_of(data_root)});"
        f" {fsync_latency(data_root)}",
        "setup:     `collab-trio serve` in a child process, the clients in this process; loopback TCP;"
        " rate limits lifted",
        f"workload:  {args.clients_per_session} connection(s) per session, window {args.window}"
        f" commands in flight each, {args.items} items (add, then move round robin), ~"
        f"{command_size(args.items)} bytes per command",
        f"timing:    {args.warmup:g} s warm-up, then {args.seconds:g} s measured per run,"
        f" {args.repeat} run(s) per configuration",
        f"load:      {load_average()} (1/5/15-min load average before the first run)",
    ]


def fsync_latency(directory: str, count: int = 50) -> str:
    """Median time of a 4 KiB write + fsync in directory: what one `fsync full` commit costs at least."""
    times = []
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix="collab-bench-fsync-") as probe:
            for _ in range(count):
                started = time.perf_counter()
                probe.write(b"x" * 4096)
                probe.flush()
                os.fsync(probe.fileno())
                times.append(time.perf_counter() - started)
    except OSError as exc:
        return f"? ({exc})"
    return f"{sorted(times)[len(times) // 2] * 1000:.2f} ms median per 4 KiB write + fsync"


def command_size(items: int) -> int:
    """Bytes of a typical move_item command (and a check that the template is valid JSON)."""
    text = Workload("user-0", items).command(items + 1000)
    assert len(json.loads(text)["command"]["data"]) == 10
    return len(text.encode())


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def filesystem_of(path: str) -> str:
    """The filesystem type holding path, from /proc/mounts (Linux)."""
    best, kind = "", "?"
    try:
        real = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fields[2]
    except OSError:
        pass
    return f"{kind} on {best or '?'}"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def format_table(results: list[Result]) -> str:
    """The results table; ratios against the memory run with the same session count."""
    memory = {r.sessions: r.rate for r in results if r.store == "memory"}
    header = (
        "store", "fsync", "sessions", "commands/s", "p50 ms", "p99 ms", "vs memory",
        "server cpu", "client cpu", "other cpu", "server us/cmd",
    )
    rows = [header]
    for r in results:
        reference = memory.get(r.sessions)
        rows.append((
            r.label,
            r.fsync,
            str(r.sessions),
            f"{r.rate:,.0f}",
            f"{r.latencies_ms[0]:.2f}",
            f"{r.latencies_ms[1]:.2f}",
            "-" if not reference else f"{r.rate / reference:.2f}",
            f"{r.server_cpu:.0%}",
            f"{r.client_cpu:.0%}",
            f"{r.other_cpu:.0%}",
            f"{r.server_cpu / r.rate * 1e6:.0f}" if r.rate else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def best_runs(results: list[Result]) -> list[Result]:
    """Per (store, fsync, sessions), the run with the most commands/s, in first-run order.

    Other processes on the machine only ever slow a run down, so the best of
    several repeats is the closest to what the server can do.
    """
    best: dict[tuple[str, str, int], Result] = {}
    for r in results:
        key = (r.store, r.fsync, r.sessions)
        if key not in best or r.rate > best[key].rate:
            best[key] = r
    return list(best.values())


def verdicts(results: list[Result]) -> list[tuple[bool | None, str]]:
    """PASS/FAIL of the requirement, per session count (None: not measured)."""
    out: list[tuple[bool | None, str]] = []
    for sessions in sorted({r.sessions for r in results}):
        memory = next((r for r in results if r.sessions == sessions and r.store == "memory"), None)
        normal = next(
            (r for r in results if r.sessions == sessions and r.store == "sqlite" and r.fsync == "normal"),
            None,
        )
        if memory is None or normal is None or memory.rate == 0:
            out.append((None, f"SKIP sessions={sessions}: needs both memory and sqlite/normal runs"))
            continue
        ratio = normal.rate / memory.rate
        ok = ratio >= REQUIRED_RATIO
        out.append((
            ok,
            f"{'PASS' if ok else 'FAIL'} sessions={sessions}: sqlite fsync=normal {normal.rate:,.0f}/s"
            f" is {ratio:.3f} x memory {memory.rate:,.0f}/s (required >= {REQUIRED_RATIO})",
        ))
    return out


# ---------------------------------------------------------------------------
# Command line


def parse_stores(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in STORE_CONFIGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"stores are a comma-separated subset of {', '.join(STORE_CONFIGS)}")
    return names


def positive(kind: Callable[[str], Any], upper: float) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        value = kind(text)
        if not 0 < value <= upper:
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {upper:g}")
        return value

    return check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Commands per second collab-trio acknowledges (= commits), per store."
    )
    parser.add_argument("--seconds", type=positive(float, 120), default=5.0, help="measured seconds per run (5)")
    parser.add_argument("--warmup", type=positive(float, 60), default=2.0, help="warm-up seconds per run (2)")
    parser.add_argument("--window", type=positive(int, 1000), default=64, help="commands in flight per connection (64)")
    parser.add_argument("--sessions", type=testing.counts_argument("session counts", 1, 100), default=[1, 10], help="session counts (1,10)")
    parser.add_argument("--clients-per-session", type=positive(int, 20), default=1, help="connections per session (1)")
    parser.add_argument("--items", type=positive(int, 10_000), default=50, help="items per connection (50)")
    parser.add_argument(
        "--stores", type=parse_stores, default=list(STORE_CONFIGS),
        help="which of memory,normal,full (all); normal/full are SQLite's fsync modes",
    )
    parser.add_argument("--repeat", type=positive(int, 20), default=2, help="runs per configuration; the best counts (2)")
    parser.add_argument("--data-root", help="make the per-run data dirs here (system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data dirs")
    return parser


async def run_all(args: argparse.Namespace) -> list[Result]:
    """Every run, repeats interleaved so that background load hits every store alike."""
    results = []
    for repeat in range(1, args.repeat + 1):
        for sessions in args.sessions:
            for name in args.stores:
                result = await run_one(args, name, sessions)
                results.append(result)
                print(
                    f"  run {repeat}/{args.repeat}: {result.label:<6} {result.fsync:<6}"
                    f" sessions={sessions:<3} {result.rate:>8,.0f} commands/s"
                    f"  (other processes: {result.other_cpu:.0%} cpu)",
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for line in machine_facts(args):
        print(line)
    print(flush=True)
    try:
        all_results = trio.run(run_all, args)
    except Exception:
        traceback.print_exc()
        print("ERROR: a run failed; no verdict")
        return EXIT_BROKEN
    results = best_runs(all_results)
    print()
    if args.repeat > 1:
        print(f"best of {args.repeat} runs each:")
    print(format_table(results))
    print()
    status = 0
    for ok, line in verdicts(results):
        print(line)
        if ok is False:
            status = EXIT_FAILED
    for r in all_results:
        for error in r.errors:
            print(f"ERROR {r.label}/{r.fsync}/{r.sessions}: {error}")
            status = EXIT_BROKEN
    return status


if __name__ == "__main__":
    sys.exit(main())
