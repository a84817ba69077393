#!/usr/bin/env python3
"""Scale: 1 node and 3 nodes behind HAProxy on one machine, and the time to fail over.

    python benchmarks/scale.py --database-url postgresql://...   [--sessions 20] [--clients 3]
        [--seconds 10] [--nodes 1,3] [--lease-timeout 10]
    python benchmarks/scale.py --short                           # a few seconds (CI)
    python benchmarks/scale.py --store memory                    # no Postgres: routing and CPU only

Without --database-url, $COLLAB_TRIO_TEST_DATABASE_URL is used. Each run
starts fresh `collab-trio serve --store postgres` nodes (real processes,
free ports, `--node-id nodeN`) and HAProxy from deploy/haproxy-cluster.cfg,
then `--clients` editors in each of `--sessions` sessions edit through
HAProxy for `--seconds`: each sends an add_item, waits for its ack and sends
the next at once (one change in flight per client, so the load is closed-
loop: as fast as the slowest part allows). Reported per node count:

- deliveries/s: changes relayed to the other members of their session,
  counted by the receiving clients, over the measured window;
- acks/s and ack latency p50/p99 (send of a change to its ack; the ack
  comes after the commit to Postgres);
- CPU in cores (CPU seconds per second) over the window, from
  /proc/PID/stat (utime + stime, all threads): the nodes, HAProxy,
  Postgres (every process named postgres) and the load generator (this
  process), and the whole machine from /proc/stat. Whatever is near the
  machine's core count is what limits the run.

Then, with the most nodes, the failover: the node owning the most sessions
is killed with SIGKILL while everyone edits, and the time until every one
of its sessions acknowledged a change again is reported (its clients
reconnect through HAProxy, which sends them to a survivor; the survivor
takes a session once the dead node's lease expires: about the lease
timeout, plus HAProxy's health check and the clients' backoff).

On a 2-core machine this is a sanity check of the cluster, not a
measurement of what more machines give: every node, HAProxy, Postgres and
the generator share the same two cores. Every wait is bounded; exit status
0 when every run completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from collab_trio.cluster_testing import Cluster, Editor, haproxy_binary, open_cluster  # noqa: E402

CONFIG = REPO / "deploy" / "haproxy-cluster.cfg"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_pids() -> list[int]:
    """Every process named postgres (the server and its backends) on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


@attrs.define
class CpuSample:
    nodes: float
    haproxy: float
    postgres: float
    generator: float
    machine_busy: float
    machine_total: float

    @classmethod
    def take(cls, cluster: Cluster) -> CpuSample:
        busy, total = machine_cpu()
        return cls(
            sum(process_cpu(node.pid) for node in cluster.nodes),
            process_cpu(cluster.haproxy.process.pid),
            sum(process_cpu(pid) for pid in postgres_pids()),
            process_cpu(os.getpid()),
            busy, total,
        )


@attrs.define
class RunResult:
    nodes: int
    seconds: float
    deliveries: int
    acks: int
    latencies: list[float]
    cores: dict[str, float]
    # Connections that ended during the measured window (should be 0), by close code or error.
    reconnects: int = 0
    close_reasons: dict[str, int] = attrs.field(factory=dict)
    failover: list[float] | None = None
    moved: int = 0
    # HAProxy's DOWN/UP lines and the nodes' warnings, to explain closes.
    notes: list[str] = attrs.field(factory=list)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def wait_until(condition, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise RuntimeError(f"not within {timeout:g} s: {what}")


async def run(nodes: int, args: argparse.Namespace, work: Path, failover: bool) -> RunResult:
    """One cluster of `nodes` nodes under load; with `failover`, a SIGKILL at the end."""
    prefix = f"scale{nodes}-{os.getpid()}"

    def node_args(name: str) -> list[str]:
        common = ["--rate-limit", "100000", "--rate-burst", "100000"]
        if args.store == "memory":
            return ["--store", "memory", *common]
        return [
            "--store", "postgres", "--database-url", args.database_url, "--node-id", f"{prefix}-{name}",
            "--lease-timeout", str(args.lease_timeout), *common,
        ]

    run_dir = work / f"nodes{nodes}"
    run_dir.mkdir()
    async with open_cluster(CONFIG, run_dir, node_args, nodes=nodes) as cluster:
        stop = trio.Event()
        editors = [
            Editor(cluster.port, f"{prefix}-s{s}", f"user{c}", interval=0)
            for s in range(args.sessions) for c in range(args.clients)
        ]
        async with trio.open_nursery() as nursery:
            for editor in editors:
                nursery.start_soon(editor.run, stop)
            await wait_until(lambda: all(e.acked for e in editors), "every client's first ack", 30)
            await trio.sleep(args.warmup)
            relays0 = sum(e.relays for e in editors)
            acks0 = [len(e.latencies) for e in editors]
            cpu0, t0 = CpuSample.take(cluster), trio.current_time()
            await trio.sleep(args.seconds)
            cpu1, elapsed = CpuSample.take(cluster), trio.current_time() - t0
            deliveries = sum(e.relays for e in editors) - relays0
            latencies = [lat for e, n in zip(editors, acks0) for lat in e.latencies[n:]]
            machine = cpu1.machine_total - cpu0.machine_total
            cores = {
                name: (getattr(cpu1, name) - getattr(cpu0, name)) / elapsed
                for name in ("nodes", "haproxy", "postgres", "generator")
            }
            cores["machine"] = (cpu1.machine_busy - cpu0.machine_busy) / machine * os.cpu_count() if machine else 0.0
            window = [f"{code} {reason}".strip() for e in editors for when, code, reason in e.closes
                      if t0 <= when <= t0 + elapsed]
            reasons = {reason: window.count(reason) for reason in sorted(set(window))}
            result = RunResult(nodes, elapsed, deliveries, len(latencies), latencies, cores, len(window), reasons)
            if failover:
                owners = {
                    e.session: [n.name for n in cluster.nodes if e.session in n.sessions_joined()] for e in editors
                }
                counts = {n.name: sum(1 for o in owners.values() if o == [n.name]) for n in cluster.nodes}
                victim = cluster.node(max(counts, key=lambda name: counts[name]))
                affected = [e for e in editors if owners[e.session] == [victim.name]]
                victim.signal(signal.SIGKILL)
                killed_at = trio.current_time()
                await wait_until(
                    lambda: all(e.served_again_after(killed_at) for e in affected),
                    "every session of the killed node served again", args.lease_timeout + 30,
                )
                per_session: dict[str, float] = {}
                for e in affected:
                    served = e.served_again_after(killed_at) - killed_at  # type: ignore[operator]
                    per_session[e.session] = max(per_session.get(e.session, 0.0), served)
                result.failover = sorted(per_session.values())
                result.moved = len(per_session)
            stop.set()
        result.notes = [line for line in cluster.haproxy.lines if " is DOWN" in line or " is UP" in line][:6]
        for node in cluster.nodes:
            result.notes += [f"{node.name}: {line}" for line in node.server.lines if "WARNING" in line or "ERROR" in line][:4]
    return result


def table(results: list[RunResult], args: argparse.Namespace) -> str:
    head = (f"{'nodes':>5}  {'deliveries/s':>12}  {'acks/s':>7}  {'ack p50 ms':>10}  {'ack p99 ms':>10}"
            f"  {'cores: nodes':>12}  {'haproxy':>7}  {'postgres':>8}  {'generator':>9}  {'machine':>7}  {'closes':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        c = r.cores
        lines.append(
            f"{r.nodes:>5}  {r.deliveries / r.seconds:>12.0f}  {r.acks / r.seconds:>7.0f}"
            f"  {percentile(r.latencies, 0.5) * 1000:>10.1f}  {percentile(r.latencies, 0.99) * 1000:>10.1f}"
            f"  {c['nodes']:>12.2f}  {c['haproxy']:>7.2f}  {c['postgres']:>8.2f}  {c['generator']:>9.2f}"
            f"  {c['machine']:>7.2f}  {r.reconnects:>6}"
        )
    for r in results:
        if r.close_reasons:
            lines.append(f"closes with {r.nodes} node(s): " + ", ".join(f"{n} x {why}" for why, n in r.close_reasons.items()))
        lines += [f"  {note}" for note in r.notes if r.close_reasons]
    for r in results:
        if r.failover is not None:
            lines.append(
                f"failover ({r.nodes} nodes, SIGKILL of the owner of {r.moved} of {args.sessions} sessions,"
                f" lease timeout {args.lease_timeout:g} s): every session served again after"
                f" {max(r.failover):.2f} s (first {min(r.failover):.2f} s, median {statistics.median(r.failover):.2f} s)"
            )
    busiest = max(results, key=lambda r: r.cores["machine"])
    parts = {k: v for k, v in busiest.cores.items() if k != "machine"}
    top = max(parts, key=lambda k: parts[k])
    lines.append(
        f"limit: the machine ran {busiest.cores['machine']:.2f} of {os.cpu_count()} cores busy with"
        f" {busiest.nodes} node(s); the largest share was {top} ({parts[top]:.2f} cores)"
    )
    return "\n".join(lines)


def node_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of node counts, e.g. 1,3") from None
    if not counts or any(not 1 <= n <= 3 for n in counts):
        raise argparse.ArgumentTypeError("node counts between 1 and 3 (the config has three server lines)")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="1 and 3 collab-trio nodes behind HAProxy, and a failover.")
    add = parser.add_argument
    add("--database-url", default=os.environ.get("COLLAB_TRIO_TEST_DATABASE_URL"),
        help="Postgres for the nodes (default: $COLLAB_TRIO_TEST_DATABASE_URL)")
    add("--store", choices=["postgres", "memory"], default="postgres",
        help="the nodes' store; memory: no Postgres, nothing shared (the failover then loses the sessions)")
    add("--nodes", type=node_counts, default=[1, 3], help="node counts to run, comma-separated (default: 1,3)")
    add("--sessions", type=int, default=20, help="sessions (default: 20)")
    add("--clients", type=int, default=3, help="editing clients per session (default: 3)")
    add("--seconds", type=float, default=10.0, help="measured seconds per node count (default: 10)")
    add("--warmup", type=float, default=1.0, help="seconds of load before measuring (default: 1)")
    add("--lease-timeout", type=float, default=10.0,
        help="the nodes' --lease-timeout (default: 10, theirs; under full load a renewal needs its third of it)")
    add("--no-failover", action="store_true", help="skip the SIGKILL at the end")
    add("--short", action="store_true",
        help="a few seconds: 6 sessions, 2 clients, 2 s per node count, lease timeout 3 s (CI)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.short:
        args.sessions, args.clients, args.seconds, args.warmup, args.lease_timeout = 6, 2, 2.0, 0.5, 3.0
    if args.store == "postgres" and not args.database_url:
        print("scale.py: no Postgres: pass --database-url or set COLLAB_TRIO_TEST_DATABASE_URL", file=sys.stderr)
        return 2
    if haproxy_binary() is None:
        print("scale.py: haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 2
    print(f"scale: {os.cpu_count()} cores, {args.sessions} sessions x {args.clients} clients,"
          f" {args.seconds:g} s per run, nodes {','.join(map(str, args.nodes))}; a sanity check on one machine",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="collab-scale-") as work:
        for count in args.nodes:
            failover = not args.no_failover and count == max(args.nodes) and count > 1
            try:
                results.append(trio.run(run, count, args, Path(work), failover))
            except Exception as exc:  # one line, not a traceback: which run failed and why
                print(f"{count} node(s): could not run: {exc!r}", file=sys.stderr)
                return 1
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
