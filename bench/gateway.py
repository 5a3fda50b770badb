"""make bench-gateway: req/s and latency of direct uvicorn, nginx proxy_pass and the Comptoir gateway.

One run, same machine, same tiny upstream. The gateway does its real work on every request: an EdDSA
access token (verified once, then served from the verified-token cache), the revocation check, a rate
limit (memory storage), CORS/header hygiene, then a forward through its own pooled httptools client. The
access log is off (``LOG_LEVEL=WARNING``), as nginx's is. nginx and wrk come from
Debian packages (installed here when missing).

Each row also gives its server's CPU per request under load (user + system time of the process and its
workers, every thread, from /proc, divided by the requests wrk counted): on a shared machine req/s moves
with whatever else runs, CPU per request much less.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from bench.results import record
from bench.system import free_port

DURATION = os.environ.get("BENCH_DURATION", "10s")
# "raw": a bare ASGI endpoint (the fastest possible upstream); "fastapi": a FastAPI endpoint, like the
# services behind the gateway and like the reference measurement.
UPSTREAMS = os.environ.get("BENCH_UPSTREAMS", "fastapi,raw").split(",")
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
WORKERS = int(os.environ.get("BENCH_GATEWAY_WORKERS", str(os.cpu_count() or 2)))
# The rows are measured in turn, ROUNDS times over, and each ratio is the median of the rounds' own ratios:
# this VM's speed moves by half within minutes, so one row measured a minute after another can say anything.
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def ensure_tools() -> None:
    if (
        shutil.which("wrk") is None
        or shutil.which("redis-server") is None
        or not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
    ):
        print("installing nginx and wrk from Debian packages ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nginx-light", "wrk", "redis-server"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a server's workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(child for c in children for child in process_tree(int(c)))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes, every thread included (/proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def wrk(url: str, connections: int, headers: dict[str, str]) -> dict[str, float]:
    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{DURATION}", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)

    def pct(label: str) -> float:
        value, unit = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {
        "rps": rps,
        "requests": requests,
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def run(upstream_kind: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-"))
    key = Ed25519PrivateKey.generate()
    jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key())) | {"kid": "bench", "alg": "EdDSA", "use": "sig"}
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "urn:comptoir:auth",
            "aud": "urn:comptoir:api",
            "sub": str(uuid.uuid4()),
            "role": "customer",
            "sid": str(uuid.uuid4()),
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "token_use": "access",
        },
        key,
        algorithm="EdDSA",
        headers={"kid": "bench", "typ": "at+jwt"},
    )
    upstream_port, nginx_port, gateway_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bench.upstream:app" if upstream_kind == "raw" else "bench.upstream:fastapi_app",
                    *([] if upstream_kind == "raw" else ["--factory"]),
                    "--port",
                    str(upstream_port),
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                env={**os.environ, "BENCH_JWKS": str(work / "jwks.json")},
                **quiet,
            )
        )
        conf = work / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{nginx_port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.append(subprocess.Popen([nginx, "-c", str(conf), "-p", str(work), "-g", "daemon off;"], **quiet))
        env = {
            **os.environ,
            "DATA_DIR": str(work),
            "LOG_LEVEL": "WARNING",
            "GATEWAY_INVENTORY_URL": f"http://127.0.0.1:{upstream_port}",
            "AUTH_INTERNAL_URL": f"http://127.0.0.1:{upstream_port}",
            "GATEWAY_AUTHENTICATED_RATE_LIMIT": "1000000000/hour",
            "GATEWAY_CLIENT_SECRET": "",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "comptoir.serve", "gateway", "--port", str(gateway_port)], env=env, **quiet
            )
        )
        # The same gateway on every core: one worker per core, limits and revocations shared in Redis.
        redis_port, workers_port = free_port(), free_port()
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        procs.append(
            subprocess.Popen(
                [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], **quiet
            )
        )
        wait_port(redis_port)
        workers_env = env | {"GATEWAY_WORKERS": str(WORKERS), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "comptoir.serve", "gateway", "--port", str(workers_port)],
                env=workers_env,
                **quiet,
            )
        )
        for port in (upstream_port, nginx_port, gateway_port, workers_port):
            wait_port(port)
        auth = {"Authorization": f"Bearer {token}"}
        path = "/api/v1/products"
        check = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                f"Authorization: Bearer {token}",
                f"http://127.0.0.1:{gateway_port}{path}",
            ],
            capture_output=True,
            text=True,
        ).stdout
        assert check == "200", f"gateway answered {check}"
        # Each row's server: the upstream itself, nginx, the gateway (with its workers).
        servers = (
            ("upstream direct (uvicorn)", upstream_port, procs[0]),
            ("nginx proxy_pass, keepalive", nginx_port, procs[1]),
            ("comptoir gateway (EdDSA token, limit)", gateway_port, procs[2]),
            (f"comptoir gateway, {WORKERS} workers (limits in Redis)", workers_port, procs[4]),
        )
        rounds: list[list[dict[str, float]]] = []
        for _ in range(ROUNDS):
            measured = []
            for _name, port, server in servers:
                pids = process_tree(server.pid)
                before = cpu_seconds(pids)
                loaded = wrk(f"http://127.0.0.1:{port}{path}", CONNECTIONS, auth)
                # The server's own CPU per request: unlike req/s, barely moved by what else runs on the machine.
                loaded["cpu_us"] = (cpu_seconds(pids) - before) / max(1.0, loaded["requests"]) * 1e6
                measured.append(loaded)
            rounds.append(measured)
        singles = [wrk(f"http://127.0.0.1:{port}{path}", 1, auth) for _name, port, _server in servers]

        def median_of(row: int, figure: str) -> float:
            return statistics.median(one[row][figure] for one in rounds)

        def vs_nginx(row: int) -> float:
            """The median over the rounds of this row's req/s over nginx's in the same round."""
            return statistics.median(one[row]["rps"] / one[1]["rps"] for one in rounds)

        print(
            f"\n{upstream_kind} upstream; wrk -t2 -c{CONNECTIONS} -d{DURATION} (and -c1 for unloaded latency),"
            f" GET {path}; {ROUNDS} rounds of every row in turn, medians (req/s of each round in brackets)\n"
        )
        columns = "vs nginx | server CPU µs/req | p50 ms | p99 ms | p50 ms (c1) | non-2xx"
        print(f"| path | req/s (c{CONNECTIONS}) | {columns} |")
        print("|---|---|---|---|---|---|---|---|")
        for row, (name, _port, _server) in enumerate(servers):
            each = " / ".join(f"{one[row]['rps']:,.0f}" for one in rounds)
            errors = sum(int(one[row]["errors"]) for one in rounds)
            print(
                f"| {name} | {median_of(row, 'rps'):,.0f} ({each}) | {vs_nginx(row):.0%} |"
                f" {median_of(row, 'cpu_us'):.0f} | {median_of(row, 'p50'):.2f} | {median_of(row, 'p99'):.2f} |"
                f" {singles[row]['p50']:.3f} | {errors} |"
            )
        goal = {"fastapi": 90, "raw": 60}.get(upstream_kind, 60)
        best = max((2, 3), key=vs_nginx)
        record(f"gateway vs nginx, {upstream_kind} upstream ({servers[best][0]})", vs_nginx(best) * 100, goal, "%")
        added = singles[2]["p50"] - singles[0]["p50"]
        print(
            f"\nadded median latency of the gateway at c1: {added:.3f} ms; "
            f"throughput vs nginx at c{CONNECTIONS}: {vs_nginx(2):.0%} (one process),"
            f" {vs_nginx(3):.0%} ({WORKERS} workers)"
        )
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ensure_tools()
    for kind in UPSTREAMS:
        run(kind)


if __name__ == "__main__":
    main()
