"""The deployment files in deploy/, run for real: nginx and HAProxy in front of a server, the systemd unit.

The proxy configurations are the committed files themselves. What a test
changes before running them, and nothing else (`render`):

- nginx.conf: `listen 80;` and `server 127.0.0.1:8765;` get free ports, the
  access log goes to tmp_path; it is included in a minimal main
  configuration (tmp_path for pid, error log and temp files; one process,
  in the foreground), the way Debian's nginx.conf includes conf.d/*.conf;
- haproxy.cfg: `bind :80` and `server collab1 127.0.0.1:8765` get free
  ports; run with `haproxy -f FILE -db` (foreground), its log on stdout;
- collab-trio.service: ExecStart's program becomes this environment's
  `collab-trio`, for `systemd-analyze verify`.

Clients connect from 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to
loopback), so the proxy sees two real client addresses and forwards them.
In CI (env CI set) a missing nginx or haproxy fails the test: .ci/run
installs both. Elsewhere it is skipped, with the reason.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import ProcessCollector
import trio
from trio_websocket import ConnectionRejected

from collab_trio.cli import build_parser
from collab_trio.testing import HANG, ServerProcess, expect_json, server_process, tcp_client

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TOKEN = "deploy-test-token-5150"
TOKENS_TOML = f'[tokens."{TOKEN}"]\nrole = "editor"\n'
# With a base path, the listening line names it.
LISTENING = re.compile(r"Listening on ws://127\.0\.0\.1:(\d+)/collab/ws/")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nginx/HAProxy tests run on Linux")


def binary(name: str) -> str:
    """The path of a proxy's binary; a failure in CI, a skip elsewhere, when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it (apt-get install nginx-light haproxy)")
        pytest.skip(f"{name} is not installed (apt-get install nginx-light haproxy); CI runs this test")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def render(text: str, replacements: dict[str, str]) -> str:
    """`text` with each key replaced by its value; each key must occur exactly once."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} should occur once in the committed file"
        text = text.replace(old, new)
    return text


def nginx_command(tmp_path: Path, port: int, backend: int) -> list[str]:
    site = render(
        (DEPLOY / "nginx.conf").read_text(),
        {
            "listen 80;": f"listen 127.0.0.1:{port};",
            "server 127.0.0.1:8765;": f"server 127.0.0.1:{backend};",
            "/var/log/nginx/collab-trio.access.log": str(tmp_path / "access.log"),
        },
    )
    (tmp_path / "collab-trio.conf").write_text(site)
    temp = {name: tmp_path / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    main = f"""\
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {tmp_path}/collab-trio.conf;
}}
"""
    (tmp_path / "nginx-main.conf").write_text(main)
    return [binary("nginx"), "-c", str(tmp_path / "nginx-main.conf"), "-p", f"{tmp_path}/", "-e", str(tmp_path / "error.log")]


def haproxy_command(tmp_path: Path, port: int, backend: int) -> list[str]:
    config = render(
        (DEPLOY / "haproxy.cfg").read_text(),
        {"bind :80": f"bind 127.0.0.1:{port}", "server collab1 127.0.0.1:8765": f"server collab1 127.0.0.1:{backend}"},
    )
    (tmp_path / "haproxy.cfg").write_text(config)
    return [binary("haproxy"), "-f", str(tmp_path / "haproxy.cfg"), "-db"]


async def wait_for_port(port: int, process: ServerProcess) -> None:
    """Until the proxy accepts connections (it prints no line that says so)."""
    with trio.fail_after(HANG):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                assert process.process.returncode is None, f"the proxy exited:\n{process.output}"
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


async def plain_get(port: int, path: str) -> bytes:
    """A plain HTTP GET through the proxy: the whole response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        with trio.fail_after(HANG):
            while chunk := await stream.receive_some():
                response += chunk
    return response


@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
async def test_clients_through_the_documented_proxy(proxy: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS_TOML)
    port = free_port()
    async with server_process(
        "--base-path", "/collab", "--trusted-proxy", "127.0.0.1/32", "--max-connections-per-ip", "1",
        "--store", "memory", "--tokens", str(tokens), "--debug",
        listening=LISTENING,
    ) as server:
        command = (nginx_command if proxy == "nginx" else haproxy_command)(tmp_path, port, server.port)
        async with server_process(command=command, listening=None, cwd=tmp_path) as front:
            await wait_for_port(port, front)
            # Stock Optiverse with the server URL ws://HOST:PORT/collab/t/TOKEN, then the
            # same typed with a trailing slash: .../t/TOKEN//ws/...
            async with tcp_client(port, f"/collab/t/{TOKEN}/ws/lab/ada", local_address="127.0.0.2") as ada:
                await expect_json(ada, "connection:ack")
                async with tcp_client(port, f"/collab/t/{TOKEN}//ws/lab/bob", local_address="127.0.0.3") as bob:
                    await expect_json(bob, "connection:ack")
                    assert (await expect_json(ada, "user:joined"))["user_id"] == "bob"
                    await ada.send_message(
                        '{"type": "command", "command": {"action": "add_item", "item_type": "lens",'
                        ' "item_id": "l1", "data": {"x_mm": 1}}}'
                    )
                    relay = await expect_json(bob, "command")
                    assert (relay["user_id"], relay["command"]["item_id"]) == ("ada", "l1")
                    # A second connection from 127.0.0.2: the forwarded address is at its limit.
                    with pytest.raises(ConnectionRejected) as info:
                        async with tcp_client(port, f"/collab/t/{TOKEN}/ws/lab/ada2", local_address="127.0.0.2"):
                            pass
                    assert info.value.status_code == 429
                    # The token as a query parameter (the other documented form): masked too.
                    async with tcp_client(port, f"/collab/ws/lab/cy?since=0&token={TOKEN}", local_address="127.0.0.4") as cy:
                        await expect_json(cy, "connection:ack")
                    # Plain HTTP through the proxy gets the server's text.
                    response = await plain_get(port, "/collab/")
                    assert response.startswith(b"HTTP/1.1 200 "), response
                    assert b"collab-trio WebSocket endpoint" in response
                    # The URL the client used, port included (tokens are on: the /t/TOKEN form).
                    assert f"ws://127.0.0.1:{port}/collab/t/TOKEN/ws/{{session_id}}/{{user_id}}".encode() in response
            await server.wait_for("Refused 127.0.0.2: too many connections from this address")
            await server.wait_for(r"User bob left session lab")
        access_log = (tmp_path / "access.log").read_text() if proxy == "nginx" else front.output
    assert "/collab/t/***/ws/lab/ada" in access_log, access_log
    for where, text in [("server", server.output), (proxy, access_log)]:
        assert TOKEN not in text, f"the token is in the {where}'s log:\n{text}"


# -- the systemd unit ------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)  # systemd repeats some keys
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((DEPLOY / "collab-trio.service").read_text())
    return parser


def test_systemd_unit_runs_a_serve_command_the_cli_accepts() -> None:
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/collab-trio") and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])  # exits 2 on an option the CLI does not have
    assert (args.host, args.base_path, args.trusted_proxy) == ("127.0.0.1", "/collab", ["127.0.0.1/32"])
    # Hardened: no new privileges, a read-only system, its own state directory.
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["DynamicUser"] == "yes" and service["StateDirectory"] == "collab-trio"
    assert service["Environment"] == "COLLAB_TRIO_DATA_DIR=/var/lib/collab-trio"
    assert service["KillSignal"] == "SIGTERM"


def test_systemd_unit_leaves_the_process_metrics_their_proc_files(tmp_path: Path) -> None:
    # prometheus_client's process collector reads the boot time from /proc/stat:
    # without it, /metrics has no process_* metrics at all (docs/OPERATIONS.md
    # lists them). ProcSubset=pid hides /proc/stat; ProtectProc=invisible does not.
    own = Path("/proc/self")
    if not (own / "stat").exists():
        pytest.skip("no /proc here")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "stat").write_text((own / "stat").read_text())
    pid = lambda: "self"  # noqa: E731
    assert list(ProcessCollector(proc=str(proc), pid=pid, registry=None).collect()) == []  # as under ProcSubset=pid
    (proc / "stat").write_text(Path("/proc/stat").read_text())
    assert list(ProcessCollector(proc=str(proc), pid=pid, registry=None).collect())
    service = unit()["Service"]
    assert service.get("ProcSubset", "all") != "pid"
    assert service["ProtectProc"] == "invisible"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; test_systemd_unit_runs_a_serve_command_the_cli_accepts checks the file")
    program = shutil.which("collab-trio") or str(Path(sys.executable).with_name("collab-trio"))
    text = (DEPLOY / "collab-trio.service").read_text()
    text = render(text, {"/opt/collab-trio/venv/bin/collab-trio": program})
    path = tmp_path / "collab-trio.service"
    path.write_text(text)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False)
    # Only lines about this unit count (a container may lack units it refers to, e.g. network-online.target).
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "collab-trio.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
