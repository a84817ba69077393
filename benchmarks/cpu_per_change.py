#!/usr/bin/env python3
"""Server CPU per change, thread by thread, one change at a time: collab-trio against the reference relay.

    python benchmarks/cpu_per_change.py [--changes 4000] [--users 10] [--rounds 5]
        [--servers reference,collab-trio] [--short] [--instructions]

benchmarks/fanout.py measures the servers under its asyncio load generator,
whose processes compete with the server for this machine's two cores; its
fixed-rate figures move by 20% from one run to the next. This script asks a
narrower question with less noise: what one change costs the server.

One session of `--users` clients in this process (plain blocking sockets,
masked frames made by hand: next to no client CPU). User 0 sends an
Optiverse-sized `add_item`; every other user reads its relay and user 0
its `ack`; then the next. So the server handles exactly one change at a
time, never a batch. After a warm-up (a tenth of the changes, at least
50) the server's CPU time over `--changes` changes is read from
/proc/PID/stat (user and system time of the whole process, threads that
ended meanwhile included) and /proc/PID/task/PID/stat (the event loop's
thread); the other threads' share (collab-trio's SQLite writer) is the
difference. Servers are started
fresh for every run exactly as benchmarks/fanout.py starts them, and
alternate within each round; the table gives the median of the rounds and,
in brackets, the lowest (a busy machine only adds).

`--instructions` counts instead the user-space instructions each server
runs per change, under valgrind's callgrind (`valgrind` must be installed;
counting starts after the warm-up, with `callgrind_control`): the same
figure from one run to the next within a percent or two, where CPU time
moves by ten on this shared machine, and the figure that tells what a
change in the code saves. The server runs 20-50 times slower under
valgrind, so the defaults are then `--changes 600 --rounds 1`, and the
writer thread's share is larger than at full speed (fewer changes per
transaction).

Nothing about speed is asserted. The exit status is 0 when every run ran and
2 when one could not (a server that doesn't start, a client that can't join
or gets no answer within `--timeout` seconds). Progress goes to stderr, the
table to stdout. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abuse import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, frame  # noqa: E402 - the sibling benchmark's masked client frames
from fanout import (  # noqa: E402 - the sibling benchmark's servers, as it starts them
    COLLAB,
    REFERENCE,
    BenchError,
    ServerUnderTest,
    bounded,
    lens_data,
    machine_facts,
    name_list,
    progress,
    start_server,
)

EXIT_OK, EXIT_BROKEN = 0, 2
# Under valgrind: a server starts and answers 20-50 times slower.
VALGRIND_START_TIMEOUT = 180.0
VALGRIND_ANSWER_TIMEOUT = 120.0
# The receivers send nothing: under valgrind a run may last longer than
# collab-trio's idle timeout (90 s), which would close them (4000).
VALGRIND_COLLAB_ARGS = ("--idle-timeout", "86400")
CALLGRIND_OUT = "callgrind.out"
SESSION = "cpu-per-change"
# Join notices still coming in are read until the clients were quiet this long.
QUIET = 0.3
SHORT = {"changes": 200, "users": 3, "rounds": 1}
SHORT_INSTRUCTIONS = {"changes": 30, "users": 3, "rounds": 1}


class ClientError(Exception):
    """A client could not join, was closed, got an error, or no answer in time."""


@attrs.define(eq=False)
class Client:
    """One user: a blocking socket, the bytes read and not yet parsed."""

    user: str
    sock: socket.socket
    # Seconds any read may wait (ClientError past it).
    timeout: float
    buffer: bytearray = attrs.field(factory=bytearray)

    @classmethod
    def join(cls, port: int, user: str, timeout: float) -> Client:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws/{SESSION}/{user} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        client = cls(user, sock, timeout)
        while b"\r\n\r\n" not in client.buffer:
            client._read()
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ClientError(f"{user}: upgrade refused: {head.splitlines()[0].decode(errors='replace')}")
        client.buffer = bytearray(rest)
        return client

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise ClientError(f"{self.user}: no answer in time") from None
        if not data:
            raise ClientError(f"{self.user}: the server closed the connection")
        self.buffer += data

    def _frame(self) -> tuple[int, bytes] | None:
        """The next whole (unmasked) server frame in the buffer, taken out of it."""
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        size, start = buffer[1] & 0x7F, 2
        if size >= 126:
            start = 4 if size == 126 else 10
            if len(buffer) < start:
                return None
            size = int.from_bytes(buffer[2:start], "big")
        if len(buffer) < start + size:
            return None
        opcode, payload = buffer[0] & 0x0F, bytes(buffer[start : start + size])
        del buffer[: start + size]
        return opcode, payload

    def message(self) -> bytes:
        """The next text message (a ping is answered on the way)."""
        while True:
            taken = self._frame()
            if taken is None:
                self._read()
                continue
            opcode, payload = taken
            if opcode == OP_TEXT:
                return payload
            if opcode == OP_PING:
                self.sock.sendall(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                raise ClientError(f"{self.user}: closed by the server: {payload[2:].decode(errors='replace')}")

    def drain(self) -> None:
        """Drop what arrived until nothing came for QUIET seconds (join notices)."""
        self.sock.settimeout(QUIET)
        try:
            while True:
                self._read()
        except ClientError:
            pass
        finally:
            self.sock.settimeout(self.timeout)
        self.buffer.clear()

    def close(self) -> None:
        self.sock.close()


def _ticks(path: str) -> tuple[int, int]:
    """(user, system) clock ticks from a /proc stat file (OSError if it is gone)."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; after the ")" the count starts at field 3.
    return int(fields[11]), int(fields[12])


def process_ticks(pid: int) -> tuple[int, int]:
    """User and system ticks of the whole process, threads that ended included."""
    return _ticks(f"/proc/{pid}/stat")


def main_thread_ticks(pid: int) -> tuple[int, int]:
    """User and system ticks of the process's first thread: its event loop."""
    return _ticks(f"/proc/{pid}/task/{pid}/stat")


@attrs.frozen
class RunResult:
    server: str
    changes: int
    user_us: float
    system_us: float
    main_us: float
    other_us: float
    round_trip_us: float
    # --instructions: thousands of user-space instructions per change (nan otherwise).
    instructions_k: float = math.nan
    main_instructions_k: float = math.nan
    other_instructions_k: float = math.nan

    @property
    def total_us(self) -> float:
        return self.user_us + self.system_us


def change_payload(number: int) -> bytes:
    """An Optiverse-sized add_item (fanout.py's, as its sender sends it)."""
    command = {
        "type": "command",
        "op_id": f"user-0:{number}",
        "command": {
            "action": "add_item", "item_type": "lens", "item_id": f"it-{number}",
            "data": lens_data(math.cos(number / 50) * 200, math.sin(number / 50) * 100, number % 360,
                              n=number, sent_ns=time.monotonic_ns()),
        },
    }
    return orjson.dumps(command)


def one_change(sender: Client, receivers: list[Client], number: int) -> None:
    sender.sock.sendall(frame(OP_TEXT, change_payload(number)))
    for receiver in receivers:
        receiver.message()
    while b'"ack"' not in (answer := sender.message()):
        if b'"error"' in answer:
            raise ClientError(f"{sender.user}: {answer[:300].decode(errors='replace')}")


def measure(server: ServerUnderTest, args: argparse.Namespace) -> RunResult:
    clients: list[Client] = []
    try:
        for index in range(args.users):
            clients.append(Client.join(server.port, f"user-{index}", args.timeout))
        for client in clients:
            client.drain()
        sender, receivers = clients[0], clients[1:]
        warmup = max(50, args.changes // 10)
        for number in range(warmup):
            one_change(sender, receivers, number)
        if args.instructions:
            callgrind_control(server.pid, "--instr=on", args.timeout)
        before, main_before, started = process_ticks(server.pid), main_thread_ticks(server.pid), time.monotonic()
        for number in range(warmup, warmup + args.changes):
            one_change(sender, receivers, number)
        after, main_after, ended = process_ticks(server.pid), main_thread_ticks(server.pid), time.monotonic()
        counted: dict[str, float] = {}
        if args.instructions:
            callgrind_control(server.pid, "--instr=off", args.timeout)
            main, everything = dumped_instructions(server, args.timeout)
            counted = {
                "instructions_k": everything / args.changes / 1000,
                "main_instructions_k": main / args.changes / 1000,
                "other_instructions_k": (everything - main) / args.changes / 1000,
            }
    finally:
        for client in clients:
            client.close()
    per_tick = 1e6 / os.sysconf("SC_CLK_TCK") / args.changes
    user, system = after[0] - before[0], after[1] - before[1]
    # The two files are read one after the other: the thread's figure may be
    # a tick ahead of the process's.
    main = min(sum(main_after) - sum(main_before), user + system)
    return RunResult(
        server=server.name,
        changes=args.changes,
        user_us=user * per_tick,
        system_us=system * per_tick,
        main_us=main * per_tick,
        # The process's figure keeps the time of threads that ended meanwhile (trio's idle workers).
        other_us=(user + system - main) * per_tick,
        round_trip_us=(ended - started) / args.changes * 1e6,
        **counted,
    )


def valgrind(work_dir: str) -> list[str]:
    """What runs a server under callgrind, counting nothing until told (fanout.start_server's wrapper)."""
    return [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
        f"--callgrind-out-file={os.path.join(work_dir, CALLGRIND_OUT)}",
    ]


def callgrind_control(pid: int, option: str, timeout: float) -> str:
    """Run `callgrind_control option pid` (ClientError if it fails)."""
    try:
        done = subprocess.run(["callgrind_control", option, str(pid)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClientError(f"callgrind_control {option}: {exc}") from None
    if done.returncode != 0:
        raise ClientError(f"callgrind_control {option}: {(done.stdout + done.stderr).strip()[-300:]}")
    return done.stdout


def dumped_instructions(server: ServerUnderTest, timeout: float) -> tuple[int, int]:
    """Dump the counts (callgrind_control --dump) and read them: the
    instructions of the first thread (the event loop) and of all threads."""
    assert server.data_dir is not None
    callgrind_control(server.pid, "--dump", timeout)
    # One file per thread for the dump: <out>.1-01, <out>.1-02, ...
    pattern = re.compile(re.escape(CALLGRIND_OUT) + r"\.1-(\d+)$")
    deadline = time.monotonic() + timeout
    while True:
        files = {int(m.group(1)): m.string for m in map(pattern.match, os.listdir(server.data_dir)) if m}
        totals = {thread: _callgrind_total(os.path.join(server.data_dir, name)) for thread, name in files.items()}
        if totals and None not in totals.values():
            break
        if time.monotonic() > deadline:
            raise ClientError(f"no complete callgrind dump in {server.data_dir} within {timeout:g} s")
        time.sleep(0.2)
    return totals.get(1, 0) or 0, sum(t or 0 for t in totals.values())


def _callgrind_total(path: str) -> int | None:
    """The `totals:` line of a callgrind output file (None while it is being written)."""
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_all(args: argparse.Namespace) -> tuple[list[RunResult], int]:
    results: list[RunResult] = []
    failed = 0
    total = args.rounds * len(args.servers)
    for round_ in range(args.rounds):
        for index, name in enumerate(args.servers):
            step = f"[{round_ * len(args.servers) + index + 1:2d}/{total}] {name}"
            progress(f"{step} ...")
            try:
                if args.instructions:
                    server = start_server(
                        name, args, wrapper=valgrind, start_timeout=VALGRIND_START_TIMEOUT,
                        collab_args=VALGRIND_COLLAB_ARGS,
                    )
                else:
                    server = start_server(name, args)
            except BenchError as exc:
                progress(f"{step}: could not run: {exc}")
                failed += 1
                continue
            try:
                result = measure(server, args)
            except (ClientError, OSError) as exc:
                progress(f"{step}: could not run: {exc}")
                failed += 1
                continue
            finally:
                server.stop()
            results.append(result)
            if args.instructions:
                progress(
                    f"{step}: {result.instructions_k:.1f}k instructions/change (main thread"
                    f" {result.main_instructions_k:.1f}k, others {result.other_instructions_k:.1f}k)"
                )
                continue
            progress(
                f"{step}: {result.total_us:.1f} us/change ({result.user_us:.1f} user, {result.system_us:.1f} system;"
                f" main thread {result.main_us:.1f}, others {result.other_us:.1f}), round trip {result.round_trip_us:.0f} us"
            )
    return results, failed


ROWS = (
    ("server CPU us/change", "total_us"),
    ("  user", "user_us"),
    ("  system", "system_us"),
    ("  event loop thread", "main_us"),
    ("  other threads", "other_us"),
    ("round trip us/change (client)", "round_trip_us"),
)
INSTRUCTION_ROWS = (
    ("instructions/change (thousands)", "instructions_k"),
    ("  event loop thread", "main_instructions_k"),
    ("  other threads", "other_instructions_k"),
)


def format_table(results: list[RunResult], args: argparse.Namespace) -> str:
    by_server = {name: [r for r in results if r.server == name] for name in args.servers}
    rounds = max((len(runs) for runs in by_server.values()), default=0)
    lines = [
        f"== {args.users} users, {args.changes:,} add_item one at a time"
        + (", user-space instructions under valgrind" if args.instructions else "")
        + (f"  (median of {rounds} rounds; lowest in brackets)" if rounds > 1 else "")
    ]
    ratio = COLLAB in by_server and REFERENCE in by_server
    header = f"  {'':32s}" + "".join(f"  {name:>16s}" for name in args.servers) + ("  collab/ref" if ratio else "")
    lines += [header, "  " + "-" * (len(header) - 2)]
    for label, key in INSTRUCTION_ROWS if args.instructions else ROWS:
        cells, medians = [], {}
        for name in args.servers:
            values = [getattr(r, key) for r in by_server[name]]
            if not values:
                cells.append(f"  {'could not run':>16s}")
                continue
            medians[name] = statistics.median(values)
            text = f"{medians[name]:.1f}" + (f" ({min(values):.1f})" if len(values) > 1 else "")
            cells.append(f"  {text:>16s}")
        line = f"  {label:32s}" + "".join(cells)
        if ratio:
            ref, collab = medians.get(REFERENCE), medians.get(COLLAB)
            line += f"  {collab / ref:10.2f}" if ref and collab is not None else f"  {'-':>10s}"
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    # At most 20,000: the receivers send nothing, and a run must end well
    # within the server's idle timeout (90 s; under valgrind it is lifted);
    # the document stays far below its size limit (16 MiB).
    add("--changes", type=bounded(int, 10, 20_000), default=None,
        help="changes measured per run (4000, with --instructions 600; at most 20,000)")
    add("--users", type=bounded(int, 2, 100), default=10, help="users in the session: 1 sender, the rest receive (10)")
    add("--rounds", type=bounded(int, 1, 50), default=None, help="runs per server, alternating (5, with --instructions 1)")
    add("--servers", type=name_list((REFERENCE, COLLAB)), default=[REFERENCE, COLLAB], help="reference,collab-trio (both)")
    add("--timeout", type=bounded(float, 1, 600), default=None,
        help=f"seconds any answer may take (20, with --instructions {VALGRIND_ANSWER_TIMEOUT:g})")
    add("--instructions", action="store_true",
        help="count user-space instructions per change under valgrind's callgrind instead of CPU time")
    add("--short", action="store_true", help="a run of a few seconds (CI): " + ", ".join(
        f"--{k} {v}" for k, v in SHORT.items()) + "; with --instructions " + ", ".join(
        f"--{k} {v}" for k, v in SHORT_INSTRUCTIONS.items()))
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.short:
        for key, value in (SHORT_INSTRUCTIONS if args.instructions else SHORT).items():
            setattr(args, key, value)
    defaults = {"changes": 600, "rounds": 1, "timeout": VALGRIND_ANSWER_TIMEOUT} if args.instructions else {
        "changes": 4000, "rounds": 5, "timeout": 20.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # What fanout.start_server and machine_facts need to know.
    args.collab_store, args.reference_json, args.generators = "sqlite", "json", 0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("--instructions needs valgrind (and its callgrind_control); install it first"
              " (Debian: apt-get install valgrind)", file=sys.stderr)
        return EXIT_BROKEN
    facts = machine_facts(args)
    # Its load line is fanout.py's: this load is the clients in this process.
    facts[-1] = f"load:    {args.users} blocking clients in this process, one change at a time; commands ~{len(change_payload(0))} bytes"
    if args.instructions:
        facts.append(f"valgrind: {' '.join(valgrind('DIR')[:4])}; collab-trio also {' '.join(VALGRIND_COLLAB_ARGS)}")
    print("\n".join(facts) + "\n", flush=True)
    results, failed = run_all(args)
    print(format_table(results, args))
    print(f"\nall {len(results)} runs ran" if not failed else f"\n{failed} run(s) could not run")
    return EXIT_OK if not failed else EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
